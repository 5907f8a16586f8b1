// The default build of vec_kernels.h: the baseline ISA (SSE2 on x86-64, NEON on aarch64).
#include "vec_prelude.h"

#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#include "vec_kernels.h"

#if defined(__aarch64__)
MMCORE_VEC_TABLE(default, "neon", 128)
#else
MMCORE_VEC_TABLE(default, "default", 128)
#endif
