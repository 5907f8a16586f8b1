// window_attention on the CPU: blocked, multi-threaded, fp32 compute for every input dtype.
//
// allowed(i, j) (docs/design.md), with p = i + Lk_b - Lq_b (bottom-right alignment):
//   i < Lq_b and j < Lk_b and (p - left <= j <= p + right
//                              or ((j < G or p < G) and (not causal or j <= p)))
// For one query row the allowed keys are the union of two intervals:
//   global query row (p < G):  [0, causal ? p + 1 : Lk)
//   other rows:                [0, min(G, Lk))  and  [max(0, p - left), min(Lk, p + right + 1))
// (p >= G makes the causal test of the global keys automatic).
// Bounds mode (key_lo / key_hi, issue 26) replaces the pattern: row i sees the one interval
// [clamp(lo_i, 0, Lk), clamp(hi_i, 0, Lk)) (empty when lo >= hi), no alignment offset; a query
// block visits [min lo, max hi) over its rows, a key block the rows from the first to the
// last that meet it.  key_mask (B, Sk) is AND-ed into allowed() in both modes: masked keys get
// score -inf inside the same vector pass that scales the row (vec_table.h: score_max), and
// count as not allowed wherever allowed() / covers() / row_count() decide (non-finite V or K
// of a masked key never reaches a row).  softcap c: s = c * tanh(scale * q.k / c) in that
// pass too (a vectorised tanh from exp, vec_kernels.h); the backward keeps 1 - tanh^2 per
// score (one extra tile) and multiplies dS by it.  With all three off the row loops are the
// plain ones (scale_max, dsoftmax): the choice is made once per row segment, not per score.
//
// Forward: one task per (b, query head, block of BQ query rows); the block visits only the
// keys of its window plus the global prefix (two disjoint key segments, or one when they
// touch), in chunks of at most KC keys with an online softmax.  Tile products run on the
// register-blocked kernel of the vector build (forward S = Q K^T from a transposed copy of K,
// O += P V, and dQ += dS K; see gemm_path) or the BLAS torch links (sgemm_, else at::mm); the
// fp32 row loops (softmax, scaling, row sums, dS, conversions, non-finite scans) run on the
// vector build of ATen's CPU capability (vec_table.h).
// Global query rows form their own blocks and visit every key.
//
// Backward (deterministic, no atomics):
//   pass 1, one task per (b, query head, query block): delta = rowsum(P * dP), dQ.
//   pass 2, one task per (b, kv head, key block): dK, dV summed over the query heads of the
//   group and over exactly the query rows that can see the block's keys.
// Attention dropout (dropout_p > 0, a seed; common.h: Dropout): the reference's counter-hash
// mask, regenerated per key chunk from kc(j) (per call) and kr(b, h, i) (per row), never
// stored.  Forward: P of the chunk is masked after its exp (l, m and lse stay the undropped
// softmax's) and the row is scaled by 1 / (1 - p) with 1 / l at the end.  Backward: dP is
// multiplied by Z = keep / (1 - p), delta = rowsum(P * dP∘Z) (= rowsum(dO * O)), dS = P (dP∘Z
// - delta), and dV takes P∘Z.  Without dropout none of this runs (one test per row).
// Tasks are handed out dynamically (an atomic counter) to the at::parallel_for workers.
// Scratch memory is O(BQ * KC) per worker; no (Sq, Sk) buffer exists.
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <string>
#include <limits>
#include <vector>

#if defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define MMCORE_WEAK_BLAS 1  // call the BLAS symbols torch exports, when it does
#endif

#include "common.h"
#include "vec_table.h"

namespace mmcore {
namespace window {

constexpr int64_t BQ = 64;    // query rows per forward / dq task
constexpr int64_t BK = 64;    // keys per dk/dv task
constexpr int64_t KC = 1024;  // keys per chunk of the online softmax
constexpr int64_t QC = 256;   // query rows per chunk of a dk/dv task

// ------------------------------------------------------------------ row math (fp32 / fp64)

// s[0:n) *= scale; returns max (-inf when n == 0; NaN when any s[j] is NaN).
template <typename acc_t>
acc_t scale_max(acc_t* s, int64_t n, acc_t scale) {
  if constexpr (std::is_same_v<acc_t, float>) return vec::vec().scale_max(s, n, scale);
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  bool nan = false;
  for (int64_t j = 0; j < n; ++j) {
    s[j] *= scale;
    m = std::max(m, s[j]);
    nan = nan || std::isnan(s[j]);
  }
  return nan ? std::numeric_limits<acc_t>::quiet_NaN() : m;
}

// Scores with a softcap c (0 = off) and / or a key mask km (nullptr = none), vec_table.h's
// score_max: s = c != 0 ? c * tanh(a * s) : a * s, -inf where km is false; g (optional, with
// c != 0) = 1 - tanh^2.  Returns the max as scale_max.  The features-off path is scale_max.
template <typename acc_t>
acc_t score_max(acc_t* s, acc_t* g, const bool* km, int64_t n, acc_t a, acc_t c) {
  if constexpr (std::is_same_v<acc_t, float>) return vec::vec().score_max(s, g, km, n, a, c);
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  acc_t m = ninf;
  bool nan = false;
  for (int64_t j = 0; j < n; ++j) {
    acc_t x = s[j] * a;
    if (c != acc_t(0)) {
      const acc_t t = std::tanh(x);
      if (g != nullptr) g[j] = acc_t(1) - t * t;
      x = c * t;
    }
    if (km != nullptr && !km[j]) x = ninf;
    s[j] = x;
    m = std::max(m, x);
    nan = nan || std::isnan(x);
  }
  return nan ? std::numeric_limits<acc_t>::quiet_NaN() : m;
}

// max that keeps a NaN of either side (std::max drops a NaN second argument).
template <typename acc_t>
inline acc_t nan_max(acc_t a, acc_t b) {
  return std::isnan(a) || std::isnan(b) ? std::numeric_limits<acc_t>::quiet_NaN()
                                        : std::max(a, b);
}

// s[0:n) = exp(s - m) (-inf -> 0); returns the sum.  m must be finite.
template <typename acc_t>
acc_t exp_sum(acc_t* s, int64_t n, acc_t m) {
  if constexpr (std::is_same_v<acc_t, float>) return vec::vec().exp_sum(s, n, m);
  acc_t sum = 0;
  for (int64_t j = 0; j < n; ++j) {
    s[j] = std::exp(s[j] - m);
    sum += s[j];
  }
  return sum;
}

// whether every entry of the (rows x cols, row stride ld) matrix x is finite
template <typename acc_t>
bool all_finite(const acc_t* x, int64_t rows, int64_t cols, int64_t ld) {
  if constexpr (std::is_same_v<acc_t, float>) {
    if (ld == cols || rows == 1) return vec::vec().all_finite(x, rows * cols);
    for (int64_t r = 0; r < rows; ++r)
      if (!vec::vec().all_finite(x + r * ld, cols)) return false;
    return true;
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c)
      if (!std::isfinite(x[r * ld + c])) return false;
  return true;
}

// x[0:n) *= a
template <typename acc_t>
void scale_row(acc_t* x, int64_t n, acc_t a) {
  if constexpr (std::is_same_v<acc_t, float>) return vec::vec().scale(x, n, a);
  for (int64_t j = 0; j < n; ++j) x[j] *= a;
}

// sum a[j] * b[j]
template <typename acc_t>
acc_t dot(const acc_t* a, const acc_t* b, int64_t n) {
  if constexpr (std::is_same_v<acc_t, float>) return vec::vec().dot(a, b, n);
  acc_t sum = 0;
  for (int64_t j = 0; j < n; ++j) sum += a[j] * b[j];
  return sum;
}

// out[j] = p[j] * (dp[j] - delta) * scale (out may alias p or dp)
template <typename acc_t>
void dsoftmax(acc_t* out, const acc_t* p, const acc_t* dp, int64_t n, acc_t delta, acc_t scale) {
  if constexpr (std::is_same_v<acc_t, float>) return vec::vec().dsoftmax(out, p, dp, n, delta, scale);
  for (int64_t j = 0; j < n; ++j) out[j] = p[j] * (dp[j] - delta) * scale;
}

// out[j] = p[j] * (dp[j] - delta) * g[j] * scale: dS through a softcap (out may alias)
template <typename acc_t>
void dsoftmax_g(acc_t* out, const acc_t* p, const acc_t* dp, const acc_t* g, int64_t n,
                acc_t delta, acc_t scale) {
  if constexpr (std::is_same_v<acc_t, float>)
    return vec::vec().dsoftmax_g(out, p, dp, g, n, delta, scale);
  for (int64_t j = 0; j < n; ++j) out[j] = p[j] * (dp[j] - delta) * g[j] * scale;
}

// y[0:n) += a * x
template <typename acc_t>
void axpy(acc_t* y, const acc_t* x, int64_t n, acc_t a) {
  if constexpr (std::is_same_v<acc_t, float>) return vec::vec().axpy(y, x, n, a);
  for (int64_t j = 0; j < n; ++j) y[j] += a * x[j];
}

// dst[0:n) = acc_t(src)
template <typename scalar_t, typename acc_t>
void load_row(const scalar_t* src, acc_t* dst, int64_t n) {
  if constexpr (std::is_same_v<acc_t, float> && std::is_same_v<scalar_t, at::BFloat16>)
    return vec::vec().load_bf16(src, dst, n);
  if constexpr (std::is_same_v<acc_t, float> && std::is_same_v<scalar_t, at::Half>)
    return vec::vec().load_half(src, dst, n);
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<acc_t>(src[j]);
}

// dst[0:n) = scalar_t(src * mul)
template <typename scalar_t, typename acc_t>
void store_row(const acc_t* src, scalar_t* dst, int64_t n, acc_t mul) {
  if constexpr (std::is_same_v<acc_t, float> && std::is_same_v<scalar_t, float>)
    return vec::vec().store_f32(src, dst, n, mul);
  if constexpr (std::is_same_v<acc_t, float> && std::is_same_v<scalar_t, at::BFloat16>)
    return vec::vec().store_bf16(src, dst, n, mul);
  if constexpr (std::is_same_v<acc_t, float> && std::is_same_v<scalar_t, at::Half>)
    return vec::vec().store_half(src, dst, n, mul);
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<scalar_t>(src[j] * mul);
}

// ------------------------------------------------------------------ GEMM on row-major tiles

// The BLAS that torch links (MKL / OpenBLAS) usually exports the Fortran symbols; they are
// weak here, so a torch without them still loads mmcore._C and takes the at::mm path.
#ifdef MMCORE_WEAK_BLAS
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*,
            const float*, const int*, const float*, const int*, const float*, float*,
            const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*,
            const double*, const int*, const double*, const int*, const double*, double*,
            const int*) __attribute__((weak));
}
#endif

