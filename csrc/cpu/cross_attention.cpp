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
// out already summed over the group.
//
// Forward: ATen's flash kernel per sample (one call for the whole batch when every length is
// full).  Backward: our own chunked GEMM formulation on ATen (MKL) ops (see below): ATen's
// CPU flash backward misses the tolerance rule on dV, and parallelises over heads only.
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

}  // namespace

std::tuple<at::Tensor, at::Tensor> cross_attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& seqlens_q, const c10::optional<at::Tensor>& seqlens_k,
    double scale) {
  at::AutoDispatchBelowADInplaceOrView no_autograd;  // inputs may require grad; no graph here
  check_inputs(q, k, v);
  const int64_t B = q.size(0), Hq = q.size(1), Sq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Sk = k.size(2), g = Hq / Hkv;
  auto Lq = valid_lengths(seqlens_q, B, Sq, "seqlens_q");
  auto Lk = valid_lengths(seqlens_k, B, Sk, "seqlens_k");
  bool full = true;
  for (int64_t b = 0; b < B; ++b) full = full && Lq[b] == Sq && Lk[b] == Sk;
  // ATen's kernel writes its output as (batch, seq, head, D); giving it (B*Hkv, 1, g*S, D)
  // (heads as batch, the g query heads of a group stacked along the sequence) makes that
  // layout our contiguous (B, Hq, S, D), so the full-length case needs no copy at all
  if (full && Sq > 0 && Sk > 0) {
    auto res = at::_scaled_dot_product_flash_attention_for_cpu(
        q.to(at::kFloat).reshape({B * Hkv, 1, g * Sq, D}),
        k.to(at::kFloat).reshape({B * Hkv, 1, Sk, D}),
        v.to(at::kFloat).reshape({B * Hkv, 1, Sk, D}), 0.0, false, c10::nullopt, scale);
    return {std::get<0>(res).reshape({B, Hq, Sq, D}).to(q.scalar_type()),
            std::get<1>(res).reshape({B, Hq, Sq})};
  }
  at::Tensor out = at::empty({B, Hq, Sq, D}, q.options());
  at::Tensor lse = at::empty({B, Hq, Sq}, q.options().dtype(at::kFloat));
  for (int64_t b = 0; b < B; ++b) {
    const int64_t lq = Lq[b], lk = Lk[b];
    at::Tensor ob = out.select(0, b), lb = lse.select(0, b);
    const int64_t done = lk > 0 ? lq : 0;  // rows [done, Sq) see no key: 0 and -inf
    if (done < Sq) {
      ob.narrow(1, done, Sq - done).zero_();
      lb.narrow(1, done, Sq - done).fill_(-std::numeric_limits<float>::infinity());
    }
    if (done == 0) continue;
    auto res = at::_scaled_dot_product_flash_attention_for_cpu(
        q.select(0, b).narrow(1, 0, lq).to(at::kFloat).reshape({Hkv, 1, g * lq, D}),
        k.select(0, b).narrow(1, 0, lk).to(at::kFloat).unsqueeze(1),
        v.select(0, b).narrow(1, 0, lk).to(at::kFloat).unsqueeze(1), 0.0, false, c10::nullopt,
        scale);
    ob.narrow(1, 0, lq).copy_(std::get<0>(res).view({Hq, lq, D}));
    lb.narrow(1, 0, lq).copy_(std::get<1>(res).view({Hq, lq}));
  }
  return {out, lse};
}

