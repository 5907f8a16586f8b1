// CPU emulation of window_decode.cu and lora_sgmv.cu (see emulation.h).  Loops mirror the
// kernels' blocks: one iteration of the outer loops is one CUDA block.
#include "cuda/emulation.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <limits>
#include <vector>

namespace mmcore {
namespace emulation {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kLn2 = 0.6931471805599453f;

// The value a kernel stores when it rounds fp32 to T.
template <typename T>
float round_to(float x) { return static_cast<float>(static_cast<T>(x)); }

template <typename T>
const T* row_ptr(const decode::View& v, int64_t b, int64_t h, int64_t n) {
  return static_cast<const T*>(v.ptr) + b * v.sb + h * v.sh + n * v.sn;
}

// One block of window_decode_kernel: rows [r0, r0 + 16) of (b, hk), split `split`.
template <typename T>
void decode_block(const decode::Params& p, int64_t b, int64_t hk, int64_t r0, int split) {
  using namespace decode;
  const int BN = block_n(padded_head_dim(p.D));
  const int64_t g = p.Hq / p.Hkv, R = g * p.Sq, D = p.D;
  int64_t Lq, Lk, i_lo, i_hi, u_begin, u_end;
  lengths(p, b, &Lq, &Lk);
  tile_queries(r0, R, g, &i_lo, &i_hi);
  const KeyRange kr = key_range(i_lo, i_hi, Lq, Lk, p.left, p.right, p.G, p.causal);
  split_keys(kr.size(), BN, split, p.splits, &u_begin, &u_end);

  std::vector<float> q(kBlockM * D, 0.f), acc(kBlockM * D, 0.f), m_run(kBlockM, kNegInf),
      l_run(kBlockM, 0.f), kt(BN * D), vt(BN * D), s(kBlockM * BN);
  for (int r = 0; r < kBlockM; ++r) {
    const int64_t rg = r0 + r, i = rg / g, h = hk * g + rg % g;
    if (rg < R && i < Lq) {
      const T* src = row_ptr<T>(p.q, b, h, i);
      for (int64_t d = 0; d < D; ++d) q[r * D + d] = static_cast<float>(src[d]);
    }
  }
  for (int64_t u0 = u_begin; u0 < u_end; u0 += BN) {
    for (int n = 0; n < BN; ++n) {  // the cp.async tile: zeros past the split
      const int64_t u = u0 + n;
      for (int64_t d = 0; d < D; ++d) kt[n * D + d] = vt[n * D + d] = 0.f;
      if (u >= u_end) continue;
      int64_t idx;
      const Source src = key_source(kr.key(u), p.map, &idx);
      const View& kv = src == kGlob ? p.k_glob : src == kRing ? p.k_ring : p.k;
      const View& vv = src == kGlob ? p.v_glob : src == kRing ? p.v_ring : p.v;
      const T* kp = row_ptr<T>(kv, b, hk, idx);
      const T* vp = row_ptr<T>(vv, b, hk, idx);
      for (int64_t d = 0; d < D; ++d) {
        kt[n * D + d] = static_cast<float>(kp[d]);
        vt[n * D + d] = static_cast<float>(vp[d]);
      }
    }
    for (int r = 0; r < kBlockM; ++r) {  // Q K^T
      for (int n = 0; n < BN; ++n) {
        float dot = 0.f;
        for (int64_t d = 0; d < D; ++d) dot += q[r * D + d] * kt[n * D + d];
        s[r * BN + n] = dot;
      }
    }
    for (int r = 0; r < kBlockM; ++r) {  // online softmax, then P V with P rounded to T
      const int64_t rg = r0 + r, i = rg / g;
      float mx = kNegInf;
      for (int n = 0; n < BN; ++n) {
        const int64_t u = u0 + n;
        const bool ok = rg < R && u < u_end &&
                        allowed(i, kr.key(u), Lq, Lk, p.left, p.right, p.G, p.causal);
        s[r * BN + n] = ok ? s[r * BN + n] * p.scale_log2 : kNegInf;
        mx = std::max(mx, s[r * BN + n]);
      }
      const float m_new = std::max(m_run[r], mx);
      const float m_use = m_new == kNegInf ? 0.f : m_new;
      const float alpha = std::exp2(m_run[r] - m_use);
      float sum = 0.f;
      for (int64_t d = 0; d < D; ++d) acc[r * D + d] *= alpha;
      for (int n = 0; n < BN; ++n) {
        const float pr = std::exp2(s[r * BN + n] - m_use);
        sum += pr;
        const float pt = round_to<T>(pr);
        if (pt != 0.f)
          for (int64_t d = 0; d < D; ++d) acc[r * D + d] += pt * vt[n * D + d];
      }
      l_run[r] = l_run[r] * alpha + sum;
      m_run[r] = m_new;
    }
  }
  const bool partial = p.splits > 1;
  for (int r = 0; r < kBlockM; ++r) {
    const int64_t rg = r0 + r;
    if (rg >= R) continue;
    const int64_t i = rg / g, h = hk * g + rg % g;
    const float l = l_run[r], inv = l > 0.f ? 1.f / l : 0.f;
    const int64_t orow = partial ? ((b * p.Hq + h) * p.splits + split) * p.Sq + i
                                 : (b * p.Hq + h) * p.Sq + i;
    for (int64_t d = 0; d < D; ++d) {
      const float o = acc[r * D + d] * inv;
      if (partial) static_cast<float*>(p.out)[orow * D + d] = o;
      else static_cast<T*>(p.out)[orow * D + d] = static_cast<T>(o);
    }
    p.lse[orow] = l > 0.f ? m_run[r] * kLn2 + std::log(l) : kNegInf;
  }
}

template <typename T>
void decode_all(decode::Params p, void* out, float* lse) {
  const bool partial = p.splits > 1;
  std::vector<float> o_part, l_part;
  if (partial) {
    o_part.resize(p.B * p.Hq * p.splits * p.Sq * p.D);
    l_part.resize(p.B * p.Hq * p.splits * p.Sq);
    p.out = o_part.data();
    p.lse = l_part.data();
  } else {
    p.out = out;
    p.lse = lse;
  }
  const int64_t rt = decode::row_tiles(p);
  at::parallel_for(0, p.B * p.Hkv * rt, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t blk = lo; blk < hi; ++blk) {
      const int64_t b = blk / (p.Hkv * rt), hk = (blk / rt) % p.Hkv, mt = blk % rt;
      for (int split = 0; split < p.splits; ++split)
        decode_block<T>(p, b, hk, mt * decode::kBlockM, split);
    }
  });
  if (!partial) return;
  const int64_t rows = p.B * p.Hq * p.Sq;  // window_decode_combine, one row at a time
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t bh = row / p.Sq, i = row % p.Sq, base = bh * p.splits * p.Sq + i;
    float m = kNegInf;
    for (int s = 0; s < p.splits; ++s) m = std::max(m, l_part[base + s * p.Sq]);
    const float m_use = m == kNegInf ? 0.f : m;
    std::vector<float> w(p.splits);
    float tot = 0.f;
    for (int s = 0; s < p.splits; ++s) tot += w[s] = std::exp(l_part[base + s * p.Sq] - m_use);
    const float inv = tot > 0.f ? 1.f / tot : 0.f;
    for (int64_t d = 0; d < p.D; ++d) {
      float o = 0.f;
      for (int s = 0; s < p.splits; ++s)
        if (w[s] != 0.f) o += w[s] * o_part[(base + s * p.Sq) * p.D + d];
      static_cast<T*>(out)[row * p.D + d] = static_cast<T>(o * inv);
    }
    lse[row] = tot > 0.f ? m_use + std::log(tot) : kNegInf;
  }
}