// MMCORE_CPU_GEMM picks the tile products: "aten" forces the at::mm path (tests use it to
// cover torch builds without exported BLAS symbols), "blas" the BLAS torch links, "vec" the
// register-blocked kernel of the vector build (vec_table.h: gemm_nn) wherever a product's
// shape allows it.  Unset: "vec" on the AVX2 and AVX-512 builds (at these tile shapes it
// measured above MKL on both: MKL keeps to AVX2 on AMD CPUs; docs/cpu-kernels.md), "blas" on
// the default / NEON builds.
enum class GemmPath { kAten, kBlas, kVec };

inline GemmPath gemm_path() {
  static const GemmPath path = [] {
    const char* e = std::getenv("MMCORE_CPU_GEMM");
    const std::string v = e == nullptr ? "" : e;
    if (v == "aten") return GemmPath::kAten;
    if (v == "blas") return GemmPath::kBlas;
    if (v == "vec") return GemmPath::kVec;
    const std::string isa = vec::vec().isa;
    return isa == "avx512" || isa == "avx2" ? GemmPath::kVec : GemmPath::kBlas;
  }();
  return path;
}

inline bool force_aten_gemm() { return gemm_path() == GemmPath::kAten; }

// Whether the vec kernel computes products with N (columns of C) = n, for acc_t.
template <typename acc_t>
bool vec_gemm(int64_t n) {
  if constexpr (std::is_same_v<acc_t, float>)
    return gemm_path() == GemmPath::kVec && n % vec::vec().lanes == 0;
  return false;
}

// C (M x N, ldc) = alpha * op(A) op(B) + beta * C, all row-major; op(A) is M x K, op(B) K x N.
template <typename acc_t>
void gemm_rm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, acc_t alpha, const acc_t* A,
             int64_t lda, const acc_t* B, int64_t ldb, acc_t beta, acc_t* C, int64_t ldc) {
#ifdef MMCORE_WEAK_BLAS
  constexpr int64_t kMax = std::numeric_limits<int>::max();
  const bool small = std::max({M, N, K, lda, ldb, ldc}) <= kMax;
  auto blas = std::is_same_v<acc_t, float> ? reinterpret_cast<void*>(&sgemm_)
                                           : reinterpret_cast<void*>(&dgemm_);
  if (small && blas != nullptr && !force_aten_gemm()) {
    // row-major C = op(A) op(B)  <=>  column-major C^T = op(B)^T op(A)^T
    const char tA = tb ? 'T' : 'N', tB = ta ? 'T' : 'N';
    const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
    const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
    if constexpr (std::is_same_v<acc_t, float>)
      sgemm_(&tA, &tB, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
    else
      dgemm_(&tA, &tB, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
    return;
  }
#endif
  const auto opt = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
  at::Tensor a = ta ? at::from_blob(const_cast<acc_t*>(A), {K, M}, {lda, 1}, opt).t()
                    : at::from_blob(const_cast<acc_t*>(A), {M, K}, {lda, 1}, opt);
  at::Tensor b = tb ? at::from_blob(const_cast<acc_t*>(B), {N, K}, {ldb, 1}, opt).t()
                    : at::from_blob(const_cast<acc_t*>(B), {K, N}, {ldb, 1}, opt);
  at::Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, opt);
  if (beta == acc_t(0))
    at::mm_out(c, a, b);
  else
    c.addmm_(a, b, beta, alpha);
  if (beta == acc_t(0) && alpha != acc_t(1)) c.mul_(alpha);
}

// A (rows x cols) tile of a tensor with row stride ld, in acc_t: the tensor's own memory when
// it already is acc_t with a usable stride, else converted into buf (ld = cols).
template <typename scalar_t, typename acc_t>
const acc_t* tile(const scalar_t* src, int64_t ld, int64_t rows, int64_t cols, acc_t* buf,
                  int64_t* ld_out) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (ld >= cols || rows <= 1) {
      *ld_out = std::max(ld, cols);
      return src;
    }
  }
  for (int64_t r = 0; r < rows; ++r) load_row(src + r * ld, buf + r * cols, cols);
  *ld_out = cols;
  return buf;
}

// ------------------------------------------------------------------ the mask

struct Problem {
  int64_t B, Hq, Hkv, Sq, Sk, D, left, right, G;
  bool causal;
  double scale;
  double softcap = 0.0;  // c of s = c * tanh(s / c); 0 = off
  std::vector<int64_t> Lq, Lk;
  // bounds mode (lo != nullptr): row i of sample b sees keys [lo[b, i], hi[b, i]) (int32
  // (B, Sq) each, clamped to [0, Lk_b]) instead of the window / causal / global pattern
  const int32_t *lo = nullptr, *hi = nullptr;
  // key_mask (B, Sk) (nullptr = none), AND-ed into allowed() in both modes; kc (B, Sk + 1):
  // kc[b, j] = how many keys of [0, j) key_mask keeps (interval counts in O(1))
  const bool* km = nullptr;
  std::vector<int32_t> kc;
  Dropout drop;  // attention dropout (drop.on: dropout_p > 0)
};

struct Sample {
  int64_t b, Lq, Lk, off, ig, gk;  // ig: rows [0, ig) are global query rows; gk = min(G, Lk)
  const bool* km;     // this sample's key_mask row, or nullptr
  const int32_t* kc;  // its running counts (with km)
};

inline Sample sample(const Problem& P, int64_t b) {
  Sample s;
  s.b = b;
  s.Lq = P.Lq[b];
  s.Lk = P.Lk[b];
  s.off = s.Lk - s.Lq;
  s.ig = std::min(s.Lq, std::max<int64_t>(0, P.G - s.off));
  s.gk = std::min(P.G, s.Lk);
  s.km = P.km == nullptr ? nullptr : P.km + b * P.Sk;
  s.kc = P.km == nullptr ? nullptr : P.kc.data() + b * (P.Sk + 1);
  return s;
}

