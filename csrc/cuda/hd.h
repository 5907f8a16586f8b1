// MMCORE_HD: a function compiled for both the host and the device.
//
// The index math of the CUDA kernels (which keys a block reads, where key j lives in the
// rolling cache, which rows an SGMV tile owns) is written once with this macro: nvcc compiles it
// into the kernels, the host compiler into the CPU emulation (csrc/cuda/emulation.cpp) that CI
// tests against the float64 oracle without a GPU.
#pragma once
#include <stdint.h>

#if defined(__CUDACC__)
#define MMCORE_HD __host__ __device__ __forceinline__
#else
#define MMCORE_HD inline
#endif

namespace mmcore {

MMCORE_HD int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
MMCORE_HD int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
MMCORE_HD int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace mmcore
