// cross_attention on the CPU: forward and backward with per-sample lengths, GQA and lse.
//
// cross_attention has no positional mask and lengths are right padding, so each sample is a
// dense problem on q[:Lq], k[:Lk]: padded rows / keys cost nothing and padding (even NaN) is
// never read.  Zero-length samples (Lq = 0 or Lk = 0): out 0, lse -inf, grads 0.
//
// GQA: with no positional mask, the g query heads that share a kv head can be stacked along
// the sequence dim, q (Hq, Lq, D) -> (Hkv, g*Lq, D), so K/V are never repeated and dK/dV come
// out already summed over the group.
//
// Forward: window_attention's CPU kernel with an unbounded window (sgemm tiles, the softmax on
// the vector build of ATen's CPU capability, one pass over Sk <= 1024 keys; 1.2x+ ATen's flash
// kernel at Sq = 8192, Sk = 577 on AVX-512, docs/cpu-kernels.md).  Backward: our own chunked
// GEMM formulation on ATen (MKL) ops (see below): ATen's CPU flash backward misses the
// tolerance rule on dV, and parallelises over heads only.
//
// bf16 / fp16 inputs are computed in fp32 (this CPU has no fast half arithmetic), fp64 in fp64.
//
// Attention dropout (dropout_p > 0 and a seed): the mask of common.h's Dropout, the
// reference's (query head h, row i, key j) hash.  The forward is window attention's; the
// backward builds each chunk's factor Z = keep / (1 - p) (C, Lk) and takes dV = (P∘Z)^T dO,
// dP∘Z for delta and dS.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
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
  MMCORE_CHECK_ARG(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf ||
                       dt == at::kDouble, "q",
                   "dtype must be float32, float64, bfloat16 or float16");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> cross_attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& seqlens_q, const c10::optional<at::Tensor>& seqlens_k,
    double scale, double softcap, double dropout_p,
    const c10::optional<at::Tensor>& dropout_seed) {
  at::AutoDispatchBelowADInplaceOrView no_autograd;  // inputs may require grad; no graph here
  check_inputs(q, k, v);
  const int64_t B = q.size(0), Sq = q.size(2), Sk = k.size(2);
  valid_lengths(seqlens_q, B, Sq, "seqlens_q");
  valid_lengths(seqlens_k, B, Sk, "seqlens_k");
  // Every row sees every key of its sample: window attention's kernel with an unbounded
  // window (left = right = -1, no global tokens) is exactly this contract, lengths, GQA, lse
  // and IEEE rows included (a NaN / +inf score makes its row NaN, lse NaN / +inf; a
  // non-finite V reaches every row; padding is never read).
  auto as_long = [](const c10::optional<at::Tensor>& t) -> c10::optional<at::Tensor> {
    if (!t.has_value()) return c10::nullopt;
    return t->to(at::kLong);
  };
  return window_attention_fwd_cpu(q, k, v, as_long(seqlens_q), as_long(seqlens_k), -1, -1,
                                  false, 0, scale, softcap, c10::nullopt, c10::nullopt,
                                  c10::nullopt, dropout_p, dropout_seed);
}

// Backward with ATen GEMMs, one work unit = (sample, kv head, slice of the stacked query rows):
//   P = softmax(scale * Q K^T), dP = dO V^T, dV = P^T dO, dS = scale * P * (dP - delta),
//   delta = rowsum(P * dP), dQ = dS K, dK = dS^T Q.
// With a softcap c the scores are c * tanh(scale * Q K^T / c) and dS takes the cap's
// derivative 1 - tanh^2 as a factor (ATen's vectorised tanh on the (C, Lk) chunk).
// delta is taken from this P and dP in fp32, not as rowsum(dO * O) from the saved output:
// for 16-bit inputs O was rounded to 16 bits, and at large logits (P nearly one-hot, dP -
// delta a near cancellation) that rounding, times the scale, put dQ past the tolerance rule
// (fuzz case: fp16, scale 40, dq 3.5x the reference's error).
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

// Query rows per partial sum of dK / dV: chunks hold up to 256 rows when Lk is short (fewer
// than 256 keys), where 4 small GEMMs cost a few per cent; longer Lk keeps one GEMM.
constexpr int64_t kRows = 64;

