// The AVX2 + FMA build of vec_kernels.h (ATen's CPU_CAPABILITY AVX2).
//
// The target switch is a pragma, not a -mavx2 flag, so that setup.py keeps one flag set for
// every source and the baseline headers of vec_prelude.h stay baseline.  GCC's C++ front end
// does not define the ISA macros for a pragma target; ATen's headers (through sleef.h) test
// them, so they are defined here to match.
#include "vec_prelude.h"

#if MMCORE_VEC_X86
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
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
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "vec_kernels.h"
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
// the table itself is baseline code: any CPU may read it
MMCORE_VEC_TABLE(avx2, "avx2", 256)
#else
namespace mmcore::vec {
const Table* table_avx2() { return nullptr; }
}  // namespace mmcore::vec
#endif
