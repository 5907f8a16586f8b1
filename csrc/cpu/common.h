// Helpers shared by the CPU kernels: argument checks and fp32 compute on any input dtype.
#pragma once
// ATen and the op registry only (no Python headers: tests/cross/aarch64.sh builds these files
// into a plain C++ program).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

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

// window_attention's CPU forward (csrc/cpu/window_attention.cpp); cross_attention's forward
// is this kernel with an unbounded window.
std::tuple<at::Tensor, at::Tensor> window_attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& seqlens_q, const std::optional<at::Tensor>& seqlens_k,
    int64_t left, int64_t right, bool causal, int64_t global_tokens, double scale,
    double softcap, const std::optional<at::Tensor>& key_lo,
    const std::optional<at::Tensor>& key_hi, const std::optional<at::Tensor>& key_mask);

}  // namespace mmcore