// acc += a^T b, a (c, Lk), b (c, D): partial sums over blocks of kRows rows, added pairwise.
// One GEMM over c rows accumulates them in sequence: dV of a single key summed over many
// query rows was up to 12x less accurate than PyTorch's and missed the tolerance rule
// (issue 16).
void add_at_b_pairwise(at::Tensor acc, const at::Tensor& a, const at::Tensor& b,
                       at::Tensor parts) {
  const int64_t c = a.size(0), nb = (c + kRows - 1) / kRows;
  if (nb == 1) {
    acc.addmm_(a.t(), b);
    return;
  }
  for (int64_t i = 0; i < nb; ++i) {
    const int64_t r0 = i * kRows, n = std::min(kRows, c - r0);
    at::Tensor pi = parts.select(0, i);
    at::mm_out(pi, a.narrow(0, r0, n).t(), b.narrow(0, r0, n));
  }
  for (int64_t w = 1; w < nb; w *= 2)
    for (int64_t i = 0; i + w < nb; i += 2 * w) parts.select(0, i).add_(parts.select(0, i + w));
  acc.add_(parts.select(0, 0));
}

// Where a unit's rows sit, for the dropout mask: stacked row m0 + r of kv head hk of sample b
// is query head hk * g + (m0 + r) / lq, row (m0 + r) % lq.
struct DropRows {
  const Dropout* drop;  // nullptr: no dropout
  int64_t b, hk, g, lq, m0;
};

// z (c, Lk) = the dropout factor of stacked rows [m0, m0 + c) of the unit
void drop_factors(const DropRows& dr, int64_t m0, int64_t c, at::Tensor z) {
  const int64_t Lk = z.size(1);
  int64_t hcur = -1;
  uint32_t kh = 0;
  for (int64_t r = 0; r < c; ++r) {
    const int64_t m = dr.m0 + m0 + r, h = dr.hk * dr.g + m / dr.lq, i = m % dr.lq;
    if (h != hcur) kh = dr.drop->kh(dr.b, h), hcur = h;
    const uint32_t kr = Dropout::kr(kh, i);
    if (z.scalar_type() == at::kDouble)
      dr.drop->factor(z.data_ptr<double>() + r * Lk, 0, Lk, kr);
    else
      dr.drop->factor(z.data_ptr<float>() + r * Lk, 0, Lk, kr);
  }
}

