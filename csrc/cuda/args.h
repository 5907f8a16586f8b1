// Torch-side helpers of the CUDA ops (window_decode_op.cpp, lora_sgmv_op.cpp): argument
// checks that name the argument, alignment for 16-byte copies, the GPU's SM count.
#pragma once
#include <ATen/ATen.h>

#include <array>
#include <atomic>
#include <optional>

#ifdef MMCORE_WITH_CUDA
#include <cuda_runtime.h>
#endif

#define MMCORE_ARG(cond, name, ...) TORCH_CHECK(cond, name, ": ", __VA_ARGS__)

namespace mmcore {
namespace cuda_args {

// The kernels copy 16 bytes at a time: base pointer 16-byte aligned, every stride but the
// last a multiple of 8 elements, last dim contiguous.  Returns t or an aligned copy.
inline at::Tensor aligned16(const at::Tensor& t) {
  bool ok = t.numel() == 0 || reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int64_t d = 0; ok && d + 1 < t.dim(); ++d) ok = t.size(d) <= 1 || t.stride(d) % 8 == 0;
  if (t.dim() > 0) ok = ok && (t.size(-1) <= 1 || t.stride(-1) == 1);
  if (ok) return t;
  at::Tensor c = t.contiguous();  // a fresh allocation is 16-byte aligned
  if (c.data_ptr() == t.data_ptr()) c = c.clone();
  return c;
}

inline void check_half(const at::Tensor& t, const char* name) {
  MMCORE_ARG(t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf, name,
             "the CUDA kernels take bfloat16 or float16, got ", t.scalar_type());
}

inline void check_same(const at::Tensor& t, const char* name, const at::Tensor& ref,
                       const char* ref_name) {
  MMCORE_ARG(t.scalar_type() == ref.scalar_type(), name, "has dtype ", t.scalar_type(),
             " but ", ref_name, " has ", ref.scalar_type());
  MMCORE_ARG(t.device() == ref.device(), name, "is on ", t.device(), " but ", ref_name,
             " is on ", ref.device());
}

// (B,) lengths as int64 on ref's device.
inline std::optional<at::Tensor> lengths(const std::optional<at::Tensor>& s, const char* name,
                                         int64_t B, const at::Tensor& ref) {
  if (!s.has_value()) return std::nullopt;
  MMCORE_ARG(s->dim() == 1 && s->size(0) == B, name, "must have shape (", B, ",), got ",
             s->sizes());
  MMCORE_ARG(s->device() == ref.device(), name, "is on ", s->device(), " but q is on ",
             ref.device());
  return s->to(at::kLong).contiguous();
}

// 0 <= s[b] <= S for lengths held in host memory (CPU tensors only: no device sync).
inline void check_lengths(const std::optional<at::Tensor>& s, const char* name, int64_t S) {
  if (!s.has_value() || s->is_cuda() || s->numel() == 0) return;
  const int64_t* v = s->data_ptr<int64_t>();
  for (int64_t b = 0; b < s->numel(); ++b)
    MMCORE_ARG(v[b] >= 0 && v[b] <= S, name, "values must lie in [0, ", S, "], got ", v[b],
               " at index ", b);
}

// SMs of t's CUDA device, cached (a CPU tensor gets `cpu_value`: the emulation's choice).
inline int sm_count(const at::Tensor& t, int cpu_value) {
#ifdef MMCORE_WITH_CUDA
  if (t.is_cuda()) {
    static std::array<std::atomic<int>, 64> cache{};
    const int dev = t.get_device();
    int n = dev < 64 ? cache[dev].load() : 0;
    if (n == 0) {
      TORCH_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) == cudaSuccess,
                  "cudaDeviceGetAttribute(MultiProcessorCount) failed");
      if (dev < 64) cache[dev].store(n);
    }
    return n;
  }
#endif
  return cpu_value;
}

}  // namespace cuda_args
}  // namespace mmcore