// sgmv_shrink_kernel + sgmv_expand_kernel, one row tile at a time.
template <typename T>
void sgmv_all(const sgmv::Params& p) {
  const int64_t tiles = p.plan.tile_start ? sgmv::max_tiles(p.M, p.plan.num_adapters)
                                          : cdiv(p.M, sgmv::kBlockM);
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  at::parallel_for(0, tiles, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> tsum(p.r_pad);
    for (int64_t t = lo; t < hi; ++t) {
      int64_t a, p0, p1;
      if (!sgmv::tile_rows(p.plan, p.M, t, &a, &p0, &p1)) continue;
      const T* la = static_cast<const T*>(p.lora_a) + a * p.r * p.K;
      const T* lb = static_cast<const T*>(p.lora_b) + a * p.N * p.r;
      for (int ks = 0; ks < p.ksplits; ++ks) {  // shrink
        int64_t k0, k1;
        sgmv::k_slice(p.K, ks, p.ksplits, &k0, &k1);
        for (int64_t pos = p0; pos < p1; ++pos) {
          const T* xr = x + sgmv::row_of(p.plan, pos) * p.sx;
          float* out = p.t + (int64_t(ks) * p.M + pos) * p.r_pad;
          for (int n = 0; n < p.r_pad; ++n) {
            float dot = 0.f;
            if (n < p.r)
              for (int64_t k = k0; k < k1; ++k)
                dot += static_cast<float>(xr[k]) * static_cast<float>(la[n * p.K + k]);
            out[n] = dot;
          }
        }
      }
      const float s = p.scaling[a];
      for (int64_t pos = p0; pos < p1; ++pos) {  // expand
        for (int n = 0; n < p.r_pad; ++n) {
          float v = 0.f;
          for (int ks = 0; ks < p.ksplits; ++ks) v += p.t[(int64_t(ks) * p.M + pos) * p.r_pad + n];
          tsum[n] = round_to<T>(v);
        }
        T* yr = y + sgmv::row_of(p.plan, pos) * p.sy;
        for (int64_t n = 0; n < p.N; ++n) {
          float dot = 0.f;
          for (int64_t k = 0; k < p.r; ++k) dot += tsum[k] * static_cast<float>(lb[n * p.r + k]);
          yr[n] = static_cast<T>(static_cast<float>(yr[n]) + s * dot);
        }
      }
    }
  });
}

}  // namespace

