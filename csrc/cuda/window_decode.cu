// Split-K flash-decoding for window_attention (Sq <= 16), GQA-packed, reading RollingKVCache's
// global prefix + ring buffer in place.  Index math: window_decode_plan.h; the CPU emulation of
// the same tiling is csrc/cuda/emulation.cpp.
//
// Grid (splits, row tiles * Hkv, B), 4 warps.  A block owns kBlockM = 16 rows (query i, head h
// of the GQA group: r = i * g + h % g) of one (sample, kv head) and one split of their keys, so
// with Sq * g <= 16 every K/V byte is read once per group.  Per tile of BN keys:
//
//   cp.async   K, V tile (BN, D) -> smem, double buffered (the next tile loads during this one)
//   Q K^T      warp w: keys [w BN/4, (w+1) BN/4) x 16 rows, m16n8k16 MMAs, fp32 -> sS
//   softmax    8 threads per row: mask, running max / sum (log2 domain), P -> sP in bf16/fp16
//   P V        warp w: head-dim columns [w DP/4, (w+1) DP/4), rescaled by alpha, fp32 in registers
//
// Splits > 1 write fp32 partials (out normalised, lse); window_decode_combine merges them.
// Padding columns [D, DP), keys past the split, and rows past Lq are zero in smem (never
// loaded from memory: NaN past the valid lengths cannot leak).  Offsets are int64.
#include <cuda_runtime.h>
#include <math.h>

#include "launch.h"
#include "mma.cuh"

namespace mmcore {
namespace cuda {
namespace {

using decode::kBlockM;
using decode::kThreads;

constexpr float kLn2 = 0.6931471805599453f;

template <int DP>
struct Cfg {
  static constexpr int BN = decode::block_n(DP);  // keys per tile
  static constexpr int LD = DP + 8;    // Q / K / V smem row stride (elements): fragment loads
                                       // of 8 rows x 4 words land in 32 distinct banks
  static constexpr int LDS = BN + 8;   // scores row stride (fp32)
  static constexpr int LDP = BN + 8;   // probabilities row stride
  static constexpr int NT_QK = BN / 32;  // 8-key MMA tiles per warp in Q K^T
  static constexpr int NT_PV = DP / 32;  // 8-column MMA tiles per warp in P V
  static constexpr int KPT = BN / 8;     // keys per softmax thread (8 threads per row)
  static constexpr int kRowsQKV = kBlockM + 4 * BN;  // sQ, then 2 stages of sK, 2 of sV
  static constexpr size_t smem = size_t(decode::smem_bytes(DP));  // the layout below
};

__device__ __forceinline__ float max8(float x) {  // over the 8 lanes of a softmax row
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 4));
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
}

__device__ __forceinline__ float sum8(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 4);
  x += __shfl_xor_sync(0xffffffffu, x, 2);
  return x + __shfl_xor_sync(0xffffffffu, x, 1);
}