// The keys of query row i: ([0, ghi) U [wlo, whi)) and, with a key mask, km[j].
struct RowKeys {
  int64_t ghi, wlo, whi;
  const bool* km;     // the sample's key_mask row, or nullptr
  const int32_t* kc;  // its running counts
};

inline RowKeys row_keys(const Problem& P, const Sample& s, int64_t i) {
  const int64_t p = i + s.off;
  RowKeys r;
  r.km = s.km;
  r.kc = s.kc;
  if (P.lo != nullptr) {  // bounds mode: one interval, no alignment offset
    const int64_t at = s.b * P.Sq + i;
    r.ghi = 0;
    r.wlo = std::clamp<int64_t>(P.lo[at], 0, s.Lk);
    r.whi = std::max(r.wlo, std::clamp<int64_t>(P.hi[at], 0, s.Lk));
  } else if (p < P.G) {
    r.ghi = P.causal ? std::min(s.Lk, std::max<int64_t>(0, p + 1)) : s.Lk;
    r.wlo = r.whi = 0;
  } else {
    r.ghi = s.gk;
    r.wlo = P.left < 0 ? 0 : std::max<int64_t>(0, p - P.left);
    r.whi = P.right < 0 ? s.Lk : std::min(s.Lk, p + P.right + 1);
    r.whi = std::max(r.whi, r.wlo);
  }
  return r;
}

// How many keys of [a, b) the key mask keeps (b - a without one).
inline int64_t kept(const RowKeys& rk, int64_t a, int64_t b) {
  if (b <= a) return 0;
  return rk.kc == nullptr ? b - a : rk.kc[b] - rk.kc[a];
}

// How many keys row keys rk hold: |[0, ghi) U [wlo, whi)| (and kept by the key mask).
inline int64_t row_count(const RowKeys& rk) {
  return kept(rk, 0, rk.ghi) + kept(rk, rk.wlo, rk.whi) -
         kept(rk, rk.wlo, std::min(rk.ghi, rk.whi));
}

// The score parameters: scale, the softcap c (0 = off) and, with one, a = scale / c.
template <typename acc_t>
struct Scores {
  acc_t scale, cap, a;
  explicit Scores(const Problem& P)
      : scale(static_cast<acc_t>(P.scale)),
        cap(static_cast<acc_t>(P.softcap)),
        a(P.softcap != 0.0 ? static_cast<acc_t>(P.scale / P.softcap) : acc_t(0)) {}
};

// The intervals of rk clipped to the chunk of keys [c0, c0 + n), in chunk coordinates: one
// [a0, a1) (returns 1, b0 = b1 = a1) or [a0, a1) and [b0, b1) with a1 < b0 (returns 2).
inline int chunk_intervals(const RowKeys& rk, int64_t c0, int64_t n, int64_t* iv) {
  int64_t a0 = 0, a1 = std::clamp<int64_t>(rk.ghi - c0, 0, n);
  int64_t b0 = std::clamp<int64_t>(rk.wlo - c0, 0, n), b1 = std::clamp<int64_t>(rk.whi - c0, 0, n);
  if (a1 <= a0) a0 = a1 = 0;
  if (b1 <= b0) b0 = b1 = a1;
  if (b0 <= a1) {  // one interval [lo, hi)
    iv[0] = a1 > a0 ? a0 : b0;
    iv[1] = std::max(a1, b1);
    return 1;
  }
  iv[0] = a0, iv[1] = a1, iv[2] = b0, iv[3] = b1;
  return 2;
}

// Masks row `s` holding keys [c0, c0 + n) of query row with keys rk: masked entries -> -inf,
// allowed ones scaled (and capped, with a softcap; g (optional) <- the cap's derivative,
// 0 outside the intervals).  Returns the max over the allowed entries (-inf if none).
template <typename acc_t>
acc_t mask_scale_max(acc_t* s, acc_t* g, int64_t c0, int64_t n, const RowKeys& rk,
                     const Scores<acc_t>& sc) {
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  int64_t iv[4];
  const int niv = chunk_intervals(rk, c0, n, iv);
  const bool plain = sc.cap == acc_t(0) && rk.km == nullptr;  // the features-off path
  auto seg = [&](int64_t lo, int64_t hi) {
    if (plain) return scale_max(s + lo, hi - lo, sc.scale);
    return score_max(s + lo, g == nullptr ? nullptr : g + lo,
                     rk.km == nullptr ? nullptr : rk.km + c0 + lo, hi - lo,
                     sc.cap != acc_t(0) ? sc.a : sc.scale, sc.cap);
  };
  auto fill = [&](int64_t lo, int64_t hi) {
    std::fill(s + lo, s + hi, ninf);
    if (g != nullptr) std::fill(g + lo, g + hi, acc_t(0));
  };
  if (niv == 1) {
    fill(0, iv[0]);
    fill(iv[1], n);
    return seg(iv[0], iv[1]);
  }
  fill(iv[1], iv[2]);
  fill(iv[3], n);
  acc_t m1 = seg(iv[0], iv[1]);
  acc_t m2 = seg(iv[2], iv[3]);
  return nan_max(m1, m2);
}

// Whether key j (absolute) is allowed for a row with keys rk.
inline bool allowed(const RowKeys& rk, int64_t j) {
  return (j < rk.ghi || (j >= rk.wlo && j < rk.whi)) && (rk.km == nullptr || rk.km[j]);
}

// Whether a row with keys rk sees every key of [c0, c1).
inline bool covers(const RowKeys& rk, int64_t c0, int64_t c1) {
  if (kept(rk, c0, c1) != c1 - c0) return false;
  if (rk.wlo <= rk.ghi) return c1 <= std::max(rk.ghi, rk.whi);  // one interval [0, .)
  return c1 <= rk.ghi || (c0 >= rk.wlo && c1 <= rk.whi);
}

// x[0:n) *= z[0:n) (the dropout factor of a row in the backward: a dropped NaN stays NaN, as
// in the reference's dP * Z)
template <typename acc_t>
void mul_row(acc_t* __restrict x, const acc_t* __restrict z, int64_t n) {
  for (int64_t j = 0; j < n; ++j) x[j] *= z[j];
}

// Zeroes the entries of row `s` (keys [c0, c0 + n)) that rk does not allow.
template <typename acc_t>
void zero_masked(acc_t* s, int64_t c0, int64_t n, const RowKeys& rk) {
  int64_t iv[4];
  const int niv = chunk_intervals(rk, c0, n, iv);
  if (niv == 1) {
    std::fill(s, s + iv[0], acc_t(0));
    std::fill(s + iv[1], s + n, acc_t(0));
  } else {
    std::fill(s + iv[1], s + iv[2], acc_t(0));
    std::fill(s + iv[3], s + n, acc_t(0));
  }
  if (rk.km == nullptr) return;
  const bool* km = rk.km + c0;
  for (int k = 0; k < 2 * niv; k += 2)
    for (int64_t x = iv[k]; x < iv[k + 1]; ++x) s[x] = km[x] ? s[x] : acc_t(0);  // a select
}

// C (M x N, ldc) += op(A) B, with op(A) M x K (A stored K x M when ta) and B K x N, where
// op(A)[i][k] is 0 wherever ok(i, k) is false.  Such a zero must not meet a non-finite value
// of B's row k (0 * NaN = NaN would reach row i, which never sees k): B's non-finite rows are
// zeroed for the GEMM and their terms added for the allowed (i, k) only.  With every pair
// allowed (all_ok) it is the plain GEMM.
template <typename acc_t, typename Ok>
void gemm_acc_masked(bool ta, int64_t M, int64_t N, int64_t K, const acc_t* A, int64_t lda,
                     const acc_t* B, int64_t ldb, acc_t* C, int64_t ldc, bool all_ok, Ok ok) {
  std::vector<int64_t> bad;
  if (!all_ok && !all_finite(B, K, N, ldb))
    for (int64_t k = 0; k < K; ++k)
      if (!all_finite(B + k * ldb, 1, N, ldb)) bad.push_back(k);
  if (bad.empty()) {
    if constexpr (std::is_same_v<acc_t, float>) {
      if (!ta && vec_gemm<acc_t>(N)) return vec::vec().gemm_nn(M, N, K, A, lda, B, ldb, C, ldc, true);
    }
    gemm_rm<acc_t>(ta, false, M, N, K, acc_t(1), A, lda, B, ldb, acc_t(1), C, ldc);
    return;
  }
  std::vector<acc_t> clean(static_cast<size_t>(K * N));
  for (int64_t k = 0; k < K; ++k) std::copy(B + k * ldb, B + k * ldb + N, clean.data() + k * N);
  for (int64_t k : bad) std::fill(clean.data() + k * N, clean.data() + (k + 1) * N, acc_t(0));
  gemm_rm<acc_t>(ta, false, M, N, K, acc_t(1), A, lda, clean.data(), N, acc_t(1), C, ldc);
  for (int64_t k : bad)
    for (int64_t i = 0; i < M; ++i) {
      if (!ok(i, k)) continue;
      const acc_t a = ta ? A[k * lda + i] : A[i * lda + k];
      axpy(C + i * ldc, B + k * ldb, N, a);
    }
}

