// Device helpers shared by the CUDA kernels: bf16 / fp16 traits, the m16n8k16 tensor-core MMA
// (fp32 accumulate) and cp.async.  Needs only the CUDA toolkit (sm_80+ for the MMA and
// cp.async; older targets compile to a trap, and the Python side refuses them).
//
// m16n8k16 fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16"), lane = 4 * grp + tg:
//   A (16 x 16, row-major), 4 x b32:  a[0] = A[grp][2tg, 2tg+1]     a[1] = A[grp+8][2tg, 2tg+1]
//                                     a[2] = A[grp][2tg+8, 2tg+9]   a[3] = A[grp+8][2tg+8, 2tg+9]
//   B (16 x 8, "col": B[k][n]), 2 x b32: b[0] = B[2tg, 2tg+1][grp]   b[1] = B[2tg+8, 2tg+9][grp]
//   C (16 x 8, fp32), 4 x f32:        c[0..1] = C[grp][2tg, 2tg+1]  c[2..3] = C[grp+8][2tg, 2tg+1]
// The lower k index of a pair sits in the low 16 bits.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define MMCORE_SM80_ONLY 0
#else
#define MMCORE_SM80_ONLY 1
#endif

namespace mmcore {
namespace cuda {

// Conversions of one 16-bit float type; Half<T> adds what is common to both.
template <typename T>
struct Conv;

template <>
struct Conv<__nv_bfloat16> {
  using Pair = __nv_bfloat162;
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) {
    return __float2bfloat16_rn(x);
  }
  static __device__ __forceinline__ Pair pair(float lo, float hi) {
    return __floats2bfloat162_rn(lo, hi);
  }
  static __device__ __forceinline__ float2 floats(Pair v) { return __bfloat1622float2(v); }
};

template <>
struct Conv<__half> {
  using Pair = __half2;
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
  static __device__ __forceinline__ Pair pair(float lo, float hi) {
    return __floats2half2_rn(lo, hi);
  }
  static __device__ __forceinline__ float2 floats(Pair v) { return __half22float2(v); }
};

// d += a * b, m16n8k16, fp32 accumulate; AB = "bf16" or "f16"
#define MMCORE_MMA_M16N8K16(AB)                                                          \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." AB "." AB ".f32 "                \
               "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"      \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                          \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]))

template <typename T>
struct Half : Conv<T> {
  // two floats rounded to T, as one 32-bit word (lo in the low half)
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    typename Conv<T>::Pair v = Conv<T>::pair(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ float2 unpack(uint32_t u) {
    return Conv<T>::floats(*reinterpret_cast<typename Conv<T>::Pair*>(&u));
  }
  static __device__ __forceinline__ void mma(float* d, const uint32_t* a, const uint32_t* b) {
#if MMCORE_SM80_ONLY
    if constexpr (std::is_same<T, __nv_bfloat16>::value) {
      MMCORE_MMA_M16N8K16("bf16");
    } else {
      MMCORE_MMA_M16N8K16("f16");
    }
#else
    __trap();
#endif
  }
};

// Two consecutive 16-bit elements as one 32-bit word (smem, 4-byte aligned).
template <typename T>
__device__ __forceinline__ uint32_t ld_pair(const T* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

// Two 16-bit elements from different rows packed as (lo, hi) (the B operand of P V).
template <typename T>
__device__ __forceinline__ uint32_t pack_rows(const T* lo, const T* hi) {
  const uint16_t l = *reinterpret_cast<const uint16_t*>(lo);
  const uint16_t h = *reinterpret_cast<const uint16_t*>(hi);
  return uint32_t(l) | (uint32_t(h) << 16);
}

// A fragment of a row-major 16 x 16 tile at `base` (row stride `ld` elements).
template <typename T>
__device__ __forceinline__ void load_a(uint32_t* a, const T* base, int ld, int lane) {
  const int grp = lane >> 2, tg = lane & 3;
  a[0] = ld_pair(base + grp * ld + 2 * tg);
  a[1] = ld_pair(base + (grp + 8) * ld + 2 * tg);
  a[2] = ld_pair(base + grp * ld + 2 * tg + 8);
  a[3] = ld_pair(base + (grp + 8) * ld + 2 * tg + 8);
}

// B fragment where B[k][n] = M[n][k] for a row-major M (n rows, k contiguous): K^T, A_lora^T.
template <typename T>
__device__ __forceinline__ void load_b_nk(uint32_t* b, const T* base, int ld, int lane) {
  const int grp = lane >> 2, tg = lane & 3;
  b[0] = ld_pair(base + grp * ld + 2 * tg);
  b[1] = ld_pair(base + grp * ld + 2 * tg + 8);
}

// B fragment where B[k][n] = M[k][n] for a row-major M (k rows, n contiguous): V.
template <typename T>
__device__ __forceinline__ void load_b_kn(uint32_t* b, const T* base, int ld, int lane) {
  const int grp = lane >> 2, tg = lane & 3;
  b[0] = pack_rows(base + (2 * tg) * ld + grp, base + (2 * tg + 1) * ld + grp);
  b[1] = pack_rows(base + (2 * tg + 8) * ld + grp, base + (2 * tg + 9) * ld + grp);
}

// 16-byte global -> shared copy; src_bytes = 0 fills the destination with zeros.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
#if MMCORE_SM80_ONLY
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem),
               "r"(src_bytes));
#else
  __trap();
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if MMCORE_SM80_ONLY
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if MMCORE_SM80_ONLY
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

}  // namespace cuda
}  // namespace mmcore
