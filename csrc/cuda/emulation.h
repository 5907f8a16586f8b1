// CPU emulation of the CUDA kernels: the same Params, the same index math (window_decode_plan.h,
// lora_sgmv_plan.h), the same tiles, splits and roundings (P and x A^T rounded to the input
// dtype, fp32 accumulation), with plain loops in place of MMAs.  It is the CPU
// implementation of mmcore_C::window_decode / lora_sgmv_fwd, so CI checks the kernels' logic
// (which keys, where they live, how the splits combine) against the float64 oracle.
#pragma once
#include <ATen/ATen.h>

#include "launch.h"

namespace mmcore {
namespace emulation {

// Writes p.out / p.lse exactly as window_decode (with partials when p.splits > 1).
void window_decode(decode::Params p, at::ScalarType dt, void* out, float* lse);

// Adds the low-rank term into p.y exactly as the shrink + expand kernels.
void sgmv(const sgmv::Params& p, at::ScalarType dt);

// The plan of lora_sgmv_plan.h with rows in their original order inside each segment.
void sgmv_plan(const int64_t* ids, int64_t M, int64_t A, int32_t* perm, int32_t* seg,
               int32_t* tile_start);

}  // namespace emulation
}  // namespace mmcore