struct Seg {
  int64_t lo, hi;
};

// Key segments (disjoint, ascending) that a block of query rows [i0, i1) needs.  Blocks never
// mix global and non-global rows.
// Bounds mode: one segment, [min lo, max hi) over the block's rows that see some key.
inline int key_segments(const Problem& P, const Sample& s, int64_t i0, int64_t i1, Seg* out) {
  if (P.lo != nullptr) {
    int64_t lo = s.Lk, hi = 0;
    for (int64_t i = i0; i < i1; ++i) {
      const RowKeys rk = row_keys(P, s, i);
      if (rk.whi > rk.wlo) lo = std::min(lo, rk.wlo), hi = std::max(hi, rk.whi);
    }
    out[0] = {lo, hi};
    return hi > lo ? 1 : 0;
  }
  if (i0 < s.ig) {  // global rows
    const int64_t hi = row_keys(P, s, i1 - 1).ghi;
    out[0] = {0, hi};
    return hi > 0 ? 1 : 0;
  }
  const RowKeys r0 = row_keys(P, s, i0), r1 = row_keys(P, s, i1 - 1);
  const int64_t lo = r0.wlo, hi = std::max(r1.whi, lo);
  if (hi <= lo) {
    out[0] = {0, s.gk};
    return s.gk > 0 ? 1 : 0;
  }
  if (lo <= s.gk) {
    out[0] = {0, std::max(hi, s.gk)};
    return 1;
  }
  int n = 0;
  if (s.gk > 0) out[n++] = {0, s.gk};
  out[n++] = {lo, hi};
  return n;
}

// Query rows (disjoint, ascending) that can see some key of [j0, j1) (a key block that never
// mixes global and non-global keys).
// Bounds mode: one segment, from the first to the last row whose keys meet [j0, j1).
inline int query_segments(const Problem& P, const Sample& s, int64_t j0, int64_t j1, Seg* out) {
  if (P.lo != nullptr) {
    int64_t first = -1, last = -1;
    for (int64_t i = 0; i < s.Lq; ++i) {
      const RowKeys rk = row_keys(P, s, i);
      if (rk.wlo < j1 && rk.whi > j0 && rk.whi > rk.wlo) {
        if (first < 0) first = i;
        last = i;
      }
    }
    out[0] = {first, last + 1};
    return first >= 0 ? 1 : 0;
  }
  if (j0 < s.gk) {  // global keys: every row sees them (global rows subject to causal)
    int64_t lo = P.causal ? std::clamp<int64_t>(j0 - s.off, 0, s.Lq) : 0;
    lo = std::min(lo, s.ig);  // non-global rows see global keys regardless of causal
    out[0] = {lo, s.Lq};
    return s.Lq > lo ? 1 : 0;
  }
  int n = 0;
  // global rows: noncausal see all keys; causal see j <= p, i.e. i >= j0 - off
  const int64_t g0 = P.causal ? std::clamp<int64_t>(j0 - s.off, 0, s.ig) : 0;
  if (s.ig > g0) out[n++] = {g0, s.ig};
  // window rows: j - right <= p <= j + left
  int64_t w0 = P.right < 0 ? s.ig : std::max(s.ig, j0 - P.right - s.off);
  int64_t w1 = P.left < 0 ? s.Lq : std::min(s.Lq, j1 - 1 + P.left - s.off + 1);
  if (w1 > w0) out[n++] = {w0, w1};
  return n;
}

// ------------------------------------------------------------------ tasks

struct Block {
  int64_t b, i0, i1;  // rows [i0, i1) of sample b (or keys, for dk/dv blocks)
};

// Blocks of `step` rows over [0, split) and [split, L) of each sample: query rows (split at
// the global rows ig, L = Lq) or, with `keys`, key rows (split at the global keys gk, L = Lk).
std::vector<Block> blocks(const Problem& P, int64_t step, bool keys) {
  std::vector<Block> out;
  for (int64_t b = 0; b < P.B; ++b) {
    const Sample s = sample(P, b);
    const int64_t split = keys ? s.gk : s.ig, L = keys ? s.Lk : s.Lq;
    for (int64_t i0 = 0; i0 < split; i0 += step) out.push_back({b, i0, std::min(split, i0 + step)});
    for (int64_t i0 = split; i0 < L; i0 += step) out.push_back({b, i0, std::min(L, i0 + step)});
  }
  return out;
}

// Runs fn(task, worker_scratch_index) for tasks [0, n) on the intra-op pool, dynamically.
template <typename Init, typename F>
void run_tasks(int64_t n, Init init, F fn) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t nw = std::min<int64_t>(at::get_num_threads(), n);
  at::parallel_for(0, nw, 1, [&](int64_t w0, int64_t w1) {
    auto scratch = init();
    for (int64_t w = w0; w < w1; ++w)
      for (int64_t t; (t = next.fetch_add(1)) < n;) fn(t, scratch);
  });
}

// ------------------------------------------------------------------ forward