void window_decode(decode::Params p, at::ScalarType dt, void* out, float* lse) {
  if (dt == at::kBFloat16) decode_all<c10::BFloat16>(p, out, lse);
  else decode_all<c10::Half>(p, out, lse);
}

void sgmv(const sgmv::Params& p, at::ScalarType dt) {
  if (dt == at::kBFloat16) sgmv_all<c10::BFloat16>(p);
  else sgmv_all<c10::Half>(p);
}

void sgmv_plan(const int64_t* ids, int64_t M, int64_t A, int32_t* perm, int32_t* seg,
               int32_t* tile_start) {
  std::vector<int64_t> cnt(A + 1, 0);
  auto slot = [A](int64_t id) { return (id >= 0 && id < A) ? id + 1 : 0; };
  for (int64_t m = 0; m < M; ++m) ++cnt[slot(ids[m])];
  std::vector<int64_t> cur(A + 1);
  int64_t rows = 0, tiles = 0;
  for (int64_t s = 0; s <= A; ++s) {
    cur[s] = rows;
    if (s >= 1) {
      seg[s - 1] = int32_t(rows);
      tile_start[s - 1] = int32_t(tiles);
      tiles += cdiv(cnt[s], sgmv::kBlockM);
    }
    rows += cnt[s];
  }
  seg[A] = int32_t(rows);
  tile_start[A] = int32_t(tiles);
  for (int64_t m = 0; m < M; ++m) perm[cur[slot(ids[m])]++] = int32_t(m);
}

}  // namespace emulation
}  // namespace mmcore
