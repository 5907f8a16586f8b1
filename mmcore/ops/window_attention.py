"""window_attention: sliding-window / chunked attention with global tokens.

Public function -> validation -> backend selection (registry) -> torch.library custom op
``mmcore::window_attention_fwd`` (+ fake + autograd through ``mmcore::window_attention_bwd``).

Backend implementations (registry.OpImpl) take normalised arguments:

    forward(q, k, v, seqlens_q, seqlens_k, left, right, causal, global_tokens, scale,
            softcap, key_lo, key_hi, key_mask[, dropout_p, seed])
        -> (out (B, Hq, Sq, D) q.dtype contiguous, lse (B, Hq, Sq) float32 contiguous)
    backward(dout, q, k, v, out, lse, seqlens_q, seqlens_k, left, right, causal,
             global_tokens, scale, softcap, key_lo, key_hi, key_mask[, dropout_p, seed])
        -> (dq, dk, dv)

where left/right are ints >= -1 (-1 = unbounded; right is already 0 when causal), seqlens are
int64 (B,) or None, softcap a float (0.0 = off), key_lo / key_hi both None or both int32
(B, Sq) contiguous (bounds mode: then left = right = -1, causal False, global_tokens 0),
key_mask None or bool (B, Sk) contiguous, and every tensor has a contiguous last dim (other
strides arbitrary).  A backend declares the four features (registry.OpImpl
supports_softcap / supports_key_bounds / supports_key_mask / supports_dropout) or is never
called with them; dropout_p (float in (0, 1)) and seed ((2,) int64 CPU tensor, drawn per call
from torch's default generator) are passed only when dropout_p > 0.
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch

from . import _validate as V
from . import _eager, _scale_grad, registry
from .reference import dropout as _dropout


def window_attention(q, k, v, *, window=None, causal=False, global_tokens=0, seqlens_q=None,
                     seqlens_k=None, scale=None, softcap=None, key_bounds=None, key_mask=None,
                     dropout_p=0.0, return_lse=False, backend="auto"):
    """Sliding-window attention with a global-token prefix (Longformer / attention sinks).

    Args:
        q: (B, Hq, Sq, D); k, v: (B, Hkv, Sk, D), Hq % Hkv == 0 (GQA: query head h uses kv
            head h // (Hq // Hkv)).  Any strides; only the last dim must be contiguous (copied
            if not).  A flash-attn layout (B, S, H, D) passes as ``x.transpose(1, 2)``.
        window: (left, right) ints >= 0, or -1 / None for unbounded.  Key j is in the window
            of query i iff ``p - left <= j <= p + right`` with ``p = i + Lk_b - Lq_b``
            (bottom-right alignment, as flash-attn).  Sides must be < 2**63; a side that
            reaches past every key (left >= Sk, right >= Sq) is unbounded, exactly.
        causal: right = 0, and the global part is causal too (j <= p).
        global_tokens: G; keys j < G are seen by every query, and queries with p < G see
            every key (subject to causal).
        seqlens_q, seqlens_k: int (B,) valid lengths (right padding); rows i >= Lq_b give 0,
            keys j >= Lk_b are never seen.
        scale: softmax scale, default 1/sqrt(D).
        softcap: None, or c > 0: scores s = scale·q·k are capped to c·tanh(s / c) before the
            softmax (Gemma-2; flash-attn's ``softcap``).
        key_bounds: None, or (lo, hi) integer tensors (B, Sq): "bounds mode", query row i of
            sample b sees exactly the keys lo[b, i] <= j < hi[b, i] (absolute key indices; no
            alignment).  Replaces window / causal / global_tokens (which must stay default).
            Expresses per-row patterns: prefix-LM (0, max(i + 1, P_b)), bidirectional image
            blocks inside causal text, packed segments, text rows over one image's tokens.
        key_mask: None, or bool (B, Sk): key j of sample b is seen only where True (holes and
            left padding; window positions still count key indices).  Both modes.
        dropout_p: attention dropout, a float in [0, 1): the softmax weights are zeroed with
            probability p and the kept ones scaled by 1 / (1 - p) (torch.nn.functional.dropout
            on the weights, as HF eager / SDPA's dropout_p).  Applied whenever p > 0 (the
            caller decides about training).  The mask comes from a seed drawn from torch's
            default generator at the call (torch.manual_seed makes it reproducible) and is
            regenerated in the backward; lse stays the un-dropped softmax's.  Backends that
            declare it: docs/ops.md.
        return_lse: also return lse (B, Hq, Sq) float32 (natural log; not differentiable).

    Alignment, Sq=3, Sk=6, window=(1, 0) (x = allowed)::

        keys   0 1 2 3 4 5
        q0     . . x x . .      p = 3: keys 2, 3
        q1     . . . x x .      p = 4: keys 3, 4
        q2     . . . . x x      p = 5: keys 4, 5

    A row that sees no key returns 0 with lse -inf and zero gradients, never NaN.  A NaN / Inf
    input reaches exactly the rows that see it (IEEE rules within a row; masked keys and
    values never enter it): a NaN score gives a NaN row with lse NaN, a +inf score a NaN row
    with lse +inf.
    Returns out (B, Hq, Sq, D) in q's dtype [, lse].
    """
    V.attention_qkv(q, k, v)
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    left, right = _window(window, Sq, Sk)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if causal:
        right = 0
    if (isinstance(global_tokens, bool) or not isinstance(global_tokens, numbers.Integral)
            or global_tokens < 0):
        raise ValueError(f"global_tokens must be an int >= 0, got {global_tokens!r}")
    global_tokens = int(global_tokens)
    if global_tokens > Sk:
        raise ValueError(f"global_tokens ({global_tokens}) must be <= Sk ({Sk})")
    same = seqlens_q is seqlens_k  # one lengths tensor for both sides: offset 0 everywhere
    seqlens_q = V.seqlens("seqlens_q", seqlens_q, B, q)
    seqlens_k = seqlens_q if same else V.seqlens("seqlens_k", seqlens_k, B, q)
    scale_t = scale if _scale_grad.wants_grad(scale) else None
    scale = V.scale(scale, D)
    softcap = V.softcap(softcap)
    if key_bounds is not None and (window is not None or causal or global_tokens):
        raise ValueError("key_bounds replaces window, causal and global_tokens: leave them at "
                         f"their defaults (got window={window!r}, causal={causal}, "
                         f"global_tokens={global_tokens})")
    key_lo, key_hi = V.key_bounds(key_bounds, B, Sq, q)
    key_mask = V.key_mask(key_mask, B, Sk, q)
    dropout_p = V.dropout_p(dropout_p)
    seed = _dropout.draw_seed() if dropout_p else None
    q, k, v = (V.last_dim_contiguous(t) for t in (q, k, v))
    needs_grad = torch.is_grad_enabled() and (
        any(t.requires_grad for t in (q, k, v)) or scale_t is not None)
    p = problem(q, k, seqlens_q, seqlens_k, left, right, causal, global_tokens, needs_grad,
                softcap, key_lo, key_mask, dropout_p)
    chosen = registry.dispatch("window_attention", p, backend)
    args = (q, k, v, seqlens_q, seqlens_k, left, right, causal, global_tokens, scale, chosen,
            softcap, key_lo, key_hi, key_mask, dropout_p, seed)
    if scale_t is not None:  # a learnable scale: dL/dscale = <Q, dQ> / scale
        out, lse = _scale_grad.LearnableScale.apply(
            scale_t, _fwd_impl, _bwd_impl, _ref_bwd_rest, 6, *args)
    else:
        out, lse = _call(*args)
    return (out, lse) if return_lse else out


def problem(q, k, seqlens_q, seqlens_k, left, right, causal, global_tokens, needs_grad,
            softcap=0.0, key_lo=None, key_mask=None, dropout_p=0.0):
    """The dispatch Problem of a call (normalised arguments; metadata only).

    aligned: every sample has Lq = Lk (offset 0), known without reading lengths: Sq == Sk
    and no lengths, or the same lengths tensor for both sides (self-attention padding).
    softcap / key_bounds / key_mask: whether the call uses those features; dropout: present
    (True) only when it does (problems without dropout keep their keys)."""
    Sq, Sk = q.shape[2], k.shape[2]
    aligned = Sq == Sk and (seqlens_q is seqlens_k)
    extra = {"Sq": Sq, "Sk": Sk, "window": (left, right), "causal": causal,
             "aligned": aligned, "softcap": bool(softcap), "key_bounds": key_lo is not None,
             "key_mask": key_mask is not None}
    if dropout_p:
        extra["dropout"] = True
    return registry.Problem(
        "window_attention", q.device.type, q.dtype, head_dim=q.shape[3],
        gqa=q.shape[1] != k.shape[1], needs_grad=needs_grad, global_tokens=global_tokens,
        seqlens=seqlens_q is not None or seqlens_k is not None, extra=extra)


def _call(*args):
    """Eager fast path for plain tensors, else the registered custom op."""
    tensors = args[:5] + args[12:15] + args[16:17]
    if _eager.plain(*tensors):
        return _Eager.apply(*args) if _eager.needs_grad(*args[:5]) else _fwd_impl(*args)
    return torch.ops.mmcore.window_attention_fwd(*args)


def _window(window, Sq, Sk):
    """(left, right) ints >= -1; a side that reaches past every key is clamped to -1."""
    if window is None:
        return -1, -1
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise ValueError(f"window must be None or a (left, right) pair, got {window!r}")
    # left >= Sk: p - left <= Lk - 1 - Sk < 0 <= j for every row; right >= Sq: p + right >=
    # Lk - Lq + Sq >= Lk > j.  Either side then masks nothing: unbounded, exactly.
    return (V.window_side("window[0] (left)", window[0], Sk),
            V.window_side("window[1] (right)", window[1], Sq))


# ---------------------------------------------------------------- torch.library custom op
def _fwd_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqlens_q: Optional[torch.Tensor],
              seqlens_k: Optional[torch.Tensor], left: int, right: int, causal: bool,
              global_tokens: int, scale: float, backend: str, softcap: float = 0.0,
              key_lo: Optional[torch.Tensor] = None, key_hi: Optional[torch.Tensor] = None,
              key_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
              seed: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    V.seqlens_values("seqlens_q", seqlens_q, q.shape[2])
    V.seqlens_values("seqlens_k", seqlens_k, k.shape[2])
    args = (q, k, v, seqlens_q, seqlens_k, left, right, causal, global_tokens, scale, softcap,
            key_lo, key_hi, key_mask) + ((dropout_p, seed) if dropout_p else ())
    out, lse = registry.run("window_attention", backend, "forward", args, lambda: problem(
        q, k, seqlens_q, seqlens_k, left, right, causal, global_tokens, False, softcap, key_lo,
        key_mask, dropout_p))
    return out.contiguous(), lse.contiguous()


_fwd = torch.library.custom_op("mmcore::window_attention_fwd", _fwd_impl, mutates_args=())


@_fwd.register_fake
def _(q, k, v, seqlens_q, seqlens_k, left, right, causal, global_tokens, scale, backend,
      softcap=0.0, key_lo=None, key_hi=None, key_mask=None, dropout_p=0.0, seed=None):
    B, Hq, Sq, D = q.shape
    return q.new_empty(B, Hq, Sq, v.shape[-1]), q.new_empty(B, Hq, Sq, dtype=torch.float32)


def _bwd_impl(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              out: torch.Tensor, lse: torch.Tensor, seqlens_q: Optional[torch.Tensor],
              seqlens_k: Optional[torch.Tensor], left: int, right: int, causal: bool,
              global_tokens: int, scale: float, backend: str, softcap: float = 0.0,
              key_lo: Optional[torch.Tensor] = None, key_hi: Optional[torch.Tensor] = None,
              key_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
              seed: Optional[torch.Tensor] = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dout = V.last_dim_contiguous(dout)
    args = (dout, q, k, v, out, lse, seqlens_q, seqlens_k, left, right, causal, global_tokens,
            scale, softcap, key_lo, key_hi, key_mask) + ((dropout_p, seed) if dropout_p else ())
    dq, dk, dv = registry.run("window_attention", backend, "backward", args, lambda: problem(
        q, k, seqlens_q, seqlens_k, left, right, causal, global_tokens, True, softcap, key_lo,
        key_mask, dropout_p))
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


_bwd = torch.library.custom_op("mmcore::window_attention_bwd", _bwd_impl, mutates_args=())


@_bwd.register_fake
def _(dout, q, k, v, out, lse, seqlens_q, seqlens_k, left, right, causal, global_tokens,
      scale, backend, softcap=0.0, key_lo=None, key_hi=None, key_mask=None, dropout_p=0.0,
      seed=None):
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        torch.empty_like(k, memory_format=torch.contiguous_format), \
        torch.empty_like(v, memory_format=torch.contiguous_format)


def _setup(ctx, inputs, output):
    inputs = tuple(inputs) + (0.0, None, None, None, 0.0, None)[len(inputs) - 11:]  # defaults
    q, k, v, sq, sk, left, right, causal, G, scale, backend = inputs[:11]
    softcap, key_lo, key_hi, key_mask, dropout_p, seed = inputs[11:17]
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, sq, sk, key_lo, key_hi, key_mask, seed)
    ctx.args = (left, right, causal, G, scale, backend, softcap, dropout_p)
    ctx.mark_non_differentiable(lse)


def _ref_bwd(dout, q, k, v, out, lse, sq, sk, left, right, causal, G, scale, softcap=0.0,
             key_lo=None, key_hi=None, key_mask=None, dropout_p=0.0, seed=None):
    """The pure-PyTorch backward: differentiable, so double backward works on any backend
    (with dropout: on backends whose mask is the reference's bit for bit: torch, cpu, triton)."""
    from .reference import attention as ref

    return ref.window_bwd(dout, q, k, v, out, lse, sq, sk, left, right, causal, G, scale,
                          softcap, key_lo, key_hi, key_mask, dropout_p, seed)


def _ref_bwd_rest(dout, q, k, v, out, lse, sq, sk, left, right, causal, G, scale, backend,
                  softcap, key_lo, key_hi, key_mask, dropout_p=0.0, seed=None):
    """_ref_bwd taking the custom op's argument order (with the backend name, ignored)."""
    return _ref_bwd(dout, q, k, v, out, lse, sq, sk, left, right, causal, G, scale, softcap,
                    key_lo, key_hi, key_mask, dropout_p, seed)


def _backward(ctx, dout, dlse, bwd=None):
    q, k, v, out, lse, sq, sk, key_lo, key_hi, key_mask, seed = ctx.saved_tensors
    left, right, causal, G, scale, backend, softcap, dropout_p = ctx.args
    none = (None,) * 14
    if torch.is_grad_enabled():  # create_graph=True: a backward autograd can differentiate
        dq, dk, dv = _ref_bwd(dout, q, k, v, out, lse, sq, sk, left, right, causal, G, scale,
                              softcap, key_lo, key_hi, key_mask, dropout_p, seed)
        return (dq, dk, dv) + none
    bwd = bwd or torch.ops.mmcore.window_attention_bwd
    dq, dk, dv = bwd(dout, q, k, v, out, lse, sq, sk, left, right, causal, G, scale, backend,
                     softcap, key_lo, key_hi, key_mask, dropout_p, seed)
    return (dq, dk, dv) + none


_fwd.register_autograd(_backward, setup_context=_setup)
_Eager = _eager.function("_WindowAttentionEager", _fwd_impl, _bwd_impl, _setup, _backward)