template <typename scalar_t, typename acc_t>
void forward_impl(const Problem& P, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  at::Tensor& out, at::Tensor& lse) {
  const int64_t D = P.D, g = P.Hq / P.Hkv;
  const scalar_t *qp = q.data_ptr<scalar_t>(), *kp = k.data_ptr<scalar_t>(),
                 *vp = v.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  float* lp = lse.data_ptr<float>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), qs2 = q.stride(2);
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2);
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1), vs2 = v.stride(2);
  const Scores<acc_t> sc(P);
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  const acc_t oscale = P.drop.on ? static_cast<acc_t>(P.drop.inv) : acc_t(1);  // 1 / (1 - p)

  // With the vec kernel (vec_gemm), S = Q K^T reads K^T: one transposed fp32 copy of K per
  // (b, kv head), (D, ldkt), made once up front and shared by every query block.  Its rows are
  // padded to whole vectors (ldkt >= Sk + lanes), so a chunk's product may run past its last key
  // into columns that are never read.
  const bool vk = vec_gemm<acc_t>(D);
  const int64_t lanes = vk ? vec::vec().lanes : 1;
  const int64_t ldkt = vk ? (P.Sk + 2 * lanes - 1) / lanes * lanes : 0;
  std::vector<acc_t> kt;
  if constexpr (std::is_same_v<acc_t, float>) {
    if (vk) {
      kt.assign(static_cast<size_t>(P.B * P.Hkv * D * ldkt), acc_t(0));
      constexpr int64_t kb = 256;  // keys per transposed block
      const int64_t nkb = (P.Sk + kb - 1) / kb;
      at::parallel_for(0, P.B * P.Hkv * nkb, 1, [&](int64_t t0, int64_t t1) {
        std::vector<acc_t> buf(kb * D);
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t bh = t / nkb, j0 = (t % nkb) * kb, nk = std::min(kb, P.Sk - j0);
          const int64_t b = bh / P.Hkv, hk = bh % P.Hkv;
          int64_t ld;
          const acc_t* K = tile<scalar_t, acc_t>(kp + b * ks0 + hk * ks1 + j0 * ks2, ks2, nk, D,
                                                 buf.data(), &ld);
          vec::vec().transpose(K, ld, nk, D, kt.data() + bh * D * ldkt + j0, ldkt);
        }
      });
    }
  }

  auto blks = blocks(P, BQ, /*keys=*/false);
  const int64_t ntask = static_cast<int64_t>(blks.size()) * P.Hq;
  struct Scratch {
    std::vector<acc_t> q, k, v, s, acc, m, l;
  };
  auto init = [&] {
    Scratch w;
    w.q.resize(BQ * D);
    w.k.resize(vk ? 0 : KC * D);
    w.v.resize(KC * D);
    w.s.resize(BQ * (KC + lanes));
    w.acc.resize(BQ * D);
    w.m.resize(BQ);
    w.l.resize(BQ);
    return w;
  };
  run_tasks(ntask, init, [&](int64_t t, Scratch& w) {
    const Block& blk = blks[t / P.Hq];
    const int64_t h = t % P.Hq, hk = h / g, b = blk.b;
    const Sample s = sample(P, b);
    const int64_t i0 = blk.i0, nq = blk.i1 - blk.i0;
    Seg segs[2];
    const int nseg = key_segments(P, s, i0, blk.i1, segs);
    int64_t ldq;
    const acc_t* Q = tile<scalar_t, acc_t>(qp + b * qs0 + h * qs1 + i0 * qs2, qs2, nq, D,
                                           w.q.data(), &ldq);
    acc_t *acc = w.acc.data(), *m = w.m.data(), *l = w.l.data(), *S = w.s.data();
    std::fill(acc, acc + nq * D, acc_t(0));
    std::fill(m, m + nq, ninf);
    std::fill(l, l + nq, acc_t(0));
    RowKeys rks[BQ];
    // rows whose scores met a NaN (2) or +inf (1): out NaN, lse NaN / +inf (IEEE softmax)
    int8_t bad[BQ] = {0};
    for (int64_t r = 0; r < nq; ++r) rks[r] = row_keys(P, s, i0 + r);
    uint32_t krs[BQ];  // the rows' dropout keys
    if (P.drop.on) {
      const uint32_t kh = P.drop.kh(b, h);
      for (int64_t r = 0; r < nq; ++r) krs[r] = Dropout::kr(kh, i0 + r);
    }
    for (int si = 0; si < nseg; ++si) {
      for (int64_t c0 = segs[si].lo; c0 < segs[si].hi; c0 += KC) {
        const int64_t n = std::min(KC, segs[si].hi - c0);
        const int64_t lds = (n + lanes - 1) / lanes * lanes;  // S's row stride
        int64_t ldv;
        const acc_t* V = tile<scalar_t, acc_t>(vp + b * vs0 + hk * vs1 + c0 * vs2, vs2, n, D,
                                               w.v.data(), &ldv);
        if constexpr (std::is_same_v<acc_t, float>) {
          if (vk)
            vec::vec().gemm_nn(nq, lds, D, Q, ldq, kt.data() + (b * P.Hkv + hk) * D * ldkt + c0,
                               ldkt, S, lds, false);
        }
        if (!vk) {
          int64_t ldk;
          const acc_t* K = tile<scalar_t, acc_t>(kp + b * ks0 + hk * ks1 + c0 * ks2, ks2, n, D,
                                                 w.k.data(), &ldk);
          gemm_rm<acc_t>(false, true, nq, n, D, acc_t(1), Q, ldq, K, ldk, acc_t(0), S, lds);
        }
        bool all_ok = true;
        for (int64_t r = 0; r < nq; ++r) {
          acc_t* sr = S + r * lds;
          all_ok = all_ok && covers(rks[r], c0, c0 + n);
          const acc_t mx = mask_scale_max<acc_t>(sr, nullptr, c0, n, rks[r], sc);
          if (mx == ninf || bad[r]) {
            if (bad[r] && std::isnan(mx)) bad[r] = 2;
            std::fill(sr, sr + n, acc_t(0));
            continue;
          }
          if (!(mx < std::numeric_limits<acc_t>::infinity())) {  // NaN or +inf score
            bad[r] = std::isnan(mx) ? 2 : 1;
            std::fill(sr, sr + n, acc_t(0));
            continue;
          }
          const acc_t mnew = std::max(m[r], mx);
          const acc_t alpha = m[r] == ninf ? acc_t(0) : std::exp(m[r] - mnew);
          const acc_t sum = exp_sum(sr, n, mnew);
          l[r] = l[r] * alpha + sum;
          m[r] = mnew;
          if (alpha != acc_t(1)) scale_row(acc + r * D, D, alpha);
          if (P.drop.on) P.drop.apply(sr, c0, n, krs[r], acc_t(1));  // after l: lse undropped
        }
        gemm_acc_masked<acc_t>(false, nq, D, n, S, lds, V, ldv, acc, D, all_ok,
                               [&](int64_t r, int64_t x) { return allowed(rks[r], c0 + x); });
      }
    }
    scalar_t* orow = op + ((b * P.Hq + h) * P.Sq + i0) * D;
    float* lrow = lp + (b * P.Hq + h) * P.Sq + i0;
    for (int64_t r = 0; r < nq; ++r) {
      if (bad[r]) {
        std::fill(orow + r * D, orow + (r + 1) * D,
                  static_cast<scalar_t>(std::numeric_limits<float>::quiet_NaN()));
        lrow[r] = bad[r] == 2 ? std::numeric_limits<float>::quiet_NaN()
                              : std::numeric_limits<float>::infinity();
      } else if (l[r] > acc_t(0)) {
        store_row(acc + r * D, orow + r * D, D, acc_t(1) / l[r] * oscale);
        lrow[r] = static_cast<float>(m[r] + std::log(l[r]));
      }  // else: the row sees no key; out stays 0, lse -inf
    }
  });
}

// ------------------------------------------------------------------ backward