void unit_backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& dout, double scale, double softcap, at::Tensor dq,
                   at::Tensor dk, at::Tensor dv, const DropRows& drop) {
  // q/dout/dq (M, D) rows of one kv head's stacked queries; k/v/dk/dv (Lk, D)
  const int64_t M = q.size(0), Lk = k.size(0), D = q.size(1);
  const int64_t C = std::max<int64_t>(16, std::min<int64_t>(256, (1 << 16) / std::max<int64_t>(1, Lk)));
  at::Tensor kt = k.t(), vt = v.t();
  // chunk buffers allocated once per unit (fresh pages are costly to fault in)
  at::Tensor sbuf = at::empty({C, Lk}, k.options()), pbuf = at::empty({C, Lk}, k.options());
  at::Tensor dsbuf = at::empty({C, Lk}, k.options());
  at::Tensor gbuf = softcap != 0.0 ? at::empty({C, Lk}, k.options()) : at::Tensor();
  at::Tensor parts = at::empty({(C + kRows - 1) / kRows, Lk, D}, k.options());
  // dropout: the factor Z and P∘Z of a chunk
  at::Tensor zbuf = drop.drop ? at::empty({C, Lk}, k.options()) : at::Tensor();
  at::Tensor pzbuf = drop.drop ? at::empty({C, Lk}, k.options()) : at::Tensor();
  for (int64_t m0 = 0; m0 < M; m0 += C) {
    const int64_t c = std::min(C, M - m0);
    at::Tensor qc = q.narrow(0, m0, c), doc = dout.narrow(0, m0, c);
    at::Tensor s = sbuf.narrow(0, 0, c), p = pbuf.narrow(0, 0, c), ds = dsbuf.narrow(0, 0, c);
    if (softcap != 0.0) {  // s = c * t, t = tanh(scale * q k^T / c); g = 1 - t^2
      at::mm_out(s, qc, kt).mul_(scale / softcap).tanh_();
      at::Tensor gc = gbuf.narrow(0, 0, c);
      at::mul_out(gc, s, s).neg_().add_(1.0);
      s.mul_(softcap);
    } else {
      at::mm_out(s, qc, kt).mul_(scale);
    }
    at::_softmax_out(p, s, -1, false);  // (c, Lk)
    if (drop.drop) {  // dV = (P∘Z)^T dO; dP∘Z below
      at::Tensor z = zbuf.narrow(0, 0, c), pz = pzbuf.narrow(0, 0, c);
      drop_factors(drop, m0, c, z);
      at::mul_out(pz, p, z);
      add_at_b_pairwise(dv, pz, doc, parts);
      at::mm_out(ds, doc, vt).mul_(z);                               // dP∘Z (c, Lk)
    } else {
      add_at_b_pairwise(dv, p, doc, parts);
      at::mm_out(ds, doc, vt);                                       // dP (c, Lk)
    }
    at::Tensor delta = at::mul_out(s, p, ds).sum(-1, true);  // (c, 1); s is free now
    ds.sub_(delta).mul_(p).mul_(scale);
    if (softcap != 0.0) ds.mul_(gbuf.narrow(0, 0, c));
    at::Tensor dqc = dq.narrow(0, m0, c);
    if (dqc.is_contiguous()) {
      at::mm_out(dqc, ds, k);
    } else {
      dqc.copy_(at::mm(ds, k));
    }
    add_at_b_pairwise(dk, ds, qc, parts);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_attention_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const c10::optional<at::Tensor>& seqlens_q,
    const c10::optional<at::Tensor>& seqlens_k, double scale, double softcap, double dropout_p,
    const c10::optional<at::Tensor>& dropout_seed) {
  at::AutoDispatchBelowADInplaceOrView no_autograd;  // inputs may require grad; no graph here
  check_inputs(q, k, v);
  MMCORE_CHECK_ARG(std::isfinite(softcap) && softcap >= 0.0, "softcap",
                   "must be a finite float > 0, or 0 for none; got " + std::to_string(softcap));
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
  const Dropout drop = make_dropout(dropout_p, dropout_seed, Sk);
  at::Tensor dq = at::zeros({B, Hq, Sq, D}, q.options());
  at::Tensor dk = at::zeros({B, Hkv, Sk, D}, k.options());
  at::Tensor dv = at::zeros({B, Hkv, Sk, D}, v.options());
  if (dq.numel() == 0 || dk.numel() == 0) return {dq, dk, dv};
  // compute dtype: fp32 (fp64 for fp64 inputs)
  const at::ScalarType acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto f32 = q.options().dtype(acc);
  // per sample: fp32 (Hkv, g*Lq, D) stacked views / copies (a sample with Lk = 1 has a
  // constant softmax: dQ = dK = 0 exactly, only dV is computed)
  std::vector<at::Tensor> Q(B), DO(B), K(B), V(B), GQ(B);
  int64_t active = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t lq = Lq[b], lk = Lk[b];
    if (lq == 0 || lk == 0) continue;
    ++active;
    auto grp = [&](const at::Tensor& t) {
      return t.select(0, b).narrow(1, 0, lq).to(acc).reshape({Hkv, g * lq, D});
    };
    Q[b] = grp(q);
    DO[b] = grp(dout);
    K[b] = k.select(0, b).narrow(1, 0, lk).to(acc);
    V[b] = v.select(0, b).narrow(1, 0, lk).to(acc);
    // dQ straight into the output when it is fp32 and the stacked view exists
    const bool direct = q.scalar_type() == acc && lq == Sq && lk > 1;
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
      const DropRows dr{drop.on ? &drop : nullptr, w.b, w.h, g, Lq[w.b], w.m0};
      unit_backward(rows(Q[w.b]), K[w.b].select(0, w.h), V[w.b].select(0, w.h),
                    rows(DO[w.b]), scale, softcap, rows(GQ[w.b]), PK[u], PV[u], dr);
    }
  });
  // fixed-order reduction of the partials; dQ / dK stay 0 for a single key (see above)
  for (int64_t b = 0; b < B; ++b) {
    if (!Q[b].defined()) continue;
    const int64_t lq = Lq[b], lk = Lk[b], split = count[b];
    const bool direct = q.scalar_type() == acc && lq == Sq && lk > 1;
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
        "float scale, float softcap=0.0, float dropout_p=0.0, Tensor? dropout_seed=None) "
        "-> (Tensor, Tensor)");
  m.def("cross_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor? seqlens_q, Tensor? seqlens_k, float scale, float softcap=0.0, "
        "float dropout_p=0.0, Tensor? dropout_seed=None) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mmcore_C, CPU, m) {
  m.impl("cross_attention_fwd", &mmcore::cross_attention_fwd_cpu);
  m.impl("cross_attention_bwd", &mmcore::cross_attention_bwd_cpu);
}
