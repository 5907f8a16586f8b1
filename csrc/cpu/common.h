// Helpers shared by the CPU kernels: argument checks and fp32 compute on any input dtype.
#pragma once
// ATen and the op registry only (no Python headers: tests/cross/aarch64.sh builds these files
// into a plain C++ program).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "vec_table.h"

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

// ------------------------------------------------------------------ attention dropout
//
// The keep mask of mmcore/ops/reference/dropout.py, bit for bit: element (b, h, i, j) (query
// head h, query row i, key column j: indices into the tensors of the call) is kept iff
//   u = mix(kr(b, h, i) ^ kc(j)) >= thr,  thr = round(p * 2^32),
// with mix the 32-bit xorshift-multiply mixer, kh(b, h) = mix((h + 65599 b) ^ base),
// kr = mix(kh ^ mix(i + 0x632BE5AB)), kc(j) = mix(j * 0x3C6EF372 + 0x5BD1E995) and
// base = mix(mix(s1) ^ s0 ^ 0x9E3779B9) from the (2,) int64 seed.  uint32 arithmetic wraps
// exactly as the reference's `(x * m) & 0xFFFFFFFF`.  Kept weights are scaled by 1 / (1 - p).
// kc(j) is computed once per call (Sk entries), kh once per (b, h) and kr once per row, so a
// key block costs one mix per element (vec_table.h: drop_row / drop_factor).
inline uint32_t drop_mix(uint32_t x) {
  x ^= x >> 15;
  x *= 0x2C1B3C6Du;
  x ^= x >> 12;
  x *= 0x297A2D39u;
  return x ^ (x >> 15);
}

struct Dropout {
  bool on = false;      // dropout_p > 0
  bool all = false;     // thr = 2^32: every element dropped (p within 2^-33 of 1)
  uint32_t base = 0, thr = 0;
  double inv = 1.0;     // 1 / (1 - p)
  std::vector<uint32_t> kc;  // kc(j), j < Sk

  uint32_t kh(int64_t b, int64_t h) const {
    return drop_mix(static_cast<uint32_t>(h + b * 65599) ^ base);
  }
  static uint32_t kr(uint32_t kh, int64_t i) {
    return drop_mix(kh ^ drop_mix(static_cast<uint32_t>(i + 0x632BE5AB)));
  }
  // x[0:n) (keys [j0, j0 + n) of a row with key kr): kept -> x * mul, dropped -> 0
  template <typename T>
  void apply(T* x, int64_t j0, int64_t n, uint32_t r, T mul) const {
    if (all) {
      for (int64_t j = 0; j < n; ++j) x[j] = T(0);
      return;
    }
    if constexpr (std::is_same_v<T, float>) return vec::vec().drop_row(x, kc.data() + j0, n, r, thr, mul);
    for (int64_t j = 0; j < n; ++j) x[j] = drop_mix(r ^ kc[j0 + j]) >= thr ? x[j] * mul : T(0);
  }
  // z[0:n) = kept ? 1 / (1 - p) : 0 (keys [j0, j0 + n) of a row with key kr)
  template <typename T>
  void factor(T* z, int64_t j0, int64_t n, uint32_t r) const {
    const T v = static_cast<T>(inv);
    if (all) {
      for (int64_t j = 0; j < n; ++j) z[j] = T(0);
      return;
    }
    if constexpr (std::is_same_v<T, float>) return vec::vec().drop_factor(z, kc.data() + j0, n, r, thr, v);
    for (int64_t j = 0; j < n; ++j) z[j] = drop_mix(r ^ kc[j0 + j]) >= thr ? v : T(0);
  }
};

// The Dropout of a call with dropout_p (0 = off) and seed ((2,) int64 CPU tensor, required
// when dropout_p > 0), for keys j < Sk.
inline Dropout make_dropout(double dropout_p, const std::optional<at::Tensor>& seed, int64_t Sk) {
  Dropout d;
  MMCORE_CHECK_ARG(std::isfinite(dropout_p) && dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p",
                   "must lie in [0, 1), got " + std::to_string(dropout_p));
  if (dropout_p == 0.0) return d;
  MMCORE_CHECK_ARG(seed.has_value(), "dropout_seed", "is required when dropout_p > 0");
  const at::Tensor& t = *seed;
  MMCORE_CHECK_ARG(t.device().is_cpu() && t.dim() == 1 && t.numel() == 2 &&
                       t.scalar_type() == at::kLong,
                   "dropout_seed", "must be a (2,) int64 CPU tensor");
  const at::Tensor c = t.contiguous();
  const int64_t* sp = c.data_ptr<int64_t>();
  d.on = true;
  d.base = drop_mix(drop_mix(static_cast<uint32_t>(sp[1])) ^ static_cast<uint32_t>(sp[0]) ^
                    0x9E3779B9u);
  // round(p * 2^32) with Python's rounding (half to even: nearbyint's default mode)
  const double thr = std::nearbyint(dropout_p * 4294967296.0);
  d.all = thr >= 4294967296.0;
  d.thr = d.all ? 0xFFFFFFFFu : static_cast<uint32_t>(thr);
  d.inv = 1.0 / (1.0 - dropout_p);
  d.kc.resize(static_cast<size_t>(Sk));
  for (int64_t j = 0; j < Sk; ++j)
    d.kc[j] = drop_mix(static_cast<uint32_t>(j) * 0x3C6EF372u + 0x5BD1E995u);
  return d;
}

// window_attention's CPU forward (csrc/cpu/window_attention.cpp); cross_attention's forward
// is this kernel with an unbounded window.
std::tuple<at::Tensor, at::Tensor> window_attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& seqlens_q, const std::optional<at::Tensor>& seqlens_k,
    int64_t left, int64_t right, bool causal, int64_t global_tokens, double scale,
    double softcap, const std::optional<at::Tensor>& key_lo,
    const std::optional<at::Tensor>& key_hi, const std::optional<at::Tensor>& key_mask,
    double dropout_p = 0.0, const std::optional<at::Tensor>& dropout_seed = std::nullopt);

}  // namespace mmcore