template <typename scalar_t, typename acc_t>
void backward_impl(const Problem& P, const at::Tensor& dout, const at::Tensor& q,
                   const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                   const at::Tensor& lse, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  const int64_t D = P.D, g = P.Hq / P.Hkv;
  const scalar_t *qp = q.data_ptr<scalar_t>(), *kp = k.data_ptr<scalar_t>(),
                 *vp = v.data_ptr<scalar_t>(), *dop = dout.data_ptr<scalar_t>(),
                 *op = out.data_ptr<scalar_t>();
  const float* lp = lse.data_ptr<float>();
  scalar_t *dqp = dq.data_ptr<scalar_t>(), *dkp = dk.data_ptr<scalar_t>(),
           *dvp = dv.data_ptr<scalar_t>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), qs2 = q.stride(2);
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2);
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1), vs2 = v.stride(2);
  const int64_t ds0 = dout.stride(0), ds1 = dout.stride(1), ds2 = dout.stride(2);
  const int64_t os0 = out.stride(0), os1 = out.stride(1), os2 = out.stride(2);
  const int64_t ls0 = lse.stride(0), ls1 = lse.stride(1), ls2 = lse.stride(2);
  const Scores<acc_t> sc(P);
  const bool cap = P.softcap != 0.0;
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  // delta = rowsum(P * dP) = rowsum(dO * O), written by pass 1, read by pass 2: (B, Hq, Sq)
  std::vector<acc_t> delta(static_cast<size_t>(P.B * P.Hq * P.Sq), acc_t(0));

  // P = exp(scale * S - lse) on the allowed entries, 0 elsewhere (and for rows with lse -inf).
  // A row that sees a single key has P = 1 and dS = 0 exactly; recomputed scores would give
  // 1 +- ulp and dP - delta = +-ulp, i.e. nonzero gradients where the exact ones are 0.
  // Returns whether the row sees a single key (the caller then zeroes its dS).
  // A row whose lse is NaN / +inf (its scores met a NaN / +inf) gets P = NaN on its allowed
  // keys: its gradients reach exactly the keys it sees.
  // With a softcap, gr (n entries) receives the cap's derivative 1 - tanh^2 for dS.
  auto probs = [&](acc_t* sr, acc_t* gr, int64_t c0, int64_t n, const RowKeys& rk, acc_t L) {
    if (L == ninf) {
      std::fill(sr, sr + n, acc_t(0));
      return false;
    }
    if (!(L < std::numeric_limits<acc_t>::infinity())) {
      for (int64_t j = 0; j < n; ++j)
        sr[j] = allowed(rk, c0 + j) ? std::numeric_limits<acc_t>::quiet_NaN() : acc_t(0);
      return false;
    }
    mask_scale_max<acc_t>(sr, cap ? gr : nullptr, c0, n, rk, sc);
    if (row_count(rk) == 1) {
      for (int64_t j = 0; j < n; ++j) sr[j] = sr[j] == ninf ? acc_t(0) : acc_t(1);
      return true;
    }
    exp_sum(sr, n, L);
    return false;
  };
  // out = dS (scaled) from P, dP (and the cap's derivative g): out may alias p or dp
  auto dscores = [&](acc_t* out, const acc_t* p, const acc_t* dp, const acc_t* g, int64_t n,
                     acc_t dl) {
    if (cap)
      dsoftmax_g(out, p, dp, g, n, dl, sc.scale);
    else
      dsoftmax(out, p, dp, n, dl, sc.scale);
  };

  // ---- pass 1: delta and dQ over (b, query head, query block)
  {
    auto blks = blocks(P, BQ, /*keys=*/false);
    const int64_t ntask = static_cast<int64_t>(blks.size()) * P.Hq;
    struct Scratch {
      std::vector<acc_t> q, d, k, v, s, dp, acc, gs, z;  // gs: the cap's derivative (softcap)
    };
    auto init = [&] {
      Scratch w;
      w.q.resize(BQ * D);
      w.d.resize(BQ * D);
      w.k.resize(KC * D);
      w.v.resize(KC * D);
      w.s.resize(BQ * KC);
      w.dp.resize(BQ * KC);
      w.acc.resize(BQ * D);
      w.gs.resize(cap ? BQ * KC : 0);
      w.z.resize(P.drop.on ? KC : 0);
      return w;
    };
    run_tasks(ntask, init, [&](int64_t t, Scratch& w) {
      const Block& blk = blks[t / P.Hq];
      const int64_t h = t % P.Hq, hk = h / g, b = blk.b;
      const Sample s = sample(P, b);
      const int64_t i0 = blk.i0, nq = blk.i1 - blk.i0;
      int64_t ldq, ldd;
      const acc_t* Q = tile<scalar_t, acc_t>(qp + b * qs0 + h * qs1 + i0 * qs2, qs2, nq, D,
                                             w.q.data(), &ldq);
      const acc_t* dO = tile<scalar_t, acc_t>(dop + b * ds0 + h * ds1 + i0 * ds2, ds2, nq, D,
                                              w.d.data(), &ldd);
      acc_t* dl = delta.data() + (b * P.Hq + h) * P.Sq + i0;
      acc_t L[BQ];
      RowKeys rks[BQ];
      for (int64_t r = 0; r < nq; ++r) {
        L[r] = static_cast<acc_t>(lp[b * ls0 + h * ls1 + (i0 + r) * ls2]);
        rks[r] = row_keys(P, s, i0 + r);
      }
      uint32_t krs[BQ];  // the rows' dropout keys
      if (P.drop.on) {
        const uint32_t kh = P.drop.kh(b, h);
        for (int64_t r = 0; r < nq; ++r) krs[r] = Dropout::kr(kh, i0 + r);
      }
      // dP of row r over keys [c0, c0 + n) times the dropout factor Z
      auto drop_dp = [&](acc_t* dr, int64_t c0, int64_t n, int64_t r) {
        if (!P.drop.on) return;
        P.drop.factor(w.z.data(), c0, n, krs[r]);
        mul_row(dr, w.z.data(), n);
      };
      Seg segs[2];
      const int nseg = key_segments(P, s, i0, blk.i1, segs);
      std::vector<Seg> chunks;  // (c0, n) of each key chunk
      for (int si = 0; si < nseg; ++si)
        for (int64_t c0 = segs[si].lo; c0 < segs[si].hi; c0 += KC)
          chunks.push_back({c0, std::min(KC, segs[si].hi - c0)});
      acc_t *acc = w.acc.data(), *S = w.s.data(), *dP = w.dp.data(), *G = w.gs.data();
      // S = Q K^T and dP = dO V^T of one chunk; S becomes P.  Returns K's tile (for dQ).
      auto scores = [&](const Seg& c, int64_t* ldk_out) {
        int64_t ldv;
        const acc_t* K = tile<scalar_t, acc_t>(kp + b * ks0 + hk * ks1 + c.lo * ks2, ks2, c.hi,
                                               D, w.k.data(), ldk_out);
        const acc_t* V = tile<scalar_t, acc_t>(vp + b * vs0 + hk * vs1 + c.lo * vs2, vs2, c.hi,
                                               D, w.v.data(), &ldv);
        gemm_rm<acc_t>(false, true, nq, c.hi, D, acc_t(1), Q, ldq, K, *ldk_out, acc_t(0), S, c.hi);
        gemm_rm<acc_t>(false, true, nq, c.hi, D, acc_t(1), dO, ldd, V, ldv, acc_t(0), dP, c.hi);
        return K;
      };
      // delta = rowsum(P * dP), from the same P and dP as dS (exact where they cancel).  With
      // one chunk it comes with the chunk; with several, half inputs sweep the chunks once
      // more (O in bf16/fp16 is too coarse), fp32/fp64 use rowsum(dO * O).
      const bool one = chunks.size() == 1;
      if (!one && !std::is_same_v<scalar_t, acc_t>) {
        std::fill(dl, dl + nq, acc_t(0));
        for (const Seg& c : chunks) {
          int64_t ldk;
          scores(c, &ldk);
          for (int64_t r = 0; r < nq; ++r) {
            acc_t *sr = S + r * c.hi, *dr = dP + r * c.hi, *gr = G + (cap ? r * c.hi : 0);
            if (probs(sr, gr, c.lo, c.hi, rks[r], L[r])) continue;
            drop_dp(dr, c.lo, c.hi, r);
            zero_masked(dr, c.lo, c.hi, rks[r]);  // a masked non-finite V must not count
            dl[r] += dot(sr, dr, c.hi);
          }
        }
      } else if (!one) {
        if constexpr (std::is_same_v<scalar_t, acc_t>) {
          for (int64_t r = 0; r < nq; ++r)
            dl[r] = dot(dO + r * ldd, op + b * os0 + h * os1 + (i0 + r) * os2, D);
        }
      } else {
        std::fill(dl, dl + nq, acc_t(0));
      }
      std::fill(acc, acc + nq * D, acc_t(0));
      for (const Seg& c : chunks) {
        const int64_t n = c.hi;
        int64_t ldk;
        const acc_t* K = scores(c, &ldk);
        bool all_ok = true;
        for (int64_t r = 0; r < nq; ++r) {
          acc_t *sr = S + r * n, *dr = dP + r * n, *gr = G + (cap ? r * n : 0);
          all_ok = all_ok && covers(rks[r], c.lo, c.lo + n);
          if (probs(sr, gr, c.lo, n, rks[r], L[r])) {
            std::fill(sr, sr + n, acc_t(0));
            continue;
          }
          drop_dp(dr, c.lo, n, r);
          zero_masked(dr, c.lo, n, rks[r]);
          if (one) dl[r] = dot(sr, dr, n);
          dscores(sr, sr, dr, gr, n, dl[r]);
          zero_masked(sr, c.lo, n, rks[r]);
        }
        gemm_acc_masked<acc_t>(false, nq, D, n, S, n, K, ldk, acc, D, all_ok,
                               [&](int64_t r, int64_t x) { return allowed(rks[r], c.lo + x); });
      }
      scalar_t* dqrow = dqp + ((b * P.Hq + h) * P.Sq + i0) * D;
      store_row(acc, dqrow, nq * D, acc_t(1));
    });
  }

  // ---- pass 2: dK, dV over (b, kv head, key block)
  {
    auto blks = blocks(P, BK, /*keys=*/true);
    const int64_t ntask = static_cast<int64_t>(blks.size()) * P.Hkv;
    struct Scratch {
      std::vector<acc_t> k, v, q, d, s, dp, dk, dv, gs, z;  // gs: the cap's derivative
    };
    auto init = [&] {
      Scratch w;
      w.k.resize(BK * D);
      w.v.resize(BK * D);
      w.q.resize(QC * D);
      w.d.resize(QC * D);
      w.s.resize(QC * BK);
      w.dp.resize(QC * BK);
      w.dk.resize(BK * D);
      w.dv.resize(BK * D);
      w.gs.resize(cap ? QC * BK : 0);
      w.z.resize(P.drop.on ? BK : 0);
      return w;
    };
    // bounds mode: each key block's query rows (an O(Lq) scan), once for all kv heads
    std::vector<Seg> bsegs;
    if (P.lo != nullptr) {
      bsegs.resize(blks.size());
      at::parallel_for(0, static_cast<int64_t>(blks.size()), 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          Seg sg[2];
          const Block& kb = blks[t];
          const int n = query_segments(P, sample(P, kb.b), kb.i0, kb.i1, sg);
          bsegs[t] = n > 0 ? sg[0] : Seg{0, 0};
        }
      });
    }
    run_tasks(ntask, init, [&](int64_t t, Scratch& w) {
      const Block& blk = blks[t / P.Hkv];
      const int64_t hk = t % P.Hkv, b = blk.b;
      const Sample s = sample(P, b);
      const int64_t j0 = blk.i0, nk = blk.i1 - blk.i0;
      int64_t ldk, ldv;
      const acc_t* K = tile<scalar_t, acc_t>(kp + b * ks0 + hk * ks1 + j0 * ks2, ks2, nk, D,
                                             w.k.data(), &ldk);
      const acc_t* V = tile<scalar_t, acc_t>(vp + b * vs0 + hk * vs1 + j0 * vs2, vs2, nk, D,
                                             w.v.data(), &ldv);
      acc_t *dK = w.dk.data(), *dV = w.dv.data(), *S = w.s.data(), *dP = w.dp.data(),
            *G = w.gs.data();
      std::fill(dK, dK + nk * D, acc_t(0));
      std::fill(dV, dV + nk * D, acc_t(0));
      Seg segs[2];
      int nseg;
      if (P.lo != nullptr) {
        segs[0] = bsegs[t / P.Hkv];
        nseg = segs[0].hi > segs[0].lo ? 1 : 0;
      } else {
        nseg = query_segments(P, s, j0, blk.i1, segs);
      }
      for (int64_t h = hk * g; h < (hk + 1) * g; ++h) {
        const acc_t* dl = delta.data() + (b * P.Hq + h) * P.Sq;
        const uint32_t kh = P.drop.on ? P.drop.kh(b, h) : 0u;
        for (int si = 0; si < nseg; ++si) {
          for (int64_t r0 = segs[si].lo; r0 < segs[si].hi; r0 += QC) {
            const int64_t nq = std::min(QC, segs[si].hi - r0);
            int64_t ldq, ldd;
            const acc_t* Q = tile<scalar_t, acc_t>(qp + b * qs0 + h * qs1 + r0 * qs2, qs2, nq, D,
                                                   w.q.data(), &ldq);
            const acc_t* dO = tile<scalar_t, acc_t>(dop + b * ds0 + h * ds1 + r0 * ds2, ds2, nq,
                                                    D, w.d.data(), &ldd);
            gemm_rm<acc_t>(false, true, nq, nk, D, acc_t(1), Q, ldq, K, ldk, acc_t(0), S, nk);
            gemm_rm<acc_t>(false, true, nq, nk, D, acc_t(1), dO, ldd, V, ldv, acc_t(0), dP, nk);
            bool all_ok = true;
            for (int64_t r = 0; r < nq; ++r) {
              const int64_t i = r0 + r;
              acc_t *sr = S + r * nk, *dr = dP + r * nk, *gr = G + (cap ? r * nk : 0);
              const RowKeys rk = row_keys(P, s, i);
              all_ok = all_ok && covers(rk, j0, j0 + nk);
              const bool single =
                  probs(sr, gr, j0, nk, rk, static_cast<acc_t>(lp[b * ls0 + h * ls1 + i * ls2]));
              acc_t* z = w.z.data();
              if (P.drop.on) {  // dP <- dP * Z (before dS), P <- P * Z (after, for dV)
                P.drop.factor(z, j0, nk, Dropout::kr(kh, i));
                mul_row(dr, z, nk);
              }
              if (single) {
                std::fill(dr, dr + nk, acc_t(0));
              } else {
                // dr <- dS (scaled); sr keeps P for dV
                dscores(dr, sr, dr, gr, nk, dl[i]);
                zero_masked(dr, j0, nk, rk);
              }
              if (P.drop.on) mul_row(sr, z, nk);
            }
            // dV += P^T dO, dK += dS^T Q over these rows; a row's masked keys take no part
            auto ok = [&](int64_t j, int64_t r) { return allowed(row_keys(P, s, r0 + r), j0 + j); };
            gemm_acc_masked<acc_t>(true, nk, D, nq, S, nk, dO, ldd, dV, D, all_ok, ok);
            gemm_acc_masked<acc_t>(true, nk, D, nq, dP, nk, Q, ldq, dK, D, all_ok, ok);
          }
        }
      }
      scalar_t* dkrow = dkp + ((b * P.Hkv + hk) * P.Sk + j0) * D;
      scalar_t* dvrow = dvp + ((b * P.Hkv + hk) * P.Sk + j0) * D;
      store_row(dK, dkrow, nk * D, acc_t(1));
      store_row(dV, dvrow, nk * D, acc_t(1));
    });
  }
}

