// The vector loops of vec_table.h, written once on ATen's at::vec::Vectorized<float>.
//
// Included only by the per-capability builds (vec_default.cpp, vec_avx2.cpp, vec_avx512.cpp),
// each after defining CPU_CAPABILITY / CPU_CAPABILITY_<X> (and, on x86, after switching the
// compiler's target to that ISA).  Everything here lives in mmcore::vec::CPU_CAPABILITY, like
// ATen's own per-capability code, so the builds never share a symbol.
// Vec = Vectorized<float>: 16 lanes on AVX-512, 8 on AVX2 (and x86's default build, which the
// compiler maps onto SSE2), 4 on NEON.  Tails (n % lanes) use the partial loads / stores.
#pragma once
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <functional>
#include <limits>

#include "vec_table.h"

namespace mmcore {
namespace vec {
inline namespace CPU_CAPABILITY {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();

inline float hmax(const Vec& v) {
  return at::vec::vec_reduce_all<float>(
      [](const Vec& a, const Vec& b) { return at::vec::maximum(a, b); }, v);
}

inline float hsum(const Vec& v) { return at::vec::vec_reduce_all<float>(std::plus<Vec>(), v); }

inline float scale_max(float* s, int64_t n, float scale) {
  const Vec vs(scale), ninf(-std::numeric_limits<float>::infinity());
  Vec m = ninf;  // maximum() keeps a NaN of either side
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const Vec x = Vec::loadu(s + j) * vs;
    x.store(s + j);
    m = at::vec::maximum(m, x);
  }
  if (j < n) {
    const int64_t r = n - j;
    const Vec x = Vec::loadu(s + j, r) * vs;
    x.store(s + j, r);
    m = at::vec::maximum(m, Vec::set(ninf, x, r));
  }
  return hmax(m);
}

// Lanes [0, r) of km as a blend mask (all bits set where km is true; lanes >= r clear).
inline Vec keep_mask(const bool* km, int64_t r) {
  int32_t bits[kLanes];
#pragma GCC unroll 16
  for (int64_t l = 0; l < kLanes; ++l) bits[l] = l < r && km[l] ? -1 : 0;
  return Vec::loadu(bits);
}

// tanh(x) = sign(x) * (1 - 2 / (exp(2|x|) + 1)), |x| clamped to 9 (tanh(9) rounds to 1 in
// fp32): within 1.6e-7 absolute of tanh (about 2.5 ulp of 1; the cancellation near 0 costs
// relative, not absolute, accuracy, and scores only need the absolute one); NaN stays NaN,
// +-inf -> +-1.  The softcap forward (N = 8192, w = 256, AVX-512) cost 1.38x the plain one
// with Vectorized::tanh (Sleef tanh_u10) and also with expm1; 1.13x with this exp form.
inline Vec tanh_fast(const Vec& x) {
  const Vec ax = at::vec::minimum(x.abs(), Vec(9.f));
  const Vec e = (ax + ax).exp();
  return (Vec(1.f) - Vec(2.f) / (e + Vec(1.f))) | (x & Vec(-0.f));
}

// One vector of scores: x * a, or with a softcap c * tanh(x * a) (g <- 1 - tanh^2).
template <bool Cap>
inline Vec score1(const Vec& x, const Vec& va, const Vec& vc, Vec* g) {
  if constexpr (Cap) {
    const Vec t = tanh_fast(x * va);
    *g = Vec(1.f) - t * t;
    return t * vc;
  } else {
    return x * va;
  }
}

template <bool Cap, bool Km>
float score_max_t(float* s, float* g, const bool* km, int64_t n, float a, float c) {
  const Vec va(a), vc(c), ninf(-std::numeric_limits<float>::infinity());
  Vec m = ninf, gv(0.f);
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    Vec x = score1<Cap>(Vec::loadu(s + j), va, vc, &gv);
    if constexpr (Km) x = Vec::blendv(ninf, x, keep_mask(km + j, kLanes));
    x.store(s + j);
    if (Cap && g != nullptr) gv.store(g + j);
    m = at::vec::maximum(m, x);
  }
  if (j < n) {
    const int64_t r = n - j;
    Vec x = score1<Cap>(Vec::loadu(s + j, r), va, vc, &gv);
    if constexpr (Km) x = Vec::blendv(ninf, x, keep_mask(km + j, r));
    x.store(s + j, r);
    if (Cap && g != nullptr) gv.store(g + j, r);
    m = at::vec::maximum(m, Vec::set(ninf, x, r));
  }
  return hmax(m);
}

inline float score_max(float* s, float* g, const bool* km, int64_t n, float a, float c) {
  if (c != 0.f)
    return km != nullptr ? score_max_t<true, true>(s, g, km, n, a, c)
                         : score_max_t<true, false>(s, g, km, n, a, c);
  return km != nullptr ? score_max_t<false, true>(s, g, km, n, a, c)
                       : score_max_t<false, false>(s, g, km, n, a, c);
}

inline float exp_sum(float* s, int64_t n, float m) {
  const Vec vm(m);
  Vec acc(0.f);
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const Vec e = (Vec::loadu(s + j) - vm).exp();  // ATen's exp (Sleef, 1 ulp, on AVX*/NEON)
    e.store(s + j);
    acc = acc + e;
  }
  if (j < n) {
    const int64_t r = n - j;
    const Vec e = (Vec::loadu(s + j, r) - vm).exp();
    e.store(s + j, r);
    acc = acc + Vec::set(Vec(0.f), e, r);
  }
  return hsum(acc);
}

