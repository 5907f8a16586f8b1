// Host entry points of the CUDA kernels, for the torch binding (csrc/cuda/bindings.cpp).
//
// Plain C++ (no CUDA, no torch headers): the kernel translation units (*.cu) compile with the
// CUDA toolkit alone.  `stream` is a cudaStream_t.  Each returns nullptr on success, else the
// CUDA error string of the launch.
#pragma once
#include <stdint.h>

#include "lora_sgmv_plan.h"
#include "window_decode_plan.h"

namespace mmcore {
namespace cuda {

enum class DType : int { kBF16 = 0, kF16 = 1 };

// Split-K window decode.  p.splits == 1: writes out (B, Hq, Sq, D) and lse (B, Hq, Sq)
// directly; else the blocks write fp32 partials o_part (B, Hq, splits, Sq, D) and
// l_part (B, Hq, splits, Sq) and a combine kernel merges them into out / lse.
// p.out / p.lse are set here.  Dynamic shared memory: decode::smem_bytes(padded D).
const char* window_decode(decode::Params p, DType dt, void* out, float* lse, float* o_part,
                          float* l_part, void* stream);

// Group the M rows by adapter: perm (M,), seg (A + 1,), tile_start (A + 1,), all int32
// (layout in lora_sgmv_plan.h).  ids: (M,) int64, -1 = base only.  One block.
const char* sgmv_plan(const int64_t* ids, int64_t M, int64_t A, int32_t* perm, int32_t* seg,
                      int32_t* tile_start, void* stream);

// t = x . lora_a^T per segment (fp32 partials per K split), then y += s . t . lora_b^T.
const char* sgmv(const sgmv::Params& p, DType dt, void* stream);

}  // namespace cuda
}  // namespace mmcore