// ------------------------------------------------------------------ argument checks

std::vector<int64_t> lengths(const std::optional<at::Tensor>& s, const char* name, int64_t B,
                             int64_t S) {
  std::vector<int64_t> out(B, S);
  if (!s.has_value()) return out;
  const at::Tensor& t = *s;
  MMCORE_CHECK_ARG(t.device().is_cpu(), name, "must be a CPU tensor");
  MMCORE_CHECK_ARG(t.dim() == 1 && t.size(0) == B, name,
                   "must have shape (B,) = (" + std::to_string(B) + ",), got " +
                       c10::str(t.sizes()));
  MMCORE_CHECK_ARG(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt, name,
                   "must be int64 (or int32), got " + std::string(c10::toString(t.scalar_type())));
  at::Tensor c = t.to(at::kLong).contiguous();
  const int64_t* p = c.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    MMCORE_CHECK_ARG(p[b] >= 0 && p[b] <= S, name,
                     "values must lie in [0, " + std::to_string(S) + "], got " +
                         std::to_string(p[b]) + " at index " + std::to_string(b));
    out[b] = p[b];
  }
  return out;
}

void check_attn_tensor(const at::Tensor& t, const char* name) {
  MMCORE_CHECK_ARG(t.dim() == 4, name, "must have 4 dims (B, H, S, D), got " + c10::str(t.sizes()));
  check_cpu_lastdim(t, name);
  const auto dt = t.scalar_type();
  MMCORE_CHECK_ARG(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble,
                   name, "must be float16, bfloat16, float32 or float64, got " +
                             std::string(c10::toString(dt)));
}

// An optional (B, S) per-row / per-key tensor of dtype dt: CPU, contiguous.
void check_rows(const at::Tensor& t, const char* name, at::ScalarType dt, int64_t B, int64_t S,
                const char* dims) {
  MMCORE_CHECK_ARG(t.device().is_cpu(), name, "must be a CPU tensor");
  MMCORE_CHECK_ARG(t.scalar_type() == dt, name,
                   "must be " + std::string(c10::toString(dt)) + ", got " +
                       std::string(c10::toString(t.scalar_type())));
  MMCORE_CHECK_ARG(t.dim() == 2 && t.size(0) == B && t.size(1) == S, name,
                   "must have shape " + std::string(dims) + " = (" + std::to_string(B) + ", " +
                       std::to_string(S) + "), got " + c10::str(t.sizes()));
  MMCORE_CHECK_ARG(t.is_contiguous(), name, "must be contiguous");
}

