/* Superseded: the FMA peak probe is built into the extension, per CPU capability (AVX-512,
   AVX2, NEON): mmcore.cpu_info.fma_peak(), csrc/cpu/vec_dispatch.cpp, docs/cpu-kernels.md.
   This file measures 8-wide AVX2 FMA chains only and under-reports AVX-512 CPUs (a measured
   GEMM came out above it); it stays until benchmarks/harness.py stops building it.
   cc -O2 -mavx2 -mfma -fopenmp fma_peak.c */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>

int main(void) {
  const long iters = 20000000L;
  double best = 0.0;
  for (int rep = 0; rep < 3; rep++) {
    double t0 = omp_get_wtime();
    float sink = 0.f;
#pragma omp parallel reduction(+ : sink)
    {
      float seed = 1.0f + omp_get_thread_num();
      __m256 a[10];
      for (int j = 0; j < 10; j++) a[j] = _mm256_set1_ps(seed + 0.1f * j);
      const __m256 m = _mm256_set1_ps(0.999999f), c = _mm256_set1_ps(1e-7f);
      for (long i = 0; i < iters; i++) {
        a[0] = _mm256_fmadd_ps(a[0], m, c); a[1] = _mm256_fmadd_ps(a[1], m, c);
        a[2] = _mm256_fmadd_ps(a[2], m, c); a[3] = _mm256_fmadd_ps(a[3], m, c);
        a[4] = _mm256_fmadd_ps(a[4], m, c); a[5] = _mm256_fmadd_ps(a[5], m, c);
        a[6] = _mm256_fmadd_ps(a[6], m, c); a[7] = _mm256_fmadd_ps(a[7], m, c);
        a[8] = _mm256_fmadd_ps(a[8], m, c); a[9] = _mm256_fmadd_ps(a[9], m, c);
      }
      __m256 s = a[0];
      for (int j = 1; j < 10; j++) s = _mm256_add_ps(s, a[j]);
      float out[8];
      _mm256_storeu_ps(out, s);
      sink += out[0];
    }
    double gf = (double)iters * 10 * 16 * omp_get_max_threads() / (omp_get_wtime() - t0) / 1e9;
    if (gf > best) best = gf;
    if (sink == 12345.f) printf("-");  /* keep the chains live */
  }
  printf("%.1f\n", best);
  return 0;
}