// x * 0 is 0 for finite x and NaN for +-inf / NaN: one NaN test of the sum at the end
inline bool all_finite(const float* x, int64_t n) {
  const Vec zero(0.f);
  Vec acc0(0.f), acc1(0.f);
  int64_t j = 0;
  for (; j + 2 * kLanes <= n; j += 2 * kLanes) {
    acc0 = at::vec::fmadd(Vec::loadu(x + j), zero, acc0);
    acc1 = at::vec::fmadd(Vec::loadu(x + j + kLanes), zero, acc1);
  }
  for (; j + kLanes <= n; j += kLanes) acc0 = at::vec::fmadd(Vec::loadu(x + j), zero, acc0);
  if (j < n) acc1 = at::vec::fmadd(Vec::loadu(x + j, n - j), zero, acc1);
  return !std::isnan(hsum(acc0 + acc1));
}

inline void scale(float* x, int64_t n, float a) {
  const Vec va(a);
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) (Vec::loadu(x + j) * va).store(x + j);
  if (j < n) (Vec::loadu(x + j, n - j) * va).store(x + j, n - j);
}

inline float dot(const float* a, const float* b, int64_t n) {
  Vec acc0(0.f), acc1(0.f);
  int64_t j = 0;
  for (; j + 2 * kLanes <= n; j += 2 * kLanes) {
    acc0 = at::vec::fmadd(Vec::loadu(a + j), Vec::loadu(b + j), acc0);
    acc1 = at::vec::fmadd(Vec::loadu(a + j + kLanes), Vec::loadu(b + j + kLanes), acc1);
  }
  for (; j + kLanes <= n; j += kLanes)
    acc0 = at::vec::fmadd(Vec::loadu(a + j), Vec::loadu(b + j), acc0);
  if (j < n)  // partial loads fill the rest with zeros
    acc1 = at::vec::fmadd(Vec::loadu(a + j, n - j), Vec::loadu(b + j, n - j), acc1);
  return hsum(acc0 + acc1);
}

inline void dsoftmax(float* out, const float* p, const float* dp, int64_t n, float delta,
                     float scale) {
  const Vec vd(delta), vs(scale);
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    (Vec::loadu(p + j) * (Vec::loadu(dp + j) - vd) * vs).store(out + j);
  if (j < n) {
    const int64_t r = n - j;
    (Vec::loadu(p + j, r) * (Vec::loadu(dp + j, r) - vd) * vs).store(out + j, r);
  }
}

inline void dsoftmax_g(float* out, const float* p, const float* dp, const float* g, int64_t n,
                       float delta, float scale) {
  const Vec vd(delta), vs(scale);
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    (Vec::loadu(p + j) * (Vec::loadu(dp + j) - vd) * Vec::loadu(g + j) * vs).store(out + j);
  if (j < n) {
    const int64_t r = n - j;
    (Vec::loadu(p + j, r) * (Vec::loadu(dp + j, r) - vd) * Vec::loadu(g + j, r) * vs)
        .store(out + j, r);
  }
}

