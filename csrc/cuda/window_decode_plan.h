// Index math of the split-K window decode kernel (csrc/cuda/window_decode.cu), shared with its
// CPU emulation.  Pure C++: no CUDA or torch headers.
//
// Work decomposition.  Query head h of kv head hk = h / g (g = Hq / Hkv) and query i form the
// row r = i * g + (h % g) of kv head hk's "row space" (R = g * Sq rows).  A block owns
// kBlockM consecutive rows of one (sample b, kv head hk) -- with Sq = 1 and g <= 16 that is the
// whole GQA group, so K/V are read once per group -- and one split of its keys.
//
// Keys a block visits (docs/design.md mask, bottom-right aligned: p = i + Lk - Lq):
//   the global prefix [0, g_end) and the window [lo, lo + n_win), numbered by a "virtual"
//   index u: u < g_end is key u, else key lo + (u - g_end).  Tiles of kBlockN virtual keys are
//   dealt out to the splits; the per-element mask `allowed` then refines.
//
// Where key j lives (KeyMap): j < n_glob -> the global prefix tensor; j >= fresh_start -> the
// fresh k/v tensor at j - fresh_start; else the ring buffer at slot j % ring_size.  The op
// contract (plain k, v) is n_glob = fresh_start = 0: every key is fresh.  RollingKVCache
// passes its prefix, its ring (read before the new chunk is written) and the chunk itself.
#pragma once
#include "hd.h"

