// Helpers shared by the CPU kernels: argument checks and fp32 compute on any input dtype.
#pragma once
#include <torch/extension.h>

#define MMCORE_CHECK_ARG(cond, name, msg) TORCH_CHECK(cond, name, ": ", msg)

namespace mmcore {

// Inputs of a CPU kernel: on the CPU, last dim contiguous.
inline void check_cpu_lastdim(const at::Tensor& t, const char* name) {
  MMCORE_CHECK_ARG(t.device().is_cpu(), name, "must be a CPU tensor");
  MMCORE_CHECK_ARG(t.numel() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1, name,
                   "last dim must be contiguous");
}

// Loads bf16 / fp16 / fp32 as float (the CPU has no fast half arithmetic).
template <typename T>
inline float to_f32(T x) { return static_cast<float>(x); }

}  // namespace mmcore
