// SGMV for lora_linear: rows grouped by adapter, then a grouped shrink (x A^T) and a grouped
// expand (. B^T added into y).  The base GEMM x W^T + b stays cuBLAS (the binding calls
// at::linear first); these kernels add the low-rank term in place.  Index math and the
// layout of the plan: lora_sgmv_plan.h; CPU emulation: csrc/cuda/emulation.cpp.
//
//   sgmv_plan_kernel    one block: counting sort of the rows by adapter (histogram, scan,
//                       scatter) -> perm, seg, tile_start; no host sync
//   sgmv_shrink_kernel  grid (row tiles, K splits), 4 warps x 16 rows, r_pad columns; x rows
//                       gathered through perm with cp.async, double buffered over K;
//                       writes fp32 partials t (ksplits, M, r_pad)
//   sgmv_expand_kernel  grid (row tiles, N / 64); t summed over the K splits and rounded to
//                       bf16/fp16 (as a bf16 PyTorch computation rounds x A^T), times lora_b
//                       tile, scaled, added into y in fp32 and rounded once
// Tiles past the plan's last one exit at once (the grid is an upper bound: no host sync).
#include <cuda_runtime.h>

#include "launch.h"
#include "mma.cuh"

namespace mmcore {
namespace cuda {
namespace {

using sgmv::kBlockM;
using sgmv::kThreads;

// ---------------------------------------------------------------- plan

// Inclusive scan of an int pair across a warp.
__device__ __forceinline__ int2 warp_inclusive_scan(int2 v, int lane) {
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int x = __shfl_up_sync(0xffffffffu, v.x, o);
    const int y = __shfl_up_sync(0xffffffffu, v.y, o);
    if (lane >= o) {
      v.x += x;
      v.y += y;
    }
  }
  return v;
}

// Exclusive scan of one (rows, tiles) pair per thread across the block.
__device__ __forceinline__ int2 block_exclusive_scan(int2 v) {
  __shared__ int2 warp_tot[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nwarps = (blockDim.x + 31) >> 5;
  const int2 inc = warp_inclusive_scan(v, lane);
  if (lane == 31) warp_tot[warp] = inc;
  __syncthreads();
  if (warp == 0) {
    const int2 w = lane < nwarps ? warp_tot[lane] : make_int2(0, 0);
    const int2 wi = warp_inclusive_scan(w, lane);
    if (lane < nwarps) warp_tot[lane] = make_int2(wi.x - w.x, wi.y - w.y);  // exclusive
  }
  __syncthreads();
  return make_int2(inc.x - v.x + warp_tot[warp].x, inc.y - v.y + warp_tot[warp].y);
}

// Slot of a row: 0 = base only (id -1 or out of range), a + 1 = adapter a.
__device__ __forceinline__ int slot_of(int64_t id, int64_t A) {
  return (id >= 0 && id < A) ? int(id) + 1 : 0;
}

__global__ void __launch_bounds__(1024) sgmv_plan_kernel(const int64_t* ids, int64_t M,
                                                         int64_t A, int32_t* perm, int32_t* seg,
                                                         int32_t* tile_start) {
  extern __shared__ int plan_smem[];
  int* cnt = plan_smem;          // (A + 1,) rows per slot
  int* cur = plan_smem + A + 1;  // (A + 1,) scatter cursors
  const int tid = threadIdx.x, nt = blockDim.x;
  for (int64_t s = tid; s <= A; s += nt) cnt[s] = 0;
  __syncthreads();
  for (int64_t m = tid; m < M; m += nt) atomicAdd(&cnt[slot_of(ids[m], A)], 1);
  __syncthreads();
  // each thread scans a run of slots; slot s >= 1 (adapter s - 1) has ceil(cnt / kBlockM) tiles
  const int64_t chunk = cdiv(A + 1, nt);
  const int64_t s0 = imin(tid * chunk, A + 1), s1 = imin(s0 + chunk, A + 1);
  int2 local = make_int2(0, 0);
  for (int64_t s = s0; s < s1; ++s) {
    local.x += cnt[s];
    local.y += s ? int(cdiv(cnt[s], kBlockM)) : 0;
  }
  int2 pre = block_exclusive_scan(local);
  for (int64_t s = s0; s < s1; ++s) {
    cur[s] = pre.x;
    if (s >= 1) {
      seg[s - 1] = pre.x;
      tile_start[s - 1] = pre.y;
    }
    pre.x += cnt[s];
    pre.y += s ? int(cdiv(cnt[s], kBlockM)) : 0;
  }
  if (s0 < s1 && s1 == A + 1) {  // the owner of the last slot closes the arrays
    seg[A] = pre.x;
    tile_start[A] = pre.y;
  }
  __syncthreads();
  for (int64_t m = tid; m < M; m += nt) perm[atomicAdd(&cur[slot_of(ids[m], A)], 1)] = int32_t(m);
}

// ---------------------------------------------------------------- shrink: t = x A^T

template <typename T, int RP>
__global__ void __launch_bounds__(kThreads) sgmv_shrink_kernel(const sgmv::Params p) {
  using H = Half<T>;
  constexpr int BK = sgmv::kShrinkBK, LDX = BK + 8;  // 80-byte rows: conflict-free fragments
  constexpr int CH = BK / 8;                          // 16-byte chunks per row
  __shared__ __align__(16) T sX[2][kBlockM * LDX];   // (BM, BK) x rows, in sorted order
  __shared__ __align__(16) T sA[2][RP * LDX];        // (r_pad, BK) lora_a[a] rows
  int64_t a, p0, p1, k0, k1;
  if (!sgmv::tile_rows(p.plan, p.M, blockIdx.x, &a, &p0, &p1)) return;
  const int ks = blockIdx.y;
  sgmv::k_slice(p.K, ks, p.ksplits, &k0, &k1);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const T* x = static_cast<const T*>(p.x);
  const T* la = static_cast<const T*>(p.lora_a) + a * p.r * p.K;

  auto load = [&](int64_t kb, int stage) {
    for (int c = tid; c < kBlockM * CH; c += kThreads) {
      const int m = c / CH, ch = c % CH;
      const int64_t pos = p0 + m, k = kb + ch * 8;
      const bool ok = pos < p1 && k < k1;
      const T* src = x + (ok ? sgmv::row_of(p.plan, pos) * p.sx + k : 0);
      cp_async16(&sX[stage][m * LDX + ch * 8], src, ok ? 16 : 0);
    }
    for (int c = tid; c < RP * CH; c += kThreads) {
      const int n = c / CH, ch = c % CH;
      const int64_t k = kb + ch * 8;
      const bool ok = n < p.r && k < k1;
      cp_async16(&sA[stage][n * LDX + ch * 8], la + (ok ? n * p.K + k : 0), ok ? 16 : 0);
    }
  };

  float acc[RP / 8][4];
#pragma unroll
  for (int nt = 0; nt < RP / 8; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
  const bool busy = p0 + warp * 16 < p1;  // this warp's 16 rows hold a row of the segment
  const int64_t nk = cdiv(k1 - k0, BK);
  if (nk > 0) load(k0, 0);
  cp_async_commit();
  for (int64_t it = 0; it < nk; ++it) {
    const int stage = int(it & 1);
    if (it + 1 < nk) load(k0 + (it + 1) * BK, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    if (busy) {
#pragma unroll
      for (int kk = 0; kk < BK / 16; ++kk) {
        uint32_t af[4];
        load_a(af, &sX[stage][warp * 16 * LDX + kk * 16], LDX, lane);
#pragma unroll
        for (int nt = 0; nt < RP / 8; ++nt) {
          uint32_t bf[2];
          load_b_nk(bf, &sA[stage][nt * 8 * LDX + kk * 16], LDX, lane);
          H::mma(acc[nt], af, bf);
        }
      }
    }
    __syncthreads();
  }
  cp_async_wait<0>();
  if (!busy) return;
  const int grp = lane >> 2, tg = lane & 3;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int64_t pos = p0 + warp * 16 + grp + 8 * half;
    if (pos >= p1) continue;
    float* out = p.t + (int64_t(ks) * p.M + pos) * RP;
#pragma unroll
    for (int nt = 0; nt < RP / 8; ++nt)
      *reinterpret_cast<float2*>(out + nt * 8 + 2 * tg) =
          make_float2(acc[nt][2 * half], acc[nt][2 * half + 1]);
  }
}

// ---------------------------------------------------------------- expand: y += s t B^T

template <typename T, int RP>
__global__ void __launch_bounds__(kThreads) sgmv_expand_kernel(const sgmv::Params p) {
  using H = Half<T>;
  constexpr int BN = sgmv::kExpandBN, LDT = RP + 8;
  __shared__ __align__(16) T sT[kBlockM * LDT];  // (BM, r_pad) t rounded to T
  __shared__ __align__(16) T sB[BN * LDT];       // (BN, r_pad) lora_b[a][n0:n0+BN]
  int64_t a, p0, p1;
  if (!sgmv::tile_rows(p.plan, p.M, blockIdx.x, &a, &p0, &p1)) return;
  const int64_t n0 = int64_t(blockIdx.y) * BN;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  for (int idx = tid; idx < kBlockM * (RP / 2); idx += kThreads) {
    const int m = idx / (RP / 2), c = 2 * (idx % (RP / 2));
    const int64_t pos = p0 + m;
    float2 v = make_float2(0.f, 0.f);
    if (pos < p1) {
      for (int ks = 0; ks < p.ksplits; ++ks) {
        const float2 w = *reinterpret_cast<const float2*>(p.t + (int64_t(ks) * p.M + pos) * RP + c);
        v.x += w.x;
        v.y += w.y;
      }
    }
    *reinterpret_cast<uint32_t*>(&sT[m * LDT + c]) = H::pack(v.x, v.y);
  }
  const T* lb = static_cast<const T*>(p.lora_b) + a * p.N * p.r;
  for (int idx = tid; idx < BN * RP; idx += kThreads) {
    const int n = idx / RP, k = idx % RP;
    const bool ok = n0 + n < p.N && k < p.r;
    sB[n * LDT + k] = ok ? lb[(n0 + n) * p.r + k] : H::from_float(0.f);
  }
  __syncthreads();
  if (p0 + warp * 16 >= p1) return;

  float acc[BN / 8][4];
#pragma unroll
  for (int nt = 0; nt < BN / 8; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
#pragma unroll
  for (int kk = 0; kk < RP / 16; ++kk) {
    uint32_t af[4];
    load_a(af, &sT[warp * 16 * LDT + kk * 16], LDT, lane);
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
      uint32_t bf[2];
      load_b_nk(bf, &sB[nt * 8 * LDT + kk * 16], LDT, lane);
      H::mma(acc[nt], af, bf);
    }
  }
  const float s = p.scaling[a];
  const int grp = lane >> 2, tg = lane & 3;
  T* y = static_cast<T*>(p.y);
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int64_t pos = p0 + warp * 16 + grp + 8 * half;
    if (pos >= p1) continue;
    T* yrow = y + sgmv::row_of(p.plan, pos) * p.sy;
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
      const int64_t n = n0 + nt * 8 + 2 * tg;  // N even: n < N => n + 1 < N
      if (n >= p.N) continue;
      uint32_t* dst = reinterpret_cast<uint32_t*>(yrow + n);
      const float2 base = H::unpack(*dst);
      *dst = H::pack(base.x + s * acc[nt][2 * half], base.y + s * acc[nt][2 * half + 1]);
    }
  }
}

template <typename T, int RP>
cudaError_t launch(const sgmv::Params& p, cudaStream_t stream) {
  const int64_t tiles = p.plan.tile_start ? sgmv::max_tiles(p.M, p.plan.num_adapters)
                                          : cdiv(p.M, kBlockM);
  sgmv_shrink_kernel<T, RP><<<dim3(unsigned(tiles), unsigned(p.ksplits)), kThreads, 0,
                              stream>>>(p);
  sgmv_expand_kernel<T, RP><<<dim3(unsigned(tiles), unsigned(cdiv(p.N, sgmv::kExpandBN))),
                              kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_rank(const sgmv::Params& p, cudaStream_t stream) {
  switch (p.r_pad) {
    case 16: return launch<T, 16>(p, stream);
    case 32: return launch<T, 32>(p, stream);
    case 64: return launch<T, 64>(p, stream);
    default: return launch<T, 128>(p, stream);
  }
}

}  // namespace

const char* sgmv_plan(const int64_t* ids, int64_t M, int64_t A, int32_t* perm, int32_t* seg,
                      int32_t* tile_start, void* stream) {
  const size_t smem = 2 * size_t(A + 1) * sizeof(int);
  cudaError_t e = cudaFuncSetAttribute(sgmv_plan_kernel,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (e == cudaSuccess) {
    sgmv_plan_kernel<<<1, 1024, smem, static_cast<cudaStream_t>(stream)>>>(ids, M, A, perm,
                                                                            seg, tile_start);
    e = cudaGetLastError();
  }
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

const char* sgmv(const sgmv::Params& p, DType dt, void* stream) {
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  const cudaError_t e = dt == DType::kBF16 ? dispatch_rank<__nv_bfloat16>(p, st)
                                           : dispatch_rank<__half>(p, st);
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

}  // namespace cuda
}  // namespace mmcore
