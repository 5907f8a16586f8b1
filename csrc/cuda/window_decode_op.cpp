// mmcore_C::window_decode: schema, argument checks, and the two implementations — the CUDA
// kernel (window_decode.cu; CUDA builds only) and its CPU emulation (emulation.cpp).
//
//   window_decode(q, k, v, k_glob, v_glob, k_ring, v_ring, seqlens_q, seqlens_k, pos, left,
//                 right, causal, global_tokens, scale, num_splits) -> (out, lse)
//
// q (B, Hq, Sq, D), Sq <= 16, D % 8 == 0, D <= 256, bf16 / fp16.  Two layouts of the keys:
//   plain   k, v (B, Hkv, Sk, D) hold keys [0, Sk): window_attention's contract; pos = 0, no
//           k_glob / k_ring.  seqlens as in window_attention.
//   rolling RollingKVCache read in place: k, v are the new chunk (B, Hkv, T = Sq, D) at
//           positions [pos, pos + T); k_glob, v_glob (B, Hkv, G_stored, D) the global prefix;
//           k_ring, v_ring (B, Hkv, W, D) position j at slot j % W, read before the chunk is
//           written.  Needs causal, 0 <= left < W, global_tokens <= G_stored; no seqlens.
// num_splits 0 picks the split count (from the SM count on a GPU; 8 "SMs" on the CPU).
// Returns out (B, Hq, Sq, D) in q's dtype and lse (B, Hq, Sq) fp32 (-inf where nothing is seen).
#include <torch/library.h>

#include <cmath>

#include "cuda/args.h"
#include "cuda/emulation.h"

