// cross_attention on the CPU: forward and backward with per-sample lengths, GQA and lse.
//
// ATen's CPU flash-attention kernel (at::_scaled_dot_product_flash_attention_for_cpu and its
// backward) already runs near this CPU's GEMM rate for D = 64..128; what it lacks is the
// mmcore contract.  Since cross_attention has no positional mask and lengths are right
// padding, each sample is just a dense problem on q[:Lq], k[:Lk]: we slice instead of
// building a (Sq, Sk) boolean mask, so padded rows/keys cost nothing and padding (even NaN)
// is never read.  Zero-length samples (Lq = 0 or Lk = 0) are skipped: out 0, lse -inf, grads 0.
//
// GQA: with no positional mask, the g query heads that share a kv head can be stacked along
// the sequence dim, q (Hq, Lq, D) -> (Hkv, g*Lq, D), so K/V are never repeated and dK/dV come
// out already summed over the group.  ATen's backward parallelises over (batch, head) only,
// so when Hkv is below the thread count we repeat K/V instead and sum dK/dV over the group.
//
// bf16 / fp16 inputs are computed in fp32 (this CPU has no fast half arithmetic).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <limits>
#include <tuple>
#include <vector>

#include "common.h"

namespace mmcore {
namespace {

std::vector<int64_t> valid_lengths(const c10::optional<at::Tensor>& s, int64_t B, int64_t S,
                                   const char* name) {
  std::vector<int64_t> L(B, S);
  if (!s.has_value()) return L;
  const at::Tensor& t = *s;
  MMCORE_CHECK_ARG(t.dim() == 1 && t.size(0) == B, name, "must have shape (B,)");
  MMCORE_CHECK_ARG(t.device().is_cpu(), name, "must be a CPU tensor");
  at::Tensor c = t.to(at::kLong).contiguous();
  const int64_t* p = c.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    MMCORE_CHECK_ARG(p[b] >= 0 && p[b] <= S, name, "values must lie in [0, " + std::to_string(S) + "]");
    L[b] = p[b];
  }
  return L;
}

// (H, S, D) slice of sample b -> (1, H, L, D) fp32 view/copy.
at::Tensor rows(const at::Tensor& t, int64_t b, int64_t L) {
  return t.select(0, b).narrow(1, 0, L).unsqueeze(0).to(at::kFloat);
}

// Query-like (Hq, S, D) of sample b -> (1, Hkv, g*L, D) fp32: the g heads of a group stacked.
at::Tensor stacked(const at::Tensor& t, int64_t b, int64_t L, int64_t Hkv) {
  at::Tensor s = t.select(0, b).narrow(1, 0, L);  // (Hq, L, D)
  const int64_t Hq = s.size(0), D = s.size(2);
  return s.reshape({1, Hkv, (Hq / Hkv) * L, D}).to(at::kFloat);
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_cpu_lastdim(q, "q");
  check_cpu_lastdim(k, "k");
  check_cpu_lastdim(v, "v");
  MMCORE_CHECK_ARG(q.dim() == 4, "q", "must be (B, Hq, Sq, D)");
  MMCORE_CHECK_ARG(k.dim() == 4 && v.sizes() == k.sizes(), "k", "k and v must be (B, Hkv, Sk, D)");
  MMCORE_CHECK_ARG(k.size(0) == q.size(0) && k.size(3) == q.size(3), "k", "batch / head dim must match q");
  MMCORE_CHECK_ARG(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "k", "Hq % Hkv must be 0");
  MMCORE_CHECK_ARG(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "k",
                   "q, k, v must share a dtype");
  auto dt = q.scalar_type();
  MMCORE_CHECK_ARG(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, "q",
                   "dtype must be float32, bfloat16 or float16");
}

// Run fn(b) for every sample; samples in parallel when one sample alone cannot use the
// threads (ATen's kernel inside then runs single-threaded), else one after the other.
template <typename F>
void for_samples(int64_t B, bool parallel_samples, const F& fn) {
  if (parallel_samples && B > 1) {
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) fn(b);
    });
  } else {
    for (int64_t b = 0; b < B; ++b) fn(b);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> cross_attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& seqlens_q, const c10::optional<at::Tensor>& seqlens_k,
    double scale) {
  check_inputs(q, k, v);
  const int64_t B = q.size(0), Hq = q.size(1), Sq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Sk = k.size(2);
  auto Lq = valid_lengths(seqlens_q, B, Sq, "seqlens_q");
  auto Lk = valid_lengths(seqlens_k, B, Sk, "seqlens_k");
  at::Tensor out = at::zeros({B, Hq, Sq, D}, q.options());
  at::Tensor lse = at::full({B, Hq, Sq}, -std::numeric_limits<float>::infinity(),
                            q.options().dtype(at::kFloat));
  // the forward parallelises over heads x query blocks: one sample fills the threads
  // unless it is tiny
  const bool par = Hq * ((Sq + 255) / 256) < at::get_num_threads();
  for_samples(B, par, [&](int64_t b) {
    if (Lq[b] == 0 || Lk[b] == 0) return;
    at::Tensor qb = stacked(q, b, Lq[b], Hkv);
    at::Tensor kb = rows(k, b, Lk[b]), vb = rows(v, b, Lk[b]);
    auto res = at::_scaled_dot_product_flash_attention_for_cpu(qb, kb, vb, 0.0, false,
                                                                c10::nullopt, scale);
    out.select(0, b).narrow(1, 0, Lq[b]).copy_(std::get<0>(res).reshape({Hq, Lq[b], D}));
    lse.select(0, b).narrow(1, 0, Lq[b]).copy_(std::get<1>(res).reshape({Hq, Lq[b]}));
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_attention_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const c10::optional<at::Tensor>& seqlens_q,
    const c10::optional<at::Tensor>& seqlens_k, double scale) {
  check_inputs(q, k, v);
  check_cpu_lastdim(dout, "dout");
  check_cpu_lastdim(out, "out");
  MMCORE_CHECK_ARG(dout.sizes() == q.sizes(), "dout", "must have q's shape");
  MMCORE_CHECK_ARG(out.sizes() == q.sizes(), "out", "must have q's shape");
  MMCORE_CHECK_ARG(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) &&
                       lse.size(2) == q.size(2) && lse.scalar_type() == at::kFloat,
                   "lse", "must be float32 (B, Hq, Sq)");
  const int64_t B = q.size(0), Hq = q.size(1), Sq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Sk = k.size(2), g = Hq / Hkv;
  auto Lq = valid_lengths(seqlens_q, B, Sq, "seqlens_q");
  auto Lk = valid_lengths(seqlens_k, B, Sk, "seqlens_k");
  at::Tensor dq = at::zeros({B, Hq, Sq, D}, q.options());
  at::Tensor dk = at::zeros({B, Hkv, Sk, D}, k.options());
  at::Tensor dv = at::zeros({B, Hkv, Sk, D}, v.options());
  const int64_t threads = at::get_num_threads();
  // ATen's backward parallelises over heads only: stack the group when Hkv alone fills the
  // threads, else repeat K/V (Hq units) and reduce dK/dV over the group afterwards.
  const bool stack = g == 1 || Hkv >= threads;
  const int64_t units = stack ? Hkv : Hq;
  const bool par = units < threads;
  for_samples(B, par, [&](int64_t b) {
    const int64_t lq = Lq[b], lk = Lk[b];
    if (lq == 0 || lk == 0) return;
    at::Tensor kb = rows(k, b, lk), vb = rows(v, b, lk);
    at::Tensor gq, gk, gv;
    if (stack) {
      at::Tensor lb = lse.select(0, b).narrow(1, 0, lq).reshape({1, Hkv, g * lq});
      std::tie(gq, gk, gv) = at::_scaled_dot_product_flash_attention_for_cpu_backward(
          stacked(dout, b, lq, Hkv), stacked(q, b, lq, Hkv), kb, vb, stacked(out, b, lq, Hkv),
          lb, 0.0, false, c10::nullopt, scale);
    } else {
      at::Tensor kr = kb.repeat_interleave(g, 1), vr = vb.repeat_interleave(g, 1);
      at::Tensor lb = lse.select(0, b).narrow(1, 0, lq).unsqueeze(0);
      std::tie(gq, gk, gv) = at::_scaled_dot_product_flash_attention_for_cpu_backward(
          rows(dout, b, lq), rows(q, b, lq), kr, vr, rows(out, b, lq), lb, 0.0, false,
          c10::nullopt, scale);
      gk = gk.reshape({Hkv, g, lk, D}).sum(1);
      gv = gv.reshape({Hkv, g, lk, D}).sum(1);
    }
    // one key: the softmax is identically 1, so dQ and dK are exactly 0 (ATen's result is
    // rounding noise of dP - rowsum(dO * O) there); leave the zeros
    if (lk > 1) {
      dq.select(0, b).narrow(1, 0, lq).copy_(gq.reshape({Hq, lq, D}));
      dk.select(0, b).narrow(1, 0, lk).copy_(gk.reshape({Hkv, lk, D}));
    }
    dv.select(0, b).narrow(1, 0, lk).copy_(gv.reshape({Hkv, lk, D}));
  });
  return {dq, dk, dv};
}

}  // namespace mmcore

TORCH_LIBRARY_FRAGMENT(mmcore_C, m) {
  m.def("cross_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? seqlens_q, Tensor? seqlens_k, "
        "float scale) -> (Tensor, Tensor)");
  m.def("cross_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor? seqlens_q, Tensor? seqlens_k, float scale) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mmcore_C, CPU, m) {
  m.impl("cross_attention_fwd", &mmcore::cross_attention_fwd_cpu);
  m.impl("cross_attention_bwd", &mmcore::cross_attention_bwd_cpu);
}
