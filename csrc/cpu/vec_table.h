// The vector loops of the CPU kernels, one table per CPU capability, chosen at run time.
//
// csrc/cpu/vec_kernels.h holds the loops once, written on ATen's at::vec::Vectorized<float>;
// vec_default.cpp, vec_avx2.cpp and vec_avx512.cpp compile it once per capability (ATen's
// CPU_CAPABILITY scheme: each build lives in its own namespace, mmcore::vec::<CAPABILITY>).
// On aarch64 the default build is NEON (ATen's vec128 headers).  vec() returns the table of
// the capability ATen itself runs on (at::get_cpu_capability(), which honours
// ATEN_CPU_CAPABILITY), so mmcore's loops and ATen's / MKL's kernels take the same ISA.
// Every loop computes in fp32; bf16 / fp16 are converted on load and store.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <string>

namespace mmcore {
namespace vec {

struct Table {
  const char* isa;   // "default", "avx2", "avx512" (x86) / "neon" (aarch64 default build)
  int vector_bits;   // register width of this build (x86's default build: SSE2, 128)
  int lanes;         // floats per Vectorized<float> (x86's default build: 8, two SSE2 registers)
  // s[0:n) *= scale; returns the max (-inf for n = 0, NaN when any s is NaN)
  float (*scale_max)(float* s, int64_t n, float scale);
  // s[0:n) = exp(s - m) (-inf -> 0); returns the sum
  float (*exp_sum)(float* s, int64_t n, float m);
  // Scores with softcap and / or a key mask (the features-off path is scale_max):
  //   s[j] = c != 0 ? c * tanh(a * s[j]) : a * s[j]   (a = scale / c with a softcap)
  //   s[j] = -inf where km != nullptr and km[j] is false (a masked NaN never shows)
  //   g[j] = 1 - tanh(a * s[j])^2 when g != nullptr and c != 0 (the softcap's derivative)
  // returns the max as scale_max does
  float (*score_max)(float* s, float* g, const bool* km, int64_t n, float a, float c);
  // whether every x[0:n) is finite
  bool (*all_finite)(const float* x, int64_t n);
  // x[0:n) *= a
  void (*scale)(float* x, int64_t n, float a);
  // sum a[j] * b[j]
  float (*dot)(const float* a, const float* b, int64_t n);
  // out[j] = p[j] * (dp[j] - delta) * scale  (dS of attention; out may alias p or dp)
  void (*dsoftmax)(float* out, const float* p, const float* dp, int64_t n, float delta,
                   float scale);
  // out[j] = p[j] * (dp[j] - delta) * g[j] * scale  (dS through a softcap; out may alias)
  void (*dsoftmax_g)(float* out, const float* p, const float* dp, const float* g, int64_t n,
                     float delta, float scale);
  // y[0:n) += a * x
  void (*axpy)(float* y, const float* x, int64_t n, float a);
  // dst[0:n) = float(src)
  void (*load_bf16)(const c10::BFloat16* src, float* dst, int64_t n);
  void (*load_half)(const c10::Half* src, float* dst, int64_t n);
  // dst[0:n) = T(src * mul)
  void (*store_f32)(const float* src, float* dst, int64_t n, float mul);
  void (*store_bf16)(const float* src, c10::BFloat16* dst, int64_t n, float mul);
  void (*store_half)(const float* src, c10::Half* dst, int64_t n, float mul);
  // y[rows[i]][0:n) += a * x[i][0:n) for i < m (row strides ldy, ldx): a LoRA update
  void (*rows_axpy)(float* y, int64_t ldy, const int64_t* rows, const float* x, int64_t ldx,
                    int64_t m, int64_t n, float a);
  // iters rounds of `chains` independent FMA chains of Vectorized<float>; returns a value
  // that depends on every chain (the FMA peak probe, csrc/cpu/fma_peak.cpp)
  float (*fma_chains)(int64_t iters);
  int chains;
  // C (M x N, ldc) = A (M x K, lda) B (K x N, ldb), or += with accumulate; row-major fp32,
  // N a multiple of `lanes` (register-blocked FMA kernel for the attention tiles)
  void (*gemm_nn)(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                  int64_t ldb, float* C, int64_t ldc, bool accumulate);
  // dst (cols x rows, ld_dst) = transpose of src (rows x cols, ld_src)
  void (*transpose)(const float* src, int64_t ld_src, int64_t rows, int64_t cols, float* dst,
                    int64_t ld_dst);
  // attention dropout (common.h: Dropout), u[j] = mix(kr ^ kc[j]) (the 32-bit mixer):
  //   drop_row:    x[j] = u[j] >= thr ? x[j] * mul : 0
  //   drop_factor: z[j] = u[j] >= thr ? v : 0
  void (*drop_row)(float* x, const uint32_t* kc, int64_t n, uint32_t kr, uint32_t thr,
                   float mul);
  void (*drop_factor)(float* z, const uint32_t* kc, int64_t n, uint32_t kr, uint32_t thr,
                      float v);
};

// The per-capability builds (nullptr where this compiler / CPU family has no such build).
const Table* table_default();
const Table* table_avx2();
const Table* table_avx512();

// The table of ATen's CPU capability (cached on first use).
const Table& vec();

// The widest vector build this CPU can run (for the FMA peak probe), whatever ATen chose.
const Table& widest();

// GFLOP/s of t's FMA chains on `threads` threads started together (best of a few runs).
double fma_peak_gflops(const Table& t, int64_t threads);

}  // namespace vec
}  // namespace mmcore