inline void axpy(float* y, const float* x, int64_t n, float a) {
  const Vec va(a);
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    at::vec::fmadd(va, Vec::loadu(x + j), Vec::loadu(y + j)).store(y + j);
  if (j < n) {
    const int64_t r = n - j;
    at::vec::fmadd(va, Vec::loadu(x + j, r), Vec::loadu(y + j, r)).store(y + j, r);
  }
}

inline void load_bf16(const c10::BFloat16* src, float* dst, int64_t n) {
  at::vec::convert(src, dst, n);
}

inline void load_half(const c10::Half* src, float* dst, int64_t n) {
  at::vec::convert(src, dst, n);
}

inline void store_f32(const float* src, float* dst, int64_t n, float mul) {
  const Vec vm(mul);
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) (Vec::loadu(src + j) * vm).store(dst + j);
  if (j < n) (Vec::loadu(src + j, n - j) * vm).store(dst + j, n - j);
}

// float -> bf16 / fp16 through ATen's convert_from_float (round to nearest even)
template <typename T>
inline void store_16(const float* src, T* dst, int64_t n, float mul) {
  using VecT = at::vec::Vectorized<T>;
  const Vec vm(mul);
  int64_t j = 0;
  for (; j + 2 * kLanes <= n; j += 2 * kLanes) {
    const VecT o = at::vec::convert_from_float<T>(Vec::loadu(src + j) * vm,
                                                  Vec::loadu(src + j + kLanes) * vm);
    o.store(dst + j);
  }
  for (; j < n; ++j) dst[j] = static_cast<T>(src[j] * mul);
}

inline void store_bf16(const float* src, c10::BFloat16* dst, int64_t n, float mul) {
  store_16(src, dst, n, mul);
}

inline void store_half(const float* src, c10::Half* dst, int64_t n, float mul) {
  store_16(src, dst, n, mul);
}

inline void rows_axpy(float* y, int64_t ldy, const int64_t* rows, const float* x, int64_t ldx,
                      int64_t m, int64_t n, float a) {
  for (int64_t i = 0; i < m; ++i) axpy(y + rows[i] * ldy, x + i * ldx, n, a);
}

// ---- small GEMM for the attention tiles: C (M x N) (+)= A (M x K) B (K x N), row-major fp32
// Register blocking: R rows x NV vectors of C stay in registers while k runs; per k, NV loads
// of B's row and R broadcasts of A feed R * NV FMAs.  R / NV fit the register file: 32 vector
// registers on AVX-512 and aarch64, 16 on AVX2 (x86's default build: 16 SSE registers, two per
// 8-lane Vec).  N must be a multiple of kLanes (callers pad).
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kR = 6, kNV = 4;
#elif defined(CPU_CAPABILITY_AVX2)
constexpr int kR = 6, kNV = 2;
#elif defined(__aarch64__)
constexpr int kR = 6, kNV = sizeof(Vec) <= 16 ? 4 : 2;
#else
constexpr int kR = 4, kNV = 1;
#endif

