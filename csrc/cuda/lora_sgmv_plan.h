// Index math of the SGMV LoRA kernels (csrc/cuda/lora_sgmv.cu), shared with their CPU
// emulation.  Pure C++: no CUDA or torch headers.
//
// Rows of x are grouped by adapter once per call (the plan):
//   perm (M,)          row order: rows of adapter 0, then adapter 1, ...; base-only rows (id -1,
//                      or out of range) come first and are not in any segment
//   seg (A + 1,)       adapter a owns sorted positions [seg[a], seg[a + 1])
//   tile_start (A + 1,) adapter a owns row tiles [tile_start[a], tile_start[a + 1]), each of
//                      kBlockM sorted positions (its last tile may be short)
// Order inside a segment is free (the GPU plan scatters with atomics): every output row
// depends on its own input row only, so results do not depend on it.
// A null plan (single adapter, no ids) is one segment [0, M) of adapter 0 in natural order.
//
//   shrink  t[ks][pos][0:r] = x[perm[pos]] . lora_a[a][0:r]^T over K slice ks   (fp32 partials)
//   expand  y[perm[pos]][n] += scaling[a] * bf16(sum_ks t[ks][pos]) . lora_b[a][n]^T
#pragma once
#include "hd.h"

namespace mmcore {
namespace sgmv {

constexpr int kBlockM = 64;        // rows per tile (4 warps x 16)
constexpr int kThreads = 128;
constexpr int kShrinkBK = 32;      // K elements per shrink pipeline stage
constexpr int kExpandBN = 64;      // output columns per expand block
constexpr int kMaxRank = 128;
constexpr int kMaxAdapters = 4096;  // the GPU plan keeps two (A + 1) int arrays in smem
constexpr int kMaxKSplits = 16;

// Rank padded to an instantiation: 16, 32, 64 or 128.
inline int padded_rank(int64_t r) { return r <= 16 ? 16 : (r <= 32 ? 32 : (r <= 64 ? 64 : 128)); }

struct Plan {
  const int32_t* perm = nullptr;        // (M,) or null: identity
  const int32_t* seg = nullptr;         // (A + 1,) or null: one segment [0, M)
  const int32_t* tile_start = nullptr;  // (A + 1,) or null
  int64_t num_adapters = 1;
};

// Upper bound on the row tiles of any plan of M rows over A adapters (the grid size; tiles
// past the real count exit at once): each non-empty segment wastes less than one tile.
MMCORE_HD int64_t max_tiles(int64_t M, int64_t A) { return cdiv(M, kBlockM) + imin(A, M); }

// Row tile t -> adapter *a and sorted positions [*p0, *p1); false when t is past the last tile.
MMCORE_HD bool tile_rows(const Plan& pl, int64_t M, int64_t t, int64_t* a, int64_t* p0,
                         int64_t* p1) {
  if (pl.tile_start == nullptr) {
    *a = 0;
    *p0 = t * kBlockM;
    *p1 = imin(*p0 + kBlockM, M);
    return *p0 < M;
  }
  const int64_t A = pl.num_adapters;
  if (t >= pl.tile_start[A]) return false;
  int64_t lo = 0, hi = A;  // last a with tile_start[a] <= t (empty segments share a start)
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (pl.tile_start[mid] <= t) lo = mid; else hi = mid;
  }
  *a = lo;
  *p0 = pl.seg[lo] + (t - pl.tile_start[lo]) * kBlockM;
  *p1 = imin(*p0 + kBlockM, int64_t(pl.seg[lo + 1]));
  return true;
}

MMCORE_HD int64_t row_of(const Plan& pl, int64_t pos) { return pl.perm ? pl.perm[pos] : pos; }

// K slice of split ks: [*k0, *k1), whole kShrinkBK chunks.
MMCORE_HD void k_slice(int64_t K, int ks, int ksplits, int64_t* k0, int64_t* k1) {
  const int64_t per = cdiv(cdiv(K, kShrinkBK), ksplits) * kShrinkBK;
  *k0 = imin(ks * per, K);
  *k1 = imin((ks + 1) * per, K);
}

// K splits of the shrink: enough blocks for a few per SM, each slice >= 2 chunks.
inline int num_ksplits(int64_t tiles, int64_t K, int sms) {
  const int64_t want = cdiv(4 * int64_t(sms), imax(tiles, 1));
  const int64_t cap = imax(cdiv(K, kShrinkBK) / 2, 1);
  return int(imax(1, imin(imin(want, cap), kMaxKSplits)));
}

// Everything the shrink / expand kernels need (plain data: a kernel parameter).
struct Params {
  const void* x = nullptr;       // (M, K), row stride sx, K contiguous
  const void* lora_a = nullptr;  // (A, r, K) contiguous
  const void* lora_b = nullptr;  // (A, N, r) contiguous
  const float* scaling = nullptr;  // (A,)
  void* y = nullptr;             // (M, N), row stride sy: base output, the LoRA term added in place
  float* t = nullptr;            // (ksplits, M, r_pad) fp32 shrink partials
  Plan plan;
  int64_t M = 0, K = 0, N = 0, r = 0, sx = 0, sy = 0;
  int r_pad = 16;
  int ksplits = 1;
};

}  // namespace sgmv
}  // namespace mmcore
