// The AVX-512 (F, BW, VL, DQ) + FMA build of vec_kernels.h (ATen's CPU_CAPABILITY AVX512).
// Same scheme as vec_avx2.cpp.
#include "vec_prelude.h"

#if MMCORE_VEC_X86
#if defined(__clang__)
#pragma clang attribute push(                                                               \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"))),             \
    apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#endif
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "vec_kernels.h"
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
// the table itself is baseline code: any CPU may read it
MMCORE_VEC_TABLE(avx512, "avx512", 512)
#else
namespace mmcore::vec {
const Table* table_avx512() { return nullptr; }
}  // namespace mmcore::vec
#endif