namespace mmcore {
namespace decode {

constexpr int kBlockM = 16;       // rows per block (one m16n8k16 M tile)
constexpr int kThreads = 128;     // 4 warps
constexpr int kMaxSq = 16;        // queries per call the decode path takes
constexpr int kMaxSplits = 128;
constexpr int kMaxHeadDim = 256;
constexpr int64_t kUnbounded = int64_t(1) << 40;  // a window side of -1

// Keys per tile for a padded head dim (64 / 128 / 256): 64, or 32 at 256 (smem).
constexpr int block_n(int head_dim_padded) { return head_dim_padded > 128 ? 32 : 64; }
// Head dims are padded to a kernel instantiation: 64, 128 or 256.
inline int padded_head_dim(int64_t D) { return D <= 64 ? 64 : (D <= 128 ? 128 : 256); }

// Dynamic shared memory of the kernel for padded head dim DP (16-bit inputs): scores
// (16, BN + 8) fp32, Q (16, DP + 8), K and V (2 stages, BN, DP + 8), P (16, BN + 8), and three
// (16,) fp32 row vectors.  Row pads of 8 elements keep the MMA fragment loads conflict-free.
constexpr int64_t smem_bytes(int DP) {
  return int64_t(kBlockM) * (block_n(DP) + 8) * 4 +
         int64_t(kBlockM + 4 * block_n(DP)) * (DP + 8) * 2 +
         int64_t(kBlockM) * (block_n(DP) + 8) * 2 + 3 * kBlockM * 4;
}

// One (B, H, S, D) operand: base pointer and element strides (last dim contiguous).
struct View {
  const void* ptr = nullptr;
  int64_t sb = 0, sh = 0, sn = 0;
};

struct KeyMap {
  int64_t n_glob = 0;       // keys [0, n_glob) read from the global-prefix tensor
  int64_t fresh_start = 0;  // keys >= fresh_start read from the fresh tensor
  int64_t ring_size = 1;    // ring slots (keys in between: slot j % ring_size)
};

enum Source : int { kGlob = 0, kRing = 1, kFresh = 2 };

// Which tensor holds logical key j, and its index along that tensor's S dim.
MMCORE_HD Source key_source(int64_t j, const KeyMap& m, int64_t* idx) {
  if (j < m.n_glob) {
    *idx = j;
    return kGlob;
  }
  if (j >= m.fresh_start) {
    *idx = j - m.fresh_start;
    return kFresh;
  }
  *idx = j % m.ring_size;
  return kRing;
}

// allowed(i, j) of docs/design.md; left / right already normalised (kUnbounded, causal -> right 0).
MMCORE_HD bool allowed(int64_t i, int64_t j, int64_t Lq, int64_t Lk, int64_t left,
                       int64_t right, int64_t G, bool causal) {
  if (i >= Lq || j >= Lk || j < 0) return false;
  const int64_t p = i + Lk - Lq;
  const bool in_win = j >= p - left && j <= p + right;
  bool glob = j < G || p < G;
  if (causal) glob = glob && j <= p;
  return in_win || glob;
}

// Keys seen by queries [i_lo, i_hi): the global prefix [0, g_end) then [lo, lo + n_win).
struct KeyRange {
  int64_t g_end = 0, lo = 0, n_win = 0;
  MMCORE_HD int64_t size() const { return g_end + n_win; }
  MMCORE_HD int64_t key(int64_t u) const { return u < g_end ? u : lo + (u - g_end); }
};

MMCORE_HD KeyRange key_range(int64_t i_lo, int64_t i_hi, int64_t Lq, int64_t Lk, int64_t left,
                             int64_t right, int64_t G, bool causal) {
  KeyRange r;
  i_hi = imin(i_hi, Lq);
  if (i_hi <= i_lo || Lk <= 0) return r;
  const int64_t off = Lk - Lq;
  const int64_t p_lo = i_lo + off, p_hi = i_hi - 1 + off;
  int64_t lo = imax(p_lo - left, 0);
  int64_t hi = imin(p_hi + right + 1, Lk);
  if (p_lo < G) {  // a global query sees every key (causal: up to its position)
    lo = 0;
    hi = causal ? imin(p_hi + 1, Lk) : Lk;
  }
  r.lo = lo;
  r.n_win = imax(hi - lo, 0);
  r.g_end = imin(G, Lk);
  if (r.n_win > 0) r.g_end = imin(r.g_end, lo);  // prefix keys inside the window count once
  return r;
}

// Virtual keys [*u0, *u1) of split `split` of `splits`: whole tiles of `bn` keys each.
MMCORE_HD void split_keys(int64_t n_keys, int bn, int split, int splits, int64_t* u0,
                          int64_t* u1) {
  const int64_t tiles = cdiv(n_keys, bn);
  const int64_t per = cdiv(tiles, splits);
  *u0 = imin(split * per * bn, n_keys);
  *u1 = imin((split + 1) * per * bn, n_keys);
}

// Rows [r0, r0 + kBlockM) of the row space cover queries [i_lo, i_hi).
MMCORE_HD void tile_queries(int64_t r0, int64_t R, int64_t group, int64_t* i_lo,
                            int64_t* i_hi) {
  *i_lo = r0 / group;
  *i_hi = (imin(r0 + kBlockM, R) - 1) / group + 1;
}

// Splits per (sample, kv head, row tile): enough blocks to give every SM a few, each split
// at least 4 tiles of keys (the partials and the combine cost about one tile).
inline int num_splits(int64_t blocks, int64_t max_keys, int bn, int sms) {
  const int64_t want = cdiv(4 * int64_t(sms), imax(blocks, 1));
  const int64_t cap = imax(cdiv(max_keys, bn) / 4, 1);
  return int(imax(1, imin(imin(want, cap), kMaxSplits)));
}

// Everything a launch needs (plain data: a kernel parameter).
struct Params {
  View q;                                   // (B, Hq, Sq, D)
  View k, v;                                // fresh keys (B, Hkv, Sk_fresh, D)
  View k_glob, v_glob;                      // global prefix (B, Hkv, G_stored, D) or unused
  View k_ring, v_ring;                      // ring (B, Hkv, ring_size, D) or unused
  KeyMap map;
  const int64_t* seqlens_q = nullptr;       // (B,) or null: Sq
  const int64_t* seqlens_k = nullptr;       // (B,) or null: Sk
  void* out = nullptr;       // splits == 1: (B, Hq, Sq, D) in the input dtype, contiguous
                             // else fp32 partials (B, Hq, splits, Sq, D), contiguous
  float* lse = nullptr;      // (B, Hq, Sq) or partials (B, Hq, splits, Sq), contiguous
  int64_t B = 0, Hq = 0, Hkv = 0, Sq = 0, Sk = 0, D = 0;  // Sk: logical keys
  int64_t left = 0, right = 0, G = 0;       // normalised (kUnbounded; causal -> right 0)
  bool causal = false;
  float scale_log2 = 0.f;                   // softmax scale * log2(e)
  int splits = 1;
};

// Lq, Lk of sample b, clamped to the tensor sizes.
MMCORE_HD void lengths(const Params& p, int64_t b, int64_t* Lq, int64_t* Lk) {
  *Lq = p.seqlens_q ? imax(imin(p.seqlens_q[b], p.Sq), 0) : p.Sq;
  *Lk = p.seqlens_k ? imax(imin(p.seqlens_k[b], p.Sk), 0) : p.Sk;
}

// Row tiles per kv head.
MMCORE_HD int64_t row_tiles(const Params& p) { return cdiv((p.Hq / p.Hkv) * p.Sq, kBlockM); }

}  // namespace decode
}  // namespace mmcore
