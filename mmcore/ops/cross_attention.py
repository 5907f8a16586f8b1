"""cross_attention: text <-> image attention with per-sample lengths and no positional mask.

Public function -> validation -> backend selection -> custom op ``mmcore::cross_attention_fwd``
(+ fake + autograd via ``mmcore::cross_attention_bwd``).

Backend implementations take normalised arguments:

    forward(q, k, v, seqlens_q, seqlens_k, scale, softcap[, dropout_p, seed])
        -> (out (B, Hq, Sq, D), lse (B, Hq, Sq) fp32)
    backward(dout, q, k, v, out, lse, seqlens_q, seqlens_k, scale, softcap[, dropout_p, seed])
        -> (dq, dk, dv)

seqlens are int64 (B,) or None; softcap a float (0.0 = off; a backend declares
supports_softcap or is never called with it); dropout_p / seed only when dropout_p > 0 (a
backend declares supports_dropout; seed (2,) int64 CPU, as window_attention); tensors have a
contiguous last dim, other strides arbitrary.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _validate as V
from . import _eager, _scale_grad, registry
from .reference import dropout as _dropout


def cross_attention(q, k, v, *, seqlens_q=None, seqlens_k=None, scale=None, softcap=None,
                    dropout_p=0.0, return_lse=False, backend="auto"):
    """Attention of q over a short k/v set (text over image tokens, or the reverse).

    Args:
        q: (B, Hq, Sq, D); k, v: (B, Hkv, Sk, D), Hq % Hkv == 0.  Any strides, last dim
            contiguous (copied if not).
        seqlens_q, seqlens_k: int (B,) valid lengths (right padding).  allowed(i, j) =
            i < Lq_b and j < Lk_b.  A sample with Lk_b = 0 (no image) returns 0, lse -inf.
        scale: default 1/sqrt(D).  softcap: None, or c > 0: scores capped to c·tanh(s / c)
            before the softmax (as window_attention).  dropout_p: attention dropout in [0, 1)
            on the softmax weights, as window_attention's (seeded from torch's default
            generator at the call).  return_lse: also return lse (B, Hq, Sq) fp32.
    Returns out (B, Hq, Sq, D) [, lse].  Padded query rows are 0.  A NaN / Inf input reaches
    exactly the rows that see it (padding never does), with IEEE rules (window_attention).
    """
    V.attention_qkv(q, k, v)
    B, Hq, Sq, D = q.shape
    seqlens_q = V.seqlens("seqlens_q", seqlens_q, B, q)
    seqlens_k = V.seqlens("seqlens_k", seqlens_k, B, q)
    scale_t = scale if _scale_grad.wants_grad(scale) else None
    scale = V.scale(scale, D)
    softcap = V.softcap(softcap)
    dropout_p = V.dropout_p(dropout_p)
    seed = _dropout.draw_seed() if dropout_p else None
    q, k, v = (V.last_dim_contiguous(t) for t in (q, k, v))
    needs_grad = torch.is_grad_enabled() and (
        any(t.requires_grad for t in (q, k, v)) or scale_t is not None)
    p = problem(q, k, seqlens_q, seqlens_k, needs_grad, softcap, dropout_p)
    chosen = registry.dispatch("cross_attention", p, backend)
    if scale_t is not None:  # a learnable scale: dL/dscale = <Q, dQ> / scale
        out, lse = _scale_grad.LearnableScale.apply(
            scale_t, _fwd_impl, _bwd_impl, _ref_bwd, 2, q, k, v, seqlens_q, seqlens_k, scale,
            chosen, softcap, dropout_p, seed)
    else:
        out, lse = _call(q, k, v, seqlens_q, seqlens_k, scale, chosen, softcap, dropout_p, seed)
    return (out, lse) if return_lse else out


def problem(q, k, seqlens_q, seqlens_k, needs_grad, softcap=0.0, dropout_p=0.0):
    """The dispatch Problem of a call (normalised arguments; metadata only; extra "dropout"
    only when the call uses it)."""
    extra = {"Sq": q.shape[2], "Sk": k.shape[2], "softcap": bool(softcap)}
    if dropout_p:
        extra["dropout"] = True
    return registry.Problem("cross_attention", q.device.type, q.dtype, head_dim=q.shape[3],
                            gqa=q.shape[1] != k.shape[1], needs_grad=needs_grad,
                            seqlens=seqlens_q is not None or seqlens_k is not None,
                            extra=extra)


def _call(*args):
    """Eager fast path for plain tensors, else the registered custom op."""
    if _eager.plain(*args[:5], *args[9:10]):
        return _Eager.apply(*args) if _eager.needs_grad(*args[:5]) else _fwd_impl(*args)
    return torch.ops.mmcore.cross_attention_fwd(*args)


def _fwd_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqlens_q: Optional[torch.Tensor],
              seqlens_k: Optional[torch.Tensor], scale: float, backend: str,
              softcap: float = 0.0, dropout_p: float = 0.0,
              seed: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    V.seqlens_values("seqlens_q", seqlens_q, q.shape[2])
    V.seqlens_values("seqlens_k", seqlens_k, k.shape[2])
    args = (q, k, v, seqlens_q, seqlens_k, scale, softcap) + (
        (dropout_p, seed) if dropout_p else ())
    out, lse = registry.run("cross_attention", backend, "forward", args,
                            lambda: problem(q, k, seqlens_q, seqlens_k, False, softcap,
                                            dropout_p))
    return out.contiguous(), lse.contiguous()


_fwd = torch.library.custom_op("mmcore::cross_attention_fwd", _fwd_impl, mutates_args=())


@_fwd.register_fake
def _(q, k, v, seqlens_q, seqlens_k, scale, backend, softcap=0.0, dropout_p=0.0, seed=None):
    B, Hq, Sq, D = q.shape
    return q.new_empty(B, Hq, Sq, v.shape[-1]), q.new_empty(B, Hq, Sq, dtype=torch.float32)


def _bwd_impl(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              out: torch.Tensor, lse: torch.Tensor, seqlens_q: Optional[torch.Tensor],
              seqlens_k: Optional[torch.Tensor], scale: float, backend: str,
              softcap: float = 0.0, dropout_p: float = 0.0, seed: Optional[torch.Tensor] = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (V.last_dim_contiguous(dout), q, k, v, out, lse, seqlens_q, seqlens_k, scale,
            softcap) + ((dropout_p, seed) if dropout_p else ())
    dq, dk, dv = registry.run("cross_attention", backend, "backward", args,
                              lambda: problem(q, k, seqlens_q, seqlens_k, True, softcap,
                                              dropout_p))
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


_bwd = torch.library.custom_op("mmcore::cross_attention_bwd", _bwd_impl, mutates_args=())


@_bwd.register_fake
def _(dout, q, k, v, out, lse, seqlens_q, seqlens_k, scale, backend, softcap=0.0,
      dropout_p=0.0, seed=None):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _setup(ctx, inputs, output):
    q, k, v, sq, sk, scale, backend = inputs[:7]
    softcap, dropout_p, seed = (tuple(inputs[7:10]) + (0.0, 0.0, None)[len(inputs) - 7:])[:3]
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, sq, sk, seed)
    ctx.args = (scale, backend, softcap, dropout_p)
    ctx.mark_non_differentiable(lse)


def _ref_bwd(dout, q, k, v, out, lse, sq, sk, scale, backend=None, softcap=0.0, dropout_p=0.0,
             seed=None):
    """The pure-PyTorch backward: differentiable, so double backward works on any backend
    (the backend name, in the custom op's argument order, is ignored; with dropout: only on
    backends whose mask is the reference's bit for bit: torch, cpu and triton)."""
    from .reference import attention as ref

    return ref.cross_bwd(dout, q, k, v, out, lse, sq, sk, scale, softcap, dropout_p, seed)


def _backward(ctx, dout, dlse, bwd=None):
    q, k, v, out, lse, sq, sk, seed = ctx.saved_tensors
    scale, backend, softcap, dropout_p = ctx.args
    none = (None,) * 7
    if torch.is_grad_enabled():  # create_graph=True: a backward autograd can differentiate
        dq, dk, dv = _ref_bwd(dout, q, k, v, out, lse, sq, sk, scale, softcap=softcap,
                              dropout_p=dropout_p, seed=seed)
        return (dq, dk, dv) + none
    bwd = bwd or torch.ops.mmcore.cross_attention_bwd
    dq, dk, dv = bwd(dout, q, k, v, out, lse, sq, sk, scale, backend, softcap, dropout_p, seed)
    return (dq, dk, dv) + none


_fwd.register_autograd(_backward, setup_context=_setup)
_Eager = _eager.function("_CrossAttentionEager", _fwd_impl, _bwd_impl, _setup, _backward)