#ifdef MMCORE_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace mmcore {
namespace {

using cuda_args::aligned16;

decode::View view(const at::Tensor& t) {
  decode::View v;
  v.ptr = t.data_ptr();
  v.sb = t.stride(0);
  v.sh = t.stride(1);
  v.sn = t.stride(2);
  return v;
}

void check_kv(const at::Tensor& t, const char* name, const at::Tensor& q, int64_t Hkv) {
  MMCORE_ARG(t.dim() == 4, name, "must be 4-D (B, Hkv, S, D), got shape ", t.sizes());
  cuda_args::check_same(t, name, q, "q");
  MMCORE_ARG(t.size(0) == q.size(0) && t.size(1) == Hkv && t.size(3) == q.size(3), name,
             "must have shape (", q.size(0), ", ", Hkv, ", S, ", q.size(3), "), got ", t.sizes());
}

std::tuple<at::Tensor, at::Tensor> window_decode(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const std::optional<at::Tensor>& k_glob_in, const std::optional<at::Tensor>& v_glob_in,
    const std::optional<at::Tensor>& k_ring_in, const std::optional<at::Tensor>& v_ring_in,
    const std::optional<at::Tensor>& seqlens_q_in, const std::optional<at::Tensor>& seqlens_k_in,
    int64_t pos, int64_t left, int64_t right, bool causal, int64_t global_tokens, double scale,
    int64_t num_splits) {
  MMCORE_ARG(q_in.dim() == 4, "q", "must be 4-D (B, Hq, Sq, D), got shape ", q_in.sizes());
  cuda_args::check_half(q_in, "q");
  const int64_t B = q_in.size(0), Hq = q_in.size(1), Sq = q_in.size(2), D = q_in.size(3);
  MMCORE_ARG(k_in.dim() == 4, "k", "must be 4-D (B, Hkv, S, D), got shape ", k_in.sizes());
  const int64_t Hkv = k_in.size(1);
  MMCORE_ARG(Hkv > 0 && Hq % Hkv == 0, "q", "heads (", Hq, ") must be a multiple of k's (", Hkv,
             ")");
  check_kv(k_in, "k", q_in, Hkv);
  check_kv(v_in, "v", q_in, Hkv);
  MMCORE_ARG(v_in.size(2) == k_in.size(2), "v", "must have as many keys as k (", k_in.size(2),
             "), got ", v_in.size(2));
  MMCORE_ARG(Sq <= decode::kMaxSq, "q", "the decode kernel takes at most ", decode::kMaxSq,
             " queries (Sq), got ", Sq);
  MMCORE_ARG(D % 8 == 0 && D <= decode::kMaxHeadDim, "q",
             "head dim must be a multiple of 8 and <= ", decode::kMaxHeadDim, ", got ", D);
  MMCORE_ARG(left >= -1 && right >= -1, "window", "sides must be >= -1, got (", left, ", ",
             right, ")");
  MMCORE_ARG(global_tokens >= 0, "global_tokens", "must be >= 0, got ", global_tokens);
  MMCORE_ARG(std::isfinite(scale), "scale", "must be finite, got ", scale);
  MMCORE_ARG(num_splits >= 0 && num_splits <= decode::kMaxSplits, "num_splits",
             "must be in [0, ", decode::kMaxSplits, "], got ", num_splits);
  const bool rolling = k_ring_in.has_value();
  MMCORE_ARG(rolling == v_ring_in.has_value() && rolling == k_glob_in.has_value() &&
                 rolling == v_glob_in.has_value(),
             "k_glob", "k_glob, v_glob, k_ring and v_ring come together (rolling layout)");

  decode::Params p;
  at::Tensor q = aligned16(q_in), k = aligned16(k_in), v = aligned16(v_in);
  at::Tensor kg, vg, kr, vr;
  std::optional<at::Tensor> sq, sk;
  if (rolling) {
    MMCORE_ARG(k.size(2) == Sq, "k", "the rolling layout takes the new chunk: ", Sq,
               " keys (one per query), got ", k.size(2));
    MMCORE_ARG(pos >= 0, "pos", "must be >= 0, got ", pos);
    MMCORE_ARG(causal, "causal", "the rolling layout is causal");
    MMCORE_ARG(!seqlens_q_in.has_value() && !seqlens_k_in.has_value(), "seqlens_k",
               "the rolling layout has batch-uniform positions (no seqlens)");
    check_kv(*k_glob_in, "k_glob", q, Hkv);
    check_kv(*v_glob_in, "v_glob", q, Hkv);
    check_kv(*k_ring_in, "k_ring", q, Hkv);
    check_kv(*v_ring_in, "v_ring", q, Hkv);
    const int64_t Gs = k_glob_in->size(2), W = k_ring_in->size(2);
    MMCORE_ARG(v_glob_in->size(2) == Gs, "v_glob", "must hold ", Gs, " positions like k_glob");
    MMCORE_ARG(v_ring_in->size(2) == W, "v_ring", "must hold ", W, " slots like k_ring");
    MMCORE_ARG(W >= 1 && left >= 0 && left < W, "k_ring", "must hold the window: left (", left,
               ") + 1 <= slots (", W, ")");
    MMCORE_ARG(global_tokens <= Gs, "global_tokens", "(", global_tokens,
               ") exceeds the stored prefix (", Gs, ")");
    kg = aligned16(*k_glob_in);
    vg = aligned16(*v_glob_in);
    kr = aligned16(*k_ring_in);
    vr = aligned16(*v_ring_in);
    p.k_glob = view(kg);
    p.v_glob = view(vg);
    p.k_ring = view(kr);
    p.v_ring = view(vr);
    p.map.n_glob = std::min(global_tokens, pos);
    p.map.fresh_start = pos;
    p.map.ring_size = W;
  } else {
    MMCORE_ARG(pos == 0, "pos", "must be 0 without the rolling layout, got ", pos);
    sq = cuda_args::lengths(seqlens_q_in, "seqlens_q", B, q);
    sk = cuda_args::lengths(seqlens_k_in, "seqlens_k", B, q);
  }
  const int64_t Sk = pos + k.size(2);
  if (!rolling) {
    // as window_attention: global tokens are keys, so at most Sk of them (a scalar: free)
    MMCORE_ARG(global_tokens <= Sk, "global_tokens", "(", global_tokens, ") must be <= Sk (",
               Sk, ")");
    // the lengths' values index the keys / queries.  On CPU tensors they are checked here
    // (host memory, no sync); on the GPU checking them would cost a device sync, so the
    // caller guarantees 0 <= seqlens_q[b] <= Sq and 0 <= seqlens_k[b] <= Sk (mmcore's
    // window_attention checks them unless MMCORE_CHECK=0; see docs/robustness.md)
    if (!q.is_cuda()) {
      cuda_args::check_lengths(sq, "seqlens_q", Sq);
      cuda_args::check_lengths(sk, "seqlens_k", Sk);
    }
  }
  p.q = view(q);
  p.k = view(k);
  p.v = view(v);
  p.seqlens_q = sq ? sq->data_ptr<int64_t>() : nullptr;
  p.seqlens_k = sk ? sk->data_ptr<int64_t>() : nullptr;
  p.B = B;
  p.Hq = Hq;
  p.Hkv = Hkv;
  p.Sq = Sq;
  p.Sk = Sk;
  p.D = D;
  p.left = left < 0 ? decode::kUnbounded : left;
  p.right = causal ? 0 : (right < 0 ? decode::kUnbounded : right);
  p.G = std::min(global_tokens, Sk);
  p.causal = causal;
  p.scale_log2 = float(scale * 1.4426950408889634);

  at::Tensor out = at::empty({B, Hq, Sq, D}, q.options());
  at::Tensor lse = at::empty({B, Hq, Sq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  const int bn = decode::block_n(decode::padded_head_dim(D));
  const int64_t span = std::min(Sk, std::min(p.left + p.right, decode::kUnbounded) + Sq + p.G);
  const int64_t blocks = B * Hkv * decode::row_tiles(p);
  p.splits = num_splits ? int(num_splits)
                        : decode::num_splits(blocks, span, bn, cuda_args::sm_count(q, 8));

  if (!q.is_cuda()) {
    emulation::window_decode(p, q.scalar_type(), out.data_ptr(), lse.data_ptr<float>());
    return {out, lse};
  }
#ifdef MMCORE_WITH_CUDA
  const c10::cuda::CUDAGuard guard(q.device());
  int major = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, q.get_device());
  MMCORE_ARG(major >= 8, "q", "the CUDA decode kernel needs sm_80 or newer (bf16 MMA)");
  at::Tensor o_part, l_part;
  if (p.splits > 1) {
    o_part = at::empty({B, Hq, p.splits, Sq, D}, q.options().dtype(at::kFloat));
    l_part = at::empty({B, Hq, p.splits, Sq}, q.options().dtype(at::kFloat));
  }
  const char* err = cuda::window_decode(
      p, q.scalar_type() == at::kBFloat16 ? cuda::DType::kBF16 : cuda::DType::kF16,
      out.data_ptr(), lse.data_ptr<float>(), o_part.defined() ? o_part.data_ptr<float>() : nullptr,
      l_part.defined() ? l_part.data_ptr<float>() : nullptr,
      c10::cuda::getCurrentCUDAStream(q.get_device()).stream());
  TORCH_CHECK(err == nullptr, "window_decode: CUDA launch failed: ", err);
  return {out, lse};
#else
  TORCH_CHECK(false, "window_decode: mmcore._C was built without CUDA kernels");
#endif
}

}  // namespace
}  // namespace mmcore

TORCH_LIBRARY_FRAGMENT(mmcore_C, m) {
  m.def(
      "window_decode(Tensor q, Tensor k, Tensor v, Tensor? k_glob, Tensor? v_glob, "
      "Tensor? k_ring, Tensor? v_ring, Tensor? seqlens_q, Tensor? seqlens_k, int pos, int left, "
      "int right, bool causal, int global_tokens, float scale, int num_splits) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mmcore_C, CPU, m) { m.impl("window_decode", &mmcore::window_decode); }

#ifdef MMCORE_WITH_CUDA
TORCH_LIBRARY_IMPL(mmcore_C, CUDA, m) { m.impl("window_decode", &mmcore::window_decode); }
#endif
