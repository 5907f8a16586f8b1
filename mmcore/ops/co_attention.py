"""co_attention: both directions of cross-modal co-attention (text->image, image->text).

    o_t = [res_t +] attention(q_t, k_v, v_v)   (text queries over image keys)
    o_v = [res_v +] attention(q_v, k_t, v_t)   (image queries over text keys)

On the `triton` backend both directions run in ONE kernel launch (the program ids of one
grid are split between the two problem sets) and the residual add is fused into the
epilogue; its backward is two `mmcore::cross_attention_bwd` calls.  Every other backend
calls cross_attention twice and adds the residuals.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _validate as V
from . import failures, registry, tables
from .cross_attention import cross_attention


def co_attention(q_t, k_t, v_t, q_v, k_v, v_v, *, text_lengths=None, image_lengths=None,
                 scale=None, residual_t=None, residual_v=None, return_lse=False,
                 backend="auto"):
    """Bidirectional cross attention between a text stream and an image stream.

    Args:
        q_t: (B, H, St, D); k_t, v_t: (B, Hkv, St, D) — text queries / keys / values.
        q_v: (B, H, Sv, D); k_v, v_v: (B, Hkv, Sv, D) — image queries / keys / values.
        text_lengths, image_lengths: int (B,) valid lengths (right padding) or None.
        residual_t: (B, H, St, D) or None; residual_v: (B, H, Sv, D) or None (both or
            neither): added to the attention output (fused into the kernel on triton).
        scale: default 1/sqrt(D).  return_lse: also return lse_t (B, H, St), lse_v.
    Returns (o_t, o_v[, lse_t, lse_v]).  Rows past a length, and all rows of a sample whose
    other stream is empty, get attention 0 (so o = residual there) and lse -inf.
    """
    V.attention_qkv(q_t, k_v, v_v)
    V.attention_qkv(q_v, k_t, v_t)
    V.same_dtype("q_t", q_t, q_v=q_v)
    V.same_device("q_t", q_t, q_v=q_v)
    B, H, St, D = q_t.shape
    Sv = q_v.shape[2]
    if q_v.shape[1] != H or k_t.shape[1] != k_v.shape[1]:
        raise ValueError(f"q_t/q_v heads ({H}, {q_v.shape[1]}) and k_t/k_v heads "
                         f"({k_t.shape[1]}, {k_v.shape[1]}) must agree")
    if k_t.shape[2] != St or k_v.shape[2] != Sv:
        raise ValueError(f"k_t length {k_t.shape[2]} must equal q_t's ({St}) and k_v length "
                         f"{k_v.shape[2]} q_v's ({Sv})")
    if (residual_t is None) != (residual_v is None):
        raise ValueError("give both residual_t and residual_v, or neither")
    if residual_t is not None:
        for n, r, q in (("residual_t", residual_t, q_t), ("residual_v", residual_v, q_v)):
            V.tensor(n, r, ndim=4)
            if r.shape != q.shape:
                raise ValueError(f"{n} must have shape {tuple(q.shape)}, got {tuple(r.shape)}")
            V.same_dtype("q_t", q_t, **{n: r})
            V.same_device("q_t", q_t, **{n: r})
    len_t = V.seqlens("text_lengths", text_lengths, B, q_t)
    len_v = V.seqlens("image_lengths", image_lengths, B, q_t)
    if isinstance(scale, torch.Tensor) and scale.requires_grad and torch.is_grad_enabled():
        raise ValueError("co_attention: a scale tensor that requires grad is not supported "
                         "(its gradient would be dropped); pass a float, or call "
                         "cross_attention twice, which learns the scale")
    scale = V.scale(scale, D)
    ts = [V.last_dim_contiguous(t) for t in (q_t, k_t, v_t, q_v, k_v, v_v)]
    res = [None if r is None else V.last_dim_contiguous(r) for r in (residual_t, residual_v)]
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in ts + res)
    p = registry.Problem("cross_attention", q_t.device.type, q_t.dtype, head_dim=D,
                         gqa=H != k_t.shape[1], needs_grad=needs_grad,
                         seqlens=len_t is not None or len_v is not None,
                         extra={"Sq": max(St, Sv), "Sk": min(St, Sv)})
    auto = registry.requested(backend) == "auto"
    impl = registry.select("cross_attention", p, backend)
    done = False
    if impl.backend == "triton":
        try:
            o_t, lse_t, o_v, lse_v, _, _ = torch.ops.mmcore.co_attention_fwd(
                *ts, len_t, len_v, res[0], res[1], scale, needs_grad)
            done = True
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # auto: log once, remember, and serve with two calls
            if not auto:
                raise
            failures.record("cross_attention", "triton", "co_attention", tables.failure_key(p), e)
            registry.clear_cache()
    if not done:
        kw = dict(scale=scale, return_lse=True, backend="auto" if auto else impl.backend)
        o_t, lse_t = cross_attention(ts[0], ts[4], ts[5], seqlens_q=len_t, seqlens_k=len_v, **kw)
        o_v, lse_v = cross_attention(ts[3], ts[1], ts[2], seqlens_q=len_v, seqlens_k=len_t, **kw)
        if res[0] is not None:
            o_t, o_v = res[0] + o_t, res[1] + o_v
    return (o_t, o_v, lse_t, lse_v) if return_lse else (o_t, o_v)


@torch.library.custom_op("mmcore::co_attention_fwd", mutates_args=())
def _fwd(q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, q_v: torch.Tensor,
         k_v: torch.Tensor, v_v: torch.Tensor, len_t: Optional[torch.Tensor],
         len_v: Optional[torch.Tensor], res_t: Optional[torch.Tensor],
         res_v: Optional[torch.Tensor], scale: float, store_attn: bool
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                    torch.Tensor]:
    """-> (o_t, lse_t, o_v, lse_v, attn_t, attn_v); o = res + attn when residuals are given,
    attn_* are the bare attention outputs kept for backward (empty unless store_attn and
    residuals are given: without residuals o is attn)."""
    from mmcore.kernels import cross_attention as K

    V.seqlens_values("text_lengths", len_t, q_t.shape[2])
    V.seqlens_values("image_lengths", len_v, q_v.shape[2])
    r = K.co_attention_fwd(q_t, k_v, v_v, len_t, len_v, q_v, k_t, v_t, len_v, len_t, scale,
                           res_a=res_t, res_b=res_v, store_attn=store_attn)
    if res_t is None:
        o_t, lse_t, o_v, lse_v = r
        empty = q_t.new_empty(0)
        return o_t, lse_t, o_v, lse_v, empty, empty.clone()
    a_t, lse_t, a_v, lse_v, o_t, o_v = r
    if a_t is None:
        a_t, a_v = q_t.new_empty(0), q_v.new_empty(0)
    return o_t, lse_t, o_v, lse_v, a_t, a_v


@_fwd.register_fake
def _(q_t, k_t, v_t, q_v, k_v, v_v, len_t, len_v, res_t, res_v, scale, store_attn):
    B, H, St, D = q_t.shape
    Sv = q_v.shape[2]
    keep = store_attn and res_t is not None
    return (q_t.new_empty(B, H, St, D), q_t.new_empty(B, H, St, dtype=torch.float32),
            q_v.new_empty(B, H, Sv, D), q_v.new_empty(B, H, Sv, dtype=torch.float32),
            q_t.new_empty(B, H, St, D) if keep else q_t.new_empty(0),
            q_v.new_empty(B, H, Sv, D) if keep else q_v.new_empty(0))


def _setup(ctx, inputs, output):
    q_t, k_t, v_t, q_v, k_v, v_v, len_t, len_v, res_t, res_v, scale, store_attn = inputs
    o_t, lse_t, o_v, lse_v, a_t, a_v = output
    if res_t is not None:
        o_t, o_v = a_t, a_v
    ctx.save_for_backward(q_t, k_t, v_t, q_v, k_v, v_v, o_t, o_v, lse_t, lse_v, len_t, len_v)
    ctx.scale = scale
    ctx.has_res = res_t is not None
    ctx.mark_non_differentiable(lse_t, lse_v, a_t, a_v)


def _backward(ctx, do_t, dlse_t, do_v, dlse_v, da_t, da_v):
    q_t, k_t, v_t, q_v, k_v, v_v, a_t, a_v, lse_t, lse_v, len_t, len_v = ctx.saved_tensors
    if a_t.numel() != q_t.numel():
        raise RuntimeError("co_attention: backward needs the forward to run with grad enabled")
    do_t = torch.zeros_like(a_t) if do_t is None else do_t
    do_v = torch.zeros_like(a_v) if do_v is None else do_v
    if torch.is_grad_enabled():  # create_graph=True: the differentiable reference backward
        from .reference.attention import cross_bwd

        def bwd(*a):
            return cross_bwd(*a[:-1])
    else:
        bwd = torch.ops.mmcore.cross_attention_bwd
    dq_t, dk_v, dv_v = bwd(do_t, q_t, k_v, v_v, a_t, lse_t, len_t, len_v, ctx.scale, "triton")
    dq_v, dk_t, dv_t = bwd(do_v, q_v, k_t, v_t, a_v, lse_v, len_v, len_t, ctx.scale, "triton")
    dr_t, dr_v = (do_t, do_v) if ctx.has_res else (None, None)
    return dq_t, dk_t, dv_t, dq_v, dk_v, dv_v, None, None, dr_t, dr_v, None, None


_fwd.register_autograd(_backward, setup_context=_setup)