template <typename T, int DP>
__global__ void __launch_bounds__(kThreads, 2) window_decode_kernel(const decode::Params p) {
  using C = Cfg<DP>;
  using H = Half<T>;
  constexpr int BN = C::BN, LD = C::LD;
  extern __shared__ __align__(16) unsigned char smem[];
  float* sS = reinterpret_cast<float*>(smem);                  // (16, LDS) scores
  T* sQ = reinterpret_cast<T*>(sS + kBlockM * C::LDS);         // (16, LD)
  T* sK = sQ + kBlockM * LD;                                   // (2, BN, LD)
  T* sV = sK + 2 * BN * LD;                                    // (2, BN, LD)
  T* sP = sV + 2 * BN * LD;                                    // (16, LDP)
  float* sAlpha = reinterpret_cast<float*>(sP + kBlockM * C::LDP);  // (16,)
  float* sM = sAlpha + kBlockM;                                // (16,) running max, log2
  float* sL = sM + kBlockM;                                    // (16,) running sum

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int grp = lane >> 2, tg = lane & 3;
  const int split = blockIdx.x;
  const int64_t rt = decode::row_tiles(p);
  const int64_t hk = blockIdx.y / rt, r0 = (blockIdx.y % rt) * kBlockM, b = blockIdx.z;
  const int64_t g = p.Hq / p.Hkv, R = g * p.Sq;
  int64_t Lq, Lk, i_lo, i_hi, u_begin, u_end;
  decode::lengths(p, b, &Lq, &Lk);
  decode::tile_queries(r0, R, g, &i_lo, &i_hi);
  const decode::KeyRange kr =
      decode::key_range(i_lo, i_hi, Lq, Lk, p.left, p.right, p.G, p.causal);
  decode::split_keys(kr.size(), BN, split, p.splits, &u_begin, &u_end);
  const int D = int(p.D), dch = D / 8;  // 16-byte chunks per row

  // padding columns [D, DP) of sQ, sK, sV stay zero (cp.async writes only [0, D))
  for (int idx = tid; idx < C::kRowsQKV * (DP - D); idx += kThreads) {
    const int row = idx / (DP - D), col = D + idx % (DP - D);
    sQ[row * LD + col] = H::from_float(0.f);
  }
  // Q rows: zeros past the row space or past Lq
  for (int c = tid; c < kBlockM * dch; c += kThreads) {
    const int row = c / dch, ch = c % dch;
    const int64_t rg = r0 + row, i = rg / g, h = hk * g + rg % g;
    const bool ok = rg < R && i < Lq;
    const T* src = static_cast<const T*>(p.q.ptr) +
                   (ok ? b * p.q.sb + h * p.q.sh + i * p.q.sn + ch * 8 : 0);
    cp_async16(sQ + row * LD + ch * 8, src, ok ? 16 : 0);
  }

  auto load_tile = [&](int64_t u0, int stage) {
    T* dk = sK + stage * BN * LD;
    T* dv = sV + stage * BN * LD;
    for (int c = tid; c < BN * dch; c += kThreads) {
      const int n = c / dch, ch = c % dch;
      const int64_t u = u0 + n;
      const T* ks = static_cast<const T*>(p.k.ptr);
      const T* vs = static_cast<const T*>(p.v.ptr);
      int bytes = 0;
      if (u < u_end) {
        int64_t idx;
        const decode::Source src = decode::key_source(kr.key(u), p.map, &idx);
        const decode::View& kv = src == decode::kGlob ? p.k_glob
                                 : src == decode::kRing ? p.k_ring : p.k;
        const decode::View& vv = src == decode::kGlob ? p.v_glob
                                 : src == decode::kRing ? p.v_ring : p.v;
        ks = static_cast<const T*>(kv.ptr) + b * kv.sb + hk * kv.sh + idx * kv.sn + ch * 8;
        vs = static_cast<const T*>(vv.ptr) + b * vv.sb + hk * vv.sh + idx * vv.sn + ch * 8;
        bytes = 16;
      }
      cp_async16(dk + n * LD + ch * 8, ks, bytes);
      cp_async16(dv + n * LD + ch * 8, vs, bytes);
    }
  };

  // softmax state of row srow, replicated in its 8 threads
  const int srow = tid >> 3, sub = tid & 7;
  const int64_t s_rg = r0 + srow, s_i = s_rg / g;
  const bool s_exists = s_rg < R;
  float m_run = -INFINITY, l_run = 0.f;
  float acc[C::NT_PV][4];
#pragma unroll
  for (int nt = 0; nt < C::NT_PV; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;

  const int64_t n_tiles = cdiv(u_end - u_begin, BN);
  if (n_tiles > 0) load_tile(u_begin, 0);
  cp_async_commit();  // group 0: Q and tile 0
  const int ksteps = (D + 15) / 16;
  for (int64_t t = 0; t < n_tiles; ++t) {
    const int stage = int(t & 1);
    if (t + 1 < n_tiles) load_tile(u_begin + (t + 1) * BN, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();  // tile t (and Q) landed
    __syncthreads();

    // S = Q K^T: this warp's BN / 4 keys, all 16 rows
    const T* kt = sK + stage * BN * LD + warp * (BN / 4) * LD;
    float s[C::NT_QK][4];
#pragma unroll
    for (int nt = 0; nt < C::NT_QK; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
    for (int kk = 0; kk < ksteps; ++kk) {
      uint32_t a[4];
      load_a(a, sQ + kk * 16, LD, lane);
#pragma unroll
      for (int nt = 0; nt < C::NT_QK; ++nt) {
        uint32_t bb[2];
        load_b_nk(bb, kt + nt * 8 * LD + kk * 16, LD, lane);
        H::mma(s[nt], a, bb);
      }
    }
#pragma unroll
    for (int nt = 0; nt < C::NT_QK; ++nt) {
      const int col = warp * (BN / 4) + nt * 8 + 2 * tg;
      *reinterpret_cast<float2*>(sS + grp * C::LDS + col) = make_float2(s[nt][0], s[nt][1]);
      *reinterpret_cast<float2*>(sS + (grp + 8) * C::LDS + col) =
          make_float2(s[nt][2], s[nt][3]);
    }
    __syncthreads();

    // online softmax of row srow over keys sub, sub + 8, ... of this tile
    const int64_t u0 = u_begin + t * BN;
    float x[C::KPT];
    float mx = -INFINITY;
#pragma unroll
    for (int q = 0; q < C::KPT; ++q) {
      const int c = sub + 8 * q;
      const int64_t u = u0 + c;
      const bool ok = s_exists && u < u_end &&
                      decode::allowed(s_i, kr.key(u), Lq, Lk, p.left, p.right, p.G, p.causal);
      x[q] = ok ? sS[srow * C::LDS + c] * p.scale_log2 : -INFINITY;
      mx = fmaxf(mx, x[q]);
    }
    const float m_new = fmaxf(m_run, max8(mx));
    const float m_use = m_new == -INFINITY ? 0.f : m_new;  // nothing seen yet: p = 0
    const float alpha = exp2f(m_run - m_use);
    float sum = 0.f;
#pragma unroll
    for (int q = 0; q < C::KPT; ++q) {
      const float pr = exp2f(x[q] - m_use);
      sum += pr;
      sP[srow * C::LDP + sub + 8 * q] = H::from_float(pr);
    }
    l_run = l_run * alpha + sum8(sum);
    m_run = m_new;
    if (sub == 0) sAlpha[srow] = alpha;
    __syncthreads();

    // O = alpha O + P V over this warp's columns
    const float a_lo = sAlpha[grp], a_hi = sAlpha[grp + 8];
#pragma unroll
    for (int nt = 0; nt < C::NT_PV; ++nt) {
      acc[nt][0] *= a_lo;
      acc[nt][1] *= a_lo;
      acc[nt][2] *= a_hi;
      acc[nt][3] *= a_hi;
    }
    const T* vt = sV + stage * BN * LD + warp * (DP / 4);
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t a[4];
      load_a(a, sP + kk * 16, C::LDP, lane);
#pragma unroll
      for (int nt = 0; nt < C::NT_PV; ++nt) {
        uint32_t bb[2];
        load_b_kn(bb, vt + kk * 16 * LD + nt * 8, LD, lane);
        H::mma(acc[nt], a, bb);
      }
    }
    __syncthreads();  // the next iteration refills this stage
  }
  cp_async_wait<0>();

  if (sub == 0) {
    sM[srow] = m_run;
    sL[srow] = l_run;
  }
  __syncthreads();

  // epilogue: rows grp and grp + 8 of this warp's columns
  const bool partial = p.splits > 1;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = grp + 8 * half;
    const int64_t rg = r0 + row;
    if (rg >= R) continue;
    const int64_t i = rg / g, h = hk * g + rg % g;
    const float l = sL[row];
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const int64_t orow = partial ? ((b * p.Hq + h) * p.splits + split) * p.Sq + i
                                 : (b * p.Hq + h) * p.Sq + i;
#pragma unroll
    for (int nt = 0; nt < C::NT_PV; ++nt) {
      const int col = warp * (DP / 4) + nt * 8 + 2 * tg;  // D % 8 == 0: col < D => col+1 < D
      if (col >= D) continue;
      const float o0 = acc[nt][2 * half] * inv, o1 = acc[nt][2 * half + 1] * inv;
      if (partial) {
        *reinterpret_cast<float2*>(static_cast<float*>(p.out) + orow * D + col) =
            make_float2(o0, o1);
      } else {
        *reinterpret_cast<uint32_t*>(static_cast<T*>(p.out) + orow * D + col) = H::pack(o0, o1);
      }
    }
  }
  if (tid < kBlockM && r0 + tid < R) {
    const int64_t rg = r0 + tid, i = rg / g, h = hk * g + rg % g;
    const float l = sL[tid];
    const float lse = l > 0.f ? sM[tid] * kLn2 + logf(l) : -INFINITY;
    p.lse[partial ? ((b * p.Hq + h) * p.splits + split) * p.Sq + i : (b * p.Hq + h) * p.Sq + i] =
        lse;
  }
}

// Merge split partials: one warp per (b, h, i) row.  o_part (rows', splits, D) normalised,
// l_part (rows', splits) with rows' = (B Hq) and the split index between (b h) and i.
template <typename T>
__global__ void __launch_bounds__(128) window_decode_combine(const float* o_part,
                                                             const float* l_part, T* out,
                                                             float* lse, int64_t rows,
                                                             int64_t Sq, int64_t D, int splits) {
  __shared__ float sw[4][decode::kMaxSplits];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t row = int64_t(blockIdx.x) * 4 + warp;
  if (row >= rows) return;
  const int64_t bh = row / Sq, i = row % Sq;
  const int64_t base = bh * splits * Sq + i;  // + s * Sq: partial row of split s
  float m = -INFINITY;
  for (int s = lane; s < splits; s += 32) m = fmaxf(m, l_part[base + s * Sq]);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  const float m_use = m == -INFINITY ? 0.f : m;
  float tot = 0.f;
  for (int s = lane; s < splits; s += 32) {
    const float w = expf(l_part[base + s * Sq] - m_use);  // -inf -> 0
    sw[warp][s] = w;
    tot += w;
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) tot += __shfl_xor_sync(0xffffffffu, tot, o);
  __syncwarp();
  const float inv = tot > 0.f ? 1.f / tot : 0.f;
  for (int64_t d = 2 * lane; d < D; d += 64) {
    float o0 = 0.f, o1 = 0.f;
    for (int s = 0; s < splits; ++s) {
      const float w = sw[warp][s];
      if (w == 0.f) continue;  // an empty split's partial is 0 (its lse -inf)
      const float2 v = *reinterpret_cast<const float2*>(o_part + (base + s * Sq) * D + d);
      o0 += w * v.x;
      o1 += w * v.y;
    }
    *reinterpret_cast<uint32_t*>(out + row * D + d) = Half<T>::pack(o0 * inv, o1 * inv);
  }
  if (lane == 0) lse[row] = tot > 0.f ? m_use + logf(tot) : -INFINITY;
}

template <typename T, int DP>
cudaError_t launch(decode::Params p, void* out, float* lse, float* o_part, float* l_part,
                   cudaStream_t stream) {
  const size_t smem = Cfg<DP>::smem;
  cudaError_t e = cudaFuncSetAttribute(window_decode_kernel<T, DP>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (e != cudaSuccess) return e;
  const bool partial = p.splits > 1;
  p.out = partial ? static_cast<void*>(o_part) : out;
  p.lse = partial ? l_part : lse;
  const dim3 grid(p.splits, unsigned(decode::row_tiles(p) * p.Hkv), unsigned(p.B));
  window_decode_kernel<T, DP><<<grid, kThreads, smem, stream>>>(p);
  if (partial) {
    const int64_t rows = p.B * p.Hq * p.Sq;
    window_decode_combine<T><<<unsigned(cdiv(rows, 4)), 128, 0, stream>>>(
        o_part, l_part, static_cast<T*>(out), lse, rows, p.Sq, p.D, p.splits);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_dim(const decode::Params& p, void* out, float* lse, float* o_part,
                         float* l_part, cudaStream_t stream) {
  switch (decode::padded_head_dim(p.D)) {
    case 64: return launch<T, 64>(p, out, lse, o_part, l_part, stream);
    case 128: return launch<T, 128>(p, out, lse, o_part, l_part, stream);
    default: return launch<T, 256>(p, out, lse, o_part, l_part, stream);
  }
}

}  // namespace

const char* window_decode(decode::Params p, DType dt, void* out, float* lse, float* o_part,
                          float* l_part, void* stream) {
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  const cudaError_t e = dt == DType::kBF16
                            ? dispatch_dim<__nv_bfloat16>(p, out, lse, o_part, l_part, st)
                            : dispatch_dim<__half>(p, out, lse, o_part, l_part, st);
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

}  // namespace cuda
}  // namespace mmcore