// Backward with ATen GEMMs, one work unit = (sample, kv head, slice of the stacked query rows):
//   P = softmax(scale * Q K^T), dV = P^T dO, dS = scale * P * (dO V^T - delta),
//   delta = rowsum(dO * O), dQ = dS K, dK = dS^T Q.
// Units run in parallel (each single-threaded, over query chunks whose (C, Lk) score block
// stays in cache); each unit owns fp32 partials of dK / dV that are summed afterwards in a
// fixed order, so the result is deterministic.  P is recomputed with ATen's softmax rather
// than from the saved lse: ATen's CPU flash kernels compute exp at reduced accuracy
// (exp_u20), and P = exp(S - lse_flash) misses the tolerance rule on dV by a little; a
// self-normalised softmax of the chunk is exact to fp32 rounding.
namespace {

struct Unit {
  int64_t b, h, m0, m1;
};

void unit_backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& dout, const at::Tensor& out, double scale, at::Tensor dq,
                   at::Tensor dk, at::Tensor dv) {
  // q/dout/out/dq (M, D) rows of one kv head's stacked queries; k/v/dk/dv (Lk, D)
  const int64_t M = q.size(0), Lk = k.size(0);
  const int64_t C = std::max<int64_t>(16, std::min<int64_t>(256, (1 << 16) / std::max<int64_t>(1, Lk)));
  at::Tensor kt = k.t(), vt = v.t();
  // chunk buffers allocated once per unit (fresh pages are costly to fault in)
  at::Tensor sbuf = at::empty({C, Lk}, k.options()), pbuf = at::empty({C, Lk}, k.options());
  at::Tensor dsbuf = at::empty({C, Lk}, k.options());
  for (int64_t m0 = 0; m0 < M; m0 += C) {
    const int64_t c = std::min(C, M - m0);
    at::Tensor qc = q.narrow(0, m0, c), doc = dout.narrow(0, m0, c);
    at::Tensor delta = (doc * out.narrow(0, m0, c)).sum(-1, true);  // (c, 1)
    at::Tensor s = sbuf.narrow(0, 0, c), p = pbuf.narrow(0, 0, c), ds = dsbuf.narrow(0, 0, c);
    at::mm_out(s, qc, kt).mul_(scale);
    at::_softmax_out(p, s, -1, false);  // (c, Lk)
    dv.addmm_(p.t(), doc);
    at::mm_out(ds, doc, vt);
    ds.sub_(delta).mul_(p).mul_(scale);
    at::Tensor dqc = dq.narrow(0, m0, c);
    if (dqc.is_contiguous()) {
      at::mm_out(dqc, ds, k);
    } else {
      dqc.copy_(at::mm(ds, k));
    }
    dk.addmm_(ds.t(), qc);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_attention_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const c10::optional<at::Tensor>& seqlens_q,
    const c10::optional<at::Tensor>& seqlens_k, double scale) {
  at::AutoDispatchBelowADInplaceOrView no_autograd;  // inputs may require grad; no graph here
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
  auto f32 = q.options().dtype(at::kFloat);
  // per sample: fp32 (Hkv, g*Lq, D) stacked views / copies (a sample with Lk = 1 has a
  // constant softmax: dQ = dK = 0 exactly, only dV is computed)
  std::vector<at::Tensor> Q(B), DO(B), O(B), K(B), V(B), GQ(B);
  int64_t active = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t lq = Lq[b], lk = Lk[b];
    if (lq == 0 || lk == 0) continue;
    ++active;
    auto grp = [&](const at::Tensor& t) {
      return t.select(0, b).narrow(1, 0, lq).to(at::kFloat).reshape({Hkv, g * lq, D});
    };
    Q[b] = grp(q);
    DO[b] = grp(dout);
    O[b] = grp(out);
    K[b] = k.select(0, b).narrow(1, 0, lk).to(at::kFloat);
    V[b] = v.select(0, b).narrow(1, 0, lk).to(at::kFloat);
    // dQ straight into the output when it is fp32 and the stacked view exists
    const bool direct = q.scalar_type() == at::kFloat && lq == Sq && lk > 1;
    GQ[b] = direct ? dq.select(0, b).view({Hkv, g * lq, D}) : at::empty({Hkv, g * lq, D}, f32);
  }
  // work units: enough query slices that every thread has work
  const int64_t threads = at::get_num_threads();
  std::vector<Unit> units;
  std::vector<int64_t> first(B, 0), count(B, 0);
  for (int64_t b = 0; b < B; ++b) {
    if (!Q[b].defined()) continue;
    const int64_t M = g * Lq[b];
    int64_t split = (2 * threads + active * Hkv - 1) / (active * Hkv);
    split = std::max<int64_t>(1, std::min<int64_t>(split, (M + 255) / 256));
    first[b] = units.size();
    count[b] = split;
    for (int64_t h = 0; h < Hkv; ++h)
      for (int64_t s = 0; s < split; ++s)
        units.push_back({b, h, M * s / split, M * (s + 1) / split});
  }
  const int64_t U = units.size();
  std::vector<at::Tensor> PK(U), PV(U);
  at::parallel_for(0, U, 1, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const Unit& w = units[u];
      const int64_t n = w.m1 - w.m0, lk = Lk[w.b];
      PK[u] = at::zeros({lk, D}, f32);
      PV[u] = at::zeros({lk, D}, f32);
      auto rows = [&](const at::Tensor& t) { return t.select(0, w.h).narrow(0, w.m0, n); };
      unit_backward(rows(Q[w.b]), K[w.b].select(0, w.h), V[w.b].select(0, w.h),
                    rows(DO[w.b]), rows(O[w.b]), scale, rows(GQ[w.b]), PK[u], PV[u]);
    }
  });
  // fixed-order reduction of the partials; dQ / dK stay 0 for a single key (see above)
  for (int64_t b = 0; b < B; ++b) {
    if (!Q[b].defined()) continue;
    const int64_t lq = Lq[b], lk = Lk[b], split = count[b];
    const bool direct = q.scalar_type() == at::kFloat && lq == Sq && lk > 1;
    if (lk > 1 && !direct) dq.select(0, b).narrow(1, 0, lq).copy_(GQ[b].view({Hq, lq, D}));
    for (int64_t h = 0; h < Hkv; ++h) {
      const int64_t u = first[b] + h * split;
      at::Tensor sk = PK[u], sv = PV[u];
      for (int64_t s = 1; s < split; ++s) {
        sk = sk.add(PK[u + s]);
        sv = sv.add(PV[u + s]);
      }
      if (lk > 1) dk.select(0, b).select(0, h).narrow(0, 0, lk).copy_(sk);
      dv.select(0, b).select(0, h).narrow(0, 0, lk).copy_(sv);
    }
  }
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