template <int R, int NV>
void gemm_block(int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                int64_t ldc, bool accumulate) {
  Vec c[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v)
      c[r][v] = accumulate ? Vec::loadu(C + r * ldc + v * kLanes) : Vec(0.f);
  for (int64_t k = 0; k < K; ++k) {
    Vec b[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) b[v] = Vec::loadu(B + k * ldb + v * kLanes);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const Vec a(A[r * lda + k]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) c[r][v] = at::vec::fmadd(a, b[v], c[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) c[r][v].store(C + r * ldc + v * kLanes);
}

using BlockFn = void (*)(int64_t, const float*, int64_t, const float*, int64_t, float*, int64_t,
                         bool);

template <int R, int... NV>
constexpr std::array<BlockFn, sizeof...(NV)> block_row(std::integer_sequence<int, NV...>) {
  return {&gemm_block<R, NV + 1>...};
}

template <int... R>
constexpr std::array<std::array<BlockFn, kNV>, sizeof...(R)> block_table(
    std::integer_sequence<int, R...>) {
  return {block_row<R + 1>(std::make_integer_sequence<int, kNV>())...};
}

inline void gemm_nn(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                    int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  static constexpr auto fns = block_table(std::make_integer_sequence<int, kR>());
  for (int64_t j0 = 0; j0 < N; j0 += kNV * kLanes) {
    const int64_t nv = std::min<int64_t>(kNV, (N - j0) / kLanes);
    for (int64_t i0 = 0; i0 < M; i0 += kR) {
      const int64_t r = std::min<int64_t>(kR, M - i0);
      fns[r - 1][nv - 1](K, A + i0 * lda, lda, B + j0, ldb, C + i0 * ldc + j0, ldc, accumulate);
    }
  }
}

// dst (cols x rows, ld_dst) = src (rows x cols, ld_src) transposed (ATen's blocked transpose)
inline void transpose(const float* src, int64_t ld_src, int64_t rows, int64_t cols, float* dst,
                      int64_t ld_dst) {
  at::vec::transpose_mxn<float>(src, ld_src, dst, ld_dst, static_cast<int>(rows),
                                static_cast<int>(cols));
}

// Independent FMA chains: enough to cover FMA latency x FMA pipes (4 x 2 on current x86
// cores; 4 x 4 on Neoverse V1, whose 128-bit NEON vectors need 16 chains).  x86's default
// build (SSE2, two registers per 8-lane Vec, 16 registers) gets 6 to stay in registers.
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
constexpr int kChains = 12;
#elif defined(__aarch64__)
constexpr int kChains = kLanes <= 4 ? 16 : 12;
#else
constexpr int kChains = 6;
#endif

inline float fma_chains(int64_t iters) {
  Vec a[kChains];
  for (int c = 0; c < kChains; ++c) a[c] = Vec(1.0f + 0.01f * c);
  const Vec m(0.999999f), add(1e-7f);
  for (int64_t i = 0; i < iters; ++i) {
#pragma GCC unroll 16
    for (int c = 0; c < kChains; ++c) a[c] = at::vec::fmadd(a[c], m, add);
  }
  Vec s = a[0];
  for (int c = 1; c < kChains; ++c) s = s + a[c];
  return hsum(s);
}

// Attention dropout's keep test, one 32-bit mix per element (common.h: Dropout): plain
// uint32 loops that the compiler vectorises for this build's ISA (vpmulld; the select is a
// blend), about 1 ns per 16 elements on AVX-512.
inline uint32_t drop_u(uint32_t x) {
  x ^= x >> 15;
  x *= 0x2C1B3C6Du;
  x ^= x >> 12;
  x *= 0x297A2D39u;
  return x ^ (x >> 15);
}

inline void drop_row(float* __restrict x, const uint32_t* __restrict kc, int64_t n, uint32_t kr,
                     uint32_t thr, float mul) {
  for (int64_t j = 0; j < n; ++j) x[j] = drop_u(kr ^ kc[j]) >= thr ? x[j] * mul : 0.f;
}

inline void drop_factor(float* __restrict z, const uint32_t* __restrict kc, int64_t n,
                        uint32_t kr, uint32_t thr, float v) {
  for (int64_t j = 0; j < n; ++j) z[j] = drop_u(kr ^ kc[j]) >= thr ? v : 0.f;
}

}  // namespace CPU_CAPABILITY
}  // namespace vec
}  // namespace mmcore

// Defines mmcore::vec::table_<name>() for this build.
#define MMCORE_VEC_TABLE(name, isa_name, bits)                                                     \
  namespace mmcore {                                                                         \
  namespace vec {                                                                            \
  const Table* table_##name() {                                                              \
    namespace K = ::mmcore::vec::CPU_CAPABILITY;                                             \
    static const Table t = {isa_name,      bits, static_cast<int>(K::kLanes),                \
                            &K::scale_max, &K::exp_sum,                                      \
                            &K::score_max,                                                   \
                            &K::all_finite, &K::scale,     &K::dot,                          \
                            &K::dsoftmax,  &K::dsoftmax_g, &K::axpy,                          \
                            &K::load_bf16, &K::load_half,                                    \
                            &K::store_f32, &K::store_bf16,                                   \
                            &K::store_half, &K::rows_axpy,                                   \
                            &K::fma_chains, K::kChains,                                      \
                            &K::gemm_nn,   &K::transpose,                                    \
                            &K::drop_row,  &K::drop_factor};                                  \
    return &t;                                                                               \
  }                                                                                          \
  }                                                                                          \
  }
