"""A learnable softmax scale (a tensor with requires_grad) for window / cross attention.

The kernels take the scale as a float.  Its gradient needs no kernel of its own: with
S = scale·QKᵀ, dQ = scale·dS·K, so

    dL/dscale = Σ_ij dS_ij (q_i·k_j) = ⟨Q, dQ⟩ / scale

(summed over batch, heads and rows, in fp32 / fp64).  At scale == 0 the backward runs with a
scale of 1e-30 instead (the softmax is the same to the last bit there: exp(1e-30·s) rounds
to 1 for every |s| < 1e20) so that the division stays defined.
"""
from __future__ import annotations

import torch

_TINY = 1e-30


class LearnableScale(torch.autograd.Function):
    """apply(scale_t, fwd, bwd, ref_bwd, scale_at, q, k, v, *rest) -> (out, lse).

    fwd(q, k, v, *rest) -> (out, lse); bwd(dout, q, k, v, out, lse, *rest) -> (dq, dk, dv);
    ref_bwd: the same arguments (the backend name ignored), differentiable (used under
    create_graph); scale_at: the index of the float scale in rest."""

    @staticmethod
    def forward(ctx, scale_t, fwd, bwd, ref_bwd, scale_at, q, k, v, *rest):
        out, lse = fwd(q, k, v, *rest)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.rest, ctx.fns, ctx.scale_at = rest, (bwd, ref_bwd), scale_at
        ctx.scale_meta = (scale_t.dtype, scale_t.shape)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        bwd, ref_bwd = ctx.fns
        rest = list(ctx.rest)
        s = float(rest[ctx.scale_at])
        if s == 0.0:
            rest[ctx.scale_at] = _TINY
        if dout is None:
            dout = torch.zeros_like(out)
        if torch.is_grad_enabled():  # create_graph: the differentiable reference backward
            dq, dk, dv = ref_bwd(dout, q, k, v, out, lse, *rest)
        else:
            dq, dk, dv = bwd(dout, q, k, v, out, lse, *rest)
        cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
        dscale = (q.to(cdt) * dq.to(cdt)).sum() / rest[ctx.scale_at]
        if s == 0.0:
            dq = torch.zeros_like(dq)  # dQ = scale·dS·K is exactly 0 at scale 0
            dk = torch.zeros_like(dk)
        dtype, shape = ctx.scale_meta
        n = 5 + len(ctx.rest)
        return (dscale.to(dtype).reshape(shape), None, None, None, None, dq, dk, dv) + \
            (None,) * (n - 5)


def wants_grad(scale) -> bool:
    """A tensor scale that autograd has to differentiate."""
    return isinstance(scale, torch.Tensor) and scale.requires_grad and torch.is_grad_enabled()
