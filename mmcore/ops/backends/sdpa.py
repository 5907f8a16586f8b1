"""PyTorch's SDPA kernels wrapped to the attention contract (the `sdpa` backend).

Serves cross_attention, and the window_attention problems SDPA expresses without an
(Sq, Sk) mask (:func:`window_mode`):
  * "dense": the window reaches every key of every row (global tokens then add nothing);
  * "causal": left unbounded, right = 0, and offset 0 in every sample (Sq == Sk and the same
    lengths tensor for q and k).  SDPA's ``is_causal`` is top-left aligned; mmcore's is
    bottom-right (docs/design.md), and the two agree only there.

Per-sample lengths (right padding): the padding of q, k and v is zeroed (NaN there cannot
leak), keys j >= Lk_b are hidden by a (B, 1, 1, Sk) key mask (none in causal mode, where a
valid row never reaches them), and rows that see no key (i >= Lq_b, or Lk_b = 0) come back 0
with lse -inf.  A sample with Lk_b = 0 is computed over its zeroed keys and then zeroed, so no
kernel ever sees a fully masked row.

lse comes from the kernel itself, never from a second pass:
  * CPU: aten._scaled_dot_product_flash_attention_for_cpu returns (out, lse); GQA is native.
    The backward is ATen's CPU flash backward (from the forward's out and lse) for fp32
    problems without a causal mask whose every sample has >= 2 keys; otherwise it recomputes
    through SDPA's math kernel over query chunks: the flash backward takes rowsum(P·dP) as
    rowsum(dO·O), and exp(s - lse) with the forward's lse is not exactly 1 where a row sees
    one key; both missed the tolerance rule there (Sk = 1, causal row 0: dq / dk off by
    1e-5..7e-5 where PyTorch's own computation is exact), while the math kernel's softmax
    backward is exact.
  * CUDA: aten._scaled_dot_product_flash_attention when there is no key mask (fp16/bf16,
    D % 8 == 0, D <= 256), else aten._scaled_dot_product_efficient_attention with
    compute_log_sumexp (the key mask as an additive bias); k/v are repeated for GQA.  The
    backward recomputes through F.scaled_dot_product_attention under autograd (one more
    forward; SDPA picks flash / cuDNN / efficient).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import tables

_A = torch.ops.aten
F16, BF16 = torch.float16, torch.bfloat16


def window_mode(p) -> str | None:
    """"dense", "causal" or None (SDPA cannot serve this window problem without a mask)."""
    left, right = p.extra.get("window", (-1, -1))
    return _mode(p.extra.get("Sq", 0), p.extra.get("Sk", 0), left, right,
                 p.extra.get("causal", False),
                 p.global_tokens, p.extra.get("aligned", False))


def _mode(Sq, Sk, left, right, causal, G, aligned):
    left_all, right_all = tables.reaches_all(Sq, Sk, left, right)
    if left_all and right_all:
        return "dense"
    if left_all and right == 0 and (causal or not G) and aligned:
        return "causal"
    return None


# CPU, fp32, full attention ("dense"): where SDPA's CPU flash kernels beat the C++ window
# kernel (2 cores, torch 2.13, benchmarks/RESULTS.md): forward + backward 1.2-1.55x from
# Sk = 512 (0.9x at 128); forward alone 1.1-1.25x from Sk = 1024 (0.65-0.85x below)
CPU_DENSE_GRAD_MIN_SK = 256
CPU_DENSE_FWD_MIN_SK = 1024


def cpu_dense_priority(p):
    """25 (above `cpu`) for fp32 full attention on the CPU from Sk 256 (grads) / 1024 (fwd).

    The measured crossover (constants above); None elsewhere: the declared priorities apply."""
    if p.device != "cpu" or p.dtype != torch.float32 or window_mode(p) != "dense":
        return None
    sk = p.extra.get("Sk", 0)
    return 25 if sk >= (CPU_DENSE_GRAD_MIN_SK if p.needs_grad else CPU_DENSE_FWD_MIN_SK) \
        else None


def window_check(p) -> list:
    if window_mode(p) is None:
        return ["needs a banded or offset mask (sdpa serves dense windows, and causal ones "
                "with Sq == Sk and the same lengths for q and k)"]
    return []


def zero_padding(q, k, v, seqlens_q, seqlens_k):
    """q, k, v with rows past the valid lengths zeroed (copies only where lengths are given)."""
    if seqlens_q is not None:
        q = torch.where(_valid(seqlens_q, q.shape[2])[:, None, :, None], q, 0.0)
    if seqlens_k is not None:
        kvalid = _valid(seqlens_k, k.shape[2])[:, None, :, None]
        k, v = torch.where(kvalid, k, 0.0), torch.where(kvalid, v, 0.0)
    return q, k, v


def _valid(seqlens, S):
    return torch.arange(S, device=seqlens.device) < seqlens[:, None]  # (B, S)


def _prepare(q, k, v, seqlens_q, seqlens_k, causal):
    """Zero the padding; -> q, k, v, key mask (B, Sk) bool | None, row_ok (B, Sq) bool | None."""
    B, Sq, Sk = q.shape[0], q.shape[2], k.shape[2]
    seqlens_q, seqlens_k = _unless_full(seqlens_q, Sq), _unless_full(seqlens_k, Sk)
    q, k, v = zero_padding(q, k, v, seqlens_q, seqlens_k)
    row_ok = None if seqlens_q is None else _valid(seqlens_q, Sq)
    kmask = None
    if seqlens_k is not None and not causal:
        empty = (seqlens_k == 0)[:, None]  # (B, 1): such samples see their zeroed keys
        kmask = _valid(seqlens_k, Sk) | empty
        ok = (~empty).expand(B, Sq)
        row_ok = ok if row_ok is None else row_ok & ok
    return q, k, v, kmask, row_ok


def _unless_full(seqlens, S):
    """None for CPU lengths that are all S (nothing to zero or mask: no copies of q, k, v);
    CUDA lengths are kept as given (reading them would synchronise)."""
    if seqlens is not None and seqlens.device.type == "cpu" and bool((seqlens == S).all()):
        return None
    return seqlens


def _bias(kmask, dtype, Sq, Hq):
    """(B, Sk) bool -> additive (B, Hq, Sq, Sk) view of a (B, 1, 1, Sk16) buffer (rows of 16
    elements: the alignment the efficient kernel asks of a bias)."""
    B, Sk = kmask.shape
    buf = torch.zeros(B, 1, 1, (Sk + 15) // 16 * 16, dtype=dtype, device=kmask.device)
    buf[..., :Sk].masked_fill_(~kmask[:, None, None, :], float("-inf"))
    return buf[..., :Sk].expand(B, Hq, Sq, Sk)


def _repeat_kv(q, k, v):
    g = q.shape[1] // k.shape[1]
    if g == 1:
        return k, v
    return k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)


def _kernel_fwd(q, k, v, kmask, causal, scale):
    """-> out (B, Hq, Sq, D), lse (B, Hq, Sq) fp32 (natural log) from one SDPA kernel."""
    Hq, Sq, D = q.shape[1], q.shape[2], q.shape[3]
    if q.device.type == "cpu":
        bias = None if kmask is None else _bias(kmask, q.dtype, 1, 1)
        return _A._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal,
                                                               attn_mask=bias, scale=scale)
    k, v = _repeat_kv(q, k, v)
    if kmask is None and q.dtype in (F16, BF16) and D % 8 == 0 and D <= 256 \
            and torch.backends.cuda.flash_sdp_enabled():
        r = _A._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
        return r[0], r[1]
    bias = None if kmask is None else _bias(kmask, q.dtype, Sq, Hq)
    r = _A._scaled_dot_product_efficient_attention(q, k, v, bias, True, 0.0, causal,
                                                   scale=scale)
    return r[0], r[1][..., :Sq]


def empty(q, k):
    return (q.shape[2] == 0 or k.shape[2] == 0 or q.shape[0] == 0 or q.shape[1] == 0)


def forward(q, k, v, seqlens_q, seqlens_k, causal, scale):
    """q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D) -> out (B, Hq, Sq, D), lse (B, Hq, Sq) fp32."""
    B, Hq, Sq, D = q.shape
    if empty(q, k):
        return (q.new_zeros(B, Hq, Sq, v.shape[-1]),
                torch.full((B, Hq, Sq), float("-inf"), device=q.device))
    q, k, v, kmask, row_ok = _prepare(q, k, v, seqlens_q, seqlens_k, causal)
    out, lse = _kernel_fwd(q, k, v, kmask, causal, scale)
    lse = lse.float()
    if row_ok is not None:
        out = torch.where(row_ok[:, None, :, None], out, 0.0)
        lse = torch.where(row_ok[:, None, :], lse, float("-inf"))
    return out, lse


def backward(dout, q, k, v, out, lse, seqlens_q, seqlens_k, causal, scale):
    """-> dq, dk, dv shaped like q, k, v (zero for padding and rows that see no key).

    Recomputes through F.scaled_dot_product_attention under autograd: on CUDA in one call
    (SDPA picks its kernel), on the CPU with the math kernel over query chunks of bounded
    size (its softmax backward is exact; see the module docstring)."""
    if empty(q, k):
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    q, k, v, kmask, row_ok = _prepare(q, k, v, seqlens_q, seqlens_k, causal)
    if row_ok is not None:
        dout = torch.where(row_ok[:, None, :, None], dout, 0.0)
    if q.device.type != "cuda":
        if _flash_cpu_exact(q, k, causal, seqlens_k):
            return _flash_cpu_backward(dout, q, k, v, out, lse, kmask, row_ok, scale)
        return _math_backward(dout, q, k, v, kmask, causal, scale, q.shape[1] != k.shape[1])
    return _fused_backward(dout, q, k, v, kmask, causal, scale)


def _flash_cpu_exact(q, k, causal, seqlens_k) -> bool:
    """Whether ATen's CPU flash backward meets the tolerance rule here: fp32, no causal mask
    and every sample with >= 2 keys.  Its misses were rows that see exactly one key (causal
    row 0, Sk = 1), where P = exp(s - lse) should be exactly 1 (module docstring)."""
    if q.dtype != torch.float32 or causal:
        return False
    lo = k.shape[2] if seqlens_k is None else int(seqlens_k.min())
    return lo >= 2


def _flash_cpu_backward(dout, q, k, v, out, lse, kmask, row_ok, scale):
    """ATen's CPU flash backward (about 2x the math recompute at BERT shapes, GQA native)
    from the forward's out and lse.  Rows that see nothing (row_ok False: padding, q zeroed)
    get lse 0 and out 0 so that exp(s - lse) stays finite; their dout is 0, so they add
    nothing."""
    if row_ok is not None:
        lse = torch.where(row_ok[:, None, :], lse, 0.0)
        out = torch.where(row_ok[:, None, :, None], out, 0.0)
    bias = None if kmask is None else _bias(kmask, q.dtype, 1, 1)
    dq, dk, dv = _A._scaled_dot_product_flash_attention_for_cpu_backward(
        dout.contiguous(), q, k, v, out.contiguous(), lse.contiguous(), 0.0, False,
        attn_mask=bias, scale=scale)
    return dq, dk, dv


def _fused_backward(dout, q, k, v, kmask, causal, scale):
    """One recompute through F.scaled_dot_product_attention (SDPA picks its kernel)."""
    mask = None if kmask is None else kmask[:, None, None, :]

    def attend(q_, k_, v_):  # k/v repeated as in the forward (enable_gqa rules out the
        k_, v_ = _repeat_kv(q_, k_, v_)  # efficient kernel); their grads come back summed
        return F.scaled_dot_product_attention(q_, k_, v_, attn_mask=mask, is_causal=causal,
                                              scale=scale)
    # torch.func.vjp, not torch.autograd: this may run inside a custom op, below autograd
    return torch.func.vjp(attend, q, k, v)[1](dout)


def _math_backward(dout, q, k, v, kmask, causal, scale, gqa):
    """SDPA's math kernel under torch.func.vjp, over query chunks of <= 16M scores."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B, Hq, Sq, _ = q.shape
    Sk = k.shape[2]
    C = max(16, (1 << 24) // max(1, B * Hq * Sk))
    dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
    j = torch.arange(Sk, device=q.device)
    for i0 in range(0, Sq, C):
        i1 = min(Sq, i0 + C)
        mask = None if kmask is None else kmask[:, None, None, :]  # (B, 1, 1, Sk)
        if causal:  # the chunk's rows i0..i1-1 see keys j <= i
            cm = j[None, :] <= torch.arange(i0, i1, device=q.device)[:, None]  # (C, Sk)
            mask = cm if mask is None else mask & cm

        def attend(q_, k_, v_, mask=mask):
            return F.scaled_dot_product_attention(q_, k_, v_, attn_mask=mask, scale=scale,
                                                  enable_gqa=gqa)
        with sdpa_kernel([SDPBackend.MATH]):
            gq, gk, gv = torch.func.vjp(attend, q[:, :, i0:i1], k, v)[1](dout[:, :, i0:i1])
        dq[:, :, i0:i1] = gq
        dk += gk
        dv += gv
    return dq, dk, dv


def window_forward(q, k, v, seqlens_q, seqlens_k, left, right, causal, global_tokens, scale,
                   softcap=0.0, key_lo=None, key_hi=None, key_mask=None):
    _no_features(softcap, key_lo, key_mask)
    return forward(q, k, v, seqlens_q, seqlens_k,
                   _window_causal(q, k, seqlens_q, seqlens_k, left, right, causal,
                                  global_tokens), scale)


def window_backward(dout, q, k, v, out, lse, seqlens_q, seqlens_k, left, right, causal,
                    global_tokens, scale, softcap=0.0, key_lo=None, key_hi=None,
                    key_mask=None):
    _no_features(softcap, key_lo, key_mask)
    return backward(dout, q, k, v, out, lse, seqlens_q, seqlens_k,
                    _window_causal(q, k, seqlens_q, seqlens_k, left, right, causal,
                                   global_tokens), scale)


def _no_features(softcap, key_lo, key_mask):
    """SDPA has no logit soft-capping, and per-row bounds or key masks would need an (Sq, Sk)
    mask; the registry never sends them here (not declared).  Guards a direct call."""
    if softcap or key_lo is not None or key_mask is not None:
        raise ValueError("sdpa backend: softcap / key_bounds / key_mask not supported")


def _window_causal(q, k, seqlens_q, seqlens_k, left, right, causal, G):
    """is_causal for SDPA; raises when the problem is not one SDPA can serve (window_check
    refuses those before dispatch; this guards direct calls of the custom op)."""
    aligned = q.shape[2] == k.shape[2] and (
        seqlens_q is seqlens_k or (seqlens_q is not None and seqlens_k is not None
                                   and torch.equal(seqlens_q, seqlens_k)))
    mode = _mode(q.shape[2], k.shape[2], left, right, causal, G, aligned)
    if mode is None:
        raise ValueError(f"sdpa backend: window ({left}, {right}) causal={causal} "
                         f"global_tokens={G} needs a mask SDPA cannot take")
    return mode == "causal"


def device_check(p) -> list:
    """CUDA: the flash / efficient kernels take fp16/bf16/fp32 and D % 8 == 0 up to 256."""
    if p.device != "cuda":
        return []
    r = []
    if p.dtype == torch.float64:
        r.append("float64 on CUDA (SDPA's fused kernels)")
    if p.head_dim % 8 or p.head_dim > 256:
        r.append(f"head dim {p.head_dim} (CUDA kernels take D % 8 == 0, D <= 256)")
    return r