// softcap, bounds mode (key_lo, key_hi) and key_mask of P (docs/design.md, issue 26).
void set_masks(Problem& P, double softcap, const std::optional<at::Tensor>& key_lo,
               const std::optional<at::Tensor>& key_hi,
               const std::optional<at::Tensor>& key_mask) {
  MMCORE_CHECK_ARG(std::isfinite(softcap) && softcap >= 0.0, "softcap",
                   "must be a finite float > 0, or 0 for none; got " + std::to_string(softcap));
  P.softcap = softcap;
  MMCORE_CHECK_ARG(key_lo.has_value() == key_hi.has_value(),
                   key_lo.has_value() ? "key_hi" : "key_lo",
                   "key_lo and key_hi come together (bounds mode) or not at all");
  if (key_lo.has_value()) {
    check_rows(*key_lo, "key_lo", at::kInt, P.B, P.Sq, "(B, Sq)");
    check_rows(*key_hi, "key_hi", at::kInt, P.B, P.Sq, "(B, Sq)");
    MMCORE_CHECK_ARG(P.left == -1 && P.right == -1 && !P.causal && P.G == 0, "key_lo",
                     "bounds mode (key_lo / key_hi) replaces the window: it needs left = right "
                     "= -1, causal false and global_tokens 0");
    P.lo = key_lo->data_ptr<int32_t>();
    P.hi = key_hi->data_ptr<int32_t>();
  }
  if (key_mask.has_value()) {
    check_rows(*key_mask, "key_mask", at::kBool, P.B, P.Sk, "(B, Sk)");
    P.km = key_mask->data_ptr<bool>();
    P.kc.assign(static_cast<size_t>(P.B * (P.Sk + 1)), 0);
    for (int64_t b = 0; b < P.B; ++b) {
      const bool* m = P.km + b * P.Sk;
      int32_t* c = P.kc.data() + b * (P.Sk + 1);
      for (int64_t j = 0; j < P.Sk; ++j) c[j + 1] = c[j] + (m[j] ? 1 : 0);
    }
  }
}

Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const std::optional<at::Tensor>& seqlens_q,
                     const std::optional<at::Tensor>& seqlens_k, int64_t left, int64_t right,
                     bool causal, int64_t global_tokens, double scale, double softcap,
                     const std::optional<at::Tensor>& key_lo,
                     const std::optional<at::Tensor>& key_hi,
                     const std::optional<at::Tensor>& key_mask, double dropout_p,
                     const std::optional<at::Tensor>& dropout_seed) {
  check_attn_tensor(q, "q");
  check_attn_tensor(k, "k");
  check_attn_tensor(v, "v");
  MMCORE_CHECK_ARG(k.scalar_type() == q.scalar_type(), "k", "dtype must equal q's");
  MMCORE_CHECK_ARG(v.scalar_type() == q.scalar_type(), "v", "dtype must equal q's");
  MMCORE_CHECK_ARG(k.size(0) == q.size(0) && v.size(0) == q.size(0), "k/v",
                   "batch must equal q's");
  MMCORE_CHECK_ARG(k.sizes() == v.sizes(), "v", "must have k's shape " + c10::str(k.sizes()) +
                                                    ", got " + c10::str(v.sizes()));
  MMCORE_CHECK_ARG(k.size(3) == q.size(3), "k", "head dim must equal q's");
  MMCORE_CHECK_ARG(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "k",
                   "Hq % Hkv must be 0 (q heads " + std::to_string(q.size(1)) + ", k/v heads " +
                       std::to_string(k.size(1)) + ")");
  MMCORE_CHECK_ARG(left >= -1, "left", "window must be >= -1 (-1 = unbounded)");
  MMCORE_CHECK_ARG(right >= -1, "right", "window must be >= -1 (-1 = unbounded)");
  MMCORE_CHECK_ARG(global_tokens >= 0 && global_tokens <= k.size(2), "global_tokens",
                   "must lie in [0, Sk]");
  MMCORE_CHECK_ARG(std::isfinite(scale), "scale", "must be finite");
  Problem P;
  P.B = q.size(0);
  P.Hq = q.size(1);
  P.Sq = q.size(2);
  P.D = q.size(3);
  P.Hkv = k.size(1);
  P.Sk = k.size(2);
  P.left = left;
  P.right = causal ? 0 : right;
  P.causal = causal;
  P.G = global_tokens;
  P.scale = scale;
  P.Lq = lengths(seqlens_q, "seqlens_q", P.B, P.Sq);
  P.Lk = lengths(seqlens_k, "seqlens_k", P.B, P.Sk);
  set_masks(P, softcap, key_lo, key_hi, key_mask);
  P.drop = make_dropout(dropout_p, dropout_seed, P.Sk);
  return P;
}

}  // namespace window

std::tuple<at::Tensor, at::Tensor> window_attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& seqlens_q, const std::optional<at::Tensor>& seqlens_k,
    int64_t left, int64_t right, bool causal, int64_t global_tokens, double scale,
    double softcap, const std::optional<at::Tensor>& key_lo,
    const std::optional<at::Tensor>& key_hi, const std::optional<at::Tensor>& key_mask,
    double dropout_p, const std::optional<at::Tensor>& dropout_seed) {
  using namespace window;
  Problem P = make_problem(q, k, v, seqlens_q, seqlens_k, left, right, causal, global_tokens,
                           scale, softcap, key_lo, key_hi, key_mask, dropout_p, dropout_seed);
  at::Tensor out = at::zeros({P.B, P.Hq, P.Sq, P.D}, q.options());
  at::Tensor lse = at::full({P.B, P.Hq, P.Sq}, -std::numeric_limits<float>::infinity(),
                            q.options().dtype(at::kFloat));
  if (out.numel() == 0 || P.Sk == 0) return {out, lse};
  switch (q.scalar_type()) {
    case at::kFloat: forward_impl<float, float>(P, q, k, v, out, lse); break;
    case at::kDouble: forward_impl<double, double>(P, q, k, v, out, lse); break;
    case at::kBFloat16: forward_impl<at::BFloat16, float>(P, q, k, v, out, lse); break;
    case at::kHalf: forward_impl<at::Half, float>(P, q, k, v, out, lse); break;
    default: TORCH_CHECK(false, "q: unsupported dtype");
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> window_attention_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& seqlens_q,
    const std::optional<at::Tensor>& seqlens_k, int64_t left, int64_t right, bool causal,
    int64_t global_tokens, double scale, double softcap, const std::optional<at::Tensor>& key_lo,
    const std::optional<at::Tensor>& key_hi, const std::optional<at::Tensor>& key_mask,
    double dropout_p, const std::optional<at::Tensor>& dropout_seed) {
  using namespace window;
  Problem P = make_problem(q, k, v, seqlens_q, seqlens_k, left, right, causal, global_tokens,
                           scale, softcap, key_lo, key_hi, key_mask, dropout_p, dropout_seed);
  check_attn_tensor(dout, "dout");
  check_attn_tensor(out, "out");
  MMCORE_CHECK_ARG(dout.sizes() == q.sizes(), "dout", "must have q's shape " + c10::str(q.sizes()));
  MMCORE_CHECK_ARG(out.sizes() == q.sizes(), "out", "must have q's shape " + c10::str(q.sizes()));
  MMCORE_CHECK_ARG(dout.scalar_type() == q.scalar_type(), "dout", "dtype must equal q's");
  MMCORE_CHECK_ARG(out.scalar_type() == q.scalar_type(), "out", "dtype must equal q's");
  MMCORE_CHECK_ARG(lse.device().is_cpu(), "lse", "must be a CPU tensor");
  MMCORE_CHECK_ARG(lse.scalar_type() == at::kFloat, "lse", "must be float32");
  MMCORE_CHECK_ARG(lse.dim() == 3 && lse.size(0) == P.B && lse.size(1) == P.Hq &&
                       lse.size(2) == P.Sq,
                   "lse", "must have shape (B, Hq, Sq), got " + c10::str(lse.sizes()));
  at::Tensor dq = at::zeros({P.B, P.Hq, P.Sq, P.D}, q.options());
  at::Tensor dk = at::zeros({P.B, P.Hkv, P.Sk, P.D}, k.options());
  at::Tensor dv = at::zeros({P.B, P.Hkv, P.Sk, P.D}, v.options());
  if (dq.numel() == 0 || dk.numel() == 0) return {dq, dk, dv};
  switch (q.scalar_type()) {
    case at::kFloat: backward_impl<float, float>(P, dout, q, k, v, out, lse, dq, dk, dv); break;
    case at::kDouble: backward_impl<double, double>(P, dout, q, k, v, out, lse, dq, dk, dv); break;
    case at::kBFloat16:
      backward_impl<at::BFloat16, float>(P, dout, q, k, v, out, lse, dq, dk, dv);
      break;
    case at::kHalf: backward_impl<at::Half, float>(P, dout, q, k, v, out, lse, dq, dk, dv); break;
    default: TORCH_CHECK(false, "q: unsupported dtype");
  }
  return {dq, dk, dv};
}

}  // namespace mmcore

TORCH_LIBRARY_FRAGMENT(mmcore_C, m) {
  m.def(
      "window_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? seqlens_q, Tensor? seqlens_k, "
      "int left, int right, bool causal, int global_tokens, float scale, float softcap=0.0, "
      "Tensor? key_lo=None, Tensor? key_hi=None, Tensor? key_mask=None, float dropout_p=0.0, "
      "Tensor? dropout_seed=None) -> (Tensor, Tensor)");
  m.def(
      "window_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? seqlens_q, Tensor? seqlens_k, int left, int right, bool causal, "
      "int global_tokens, float scale, float softcap=0.0, Tensor? key_lo=None, "
      "Tensor? key_hi=None, Tensor? key_mask=None, float dropout_p=0.0, "
      "Tensor? dropout_seed=None) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mmcore_C, CPU, m) {
  m.impl("window_attention_fwd", &mmcore::window_attention_fwd_cpu);
  m.impl("window_attention_bwd", &mmcore::window_attention_bwd_cpu);
}
