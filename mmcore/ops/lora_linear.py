"""lora_linear: y = x Wᵀ + b + s·(x Aᵀ) Bᵀ, single- or multi-adapter, frozen base weight;
optionally y = c ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) + b with a per-output-column scale c (DoRA).

Public function -> validation -> backend selection -> custom op ``mmcore::lora_linear_fwd``
(+ fake + autograd via ``mmcore::lora_linear_bwd``).  Gradients: dx, d lora_a, d lora_b from the
backend's backward; d bias (peft's ``bias="all" | "lora_only"``) and d scaling (a learnable
scale) at the autograd level, the same for every backend; never d weight (frozen).

Backend implementations take normalised arguments:

    forward(x (M, K), weight (N, K), bias (N,) | None, lora_a (A, r, K), lora_b (A, N, r),
            scaling (A,) fp32, adapter_ids (M,) int64 | None) -> y (M, N) contiguous, x.dtype
    backward(dy (M, N), x, weight, lora_a, lora_b, scaling, adapter_ids,
             need_dx, need_da, need_db) -> (dx | None, d lora_a | None, d lora_b | None)

adapter_ids None means every row uses adapter 0; -1 means base only.  All tensors have a
contiguous last dim, except a weight that is the transposed view of a contiguous (K, N)
matrix (transformers' Conv1D), served only by backends declaring ``supports_weight_t``.

With a col_scale (backends declaring ``supports_col_scale``) the forward gets two more
arguments, ``col_scale`` (N,) fp32 (fp64 for fp64) and ``want_pre``, and returns y, or
(y, pre) with want_pre, pre = x Wᵀ + LoRA (M, N) in x.dtype (before the scale and the bias):
the backward is the plain one fed with dy ⊙ c, and d c = Σ_rows dy ⊙ pre.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch

from . import _validate as V
from . import _eager, registry


def lora_linear(x, weight, bias, lora_a, lora_b, scaling, *, adapter_ids=None, col_scale=None,
                backend="auto"):
    """Linear layer plus a LoRA term, in one pass over x and weight.

    Args:
        x: (..., K).  weight: (N, K) (frozen: no gradient).  bias: (N,) or None.
        lora_a: (r, K) or stacked (A, r, K); lora_b: (N, r) or (A, N, r) (peft's shapes).
        scaling: float, or a tensor (1,) / () (single adapter) or (A,) (stacked).
        adapter_ids: with stacked adapters, int tensor shaped x.shape[:-1] (per token) or
            x.shape[:1] (per sequence, broadcast); -1 = base only.  None = adapter 0 for all.
        col_scale: None, or (N,) float: y = col_scale * (x Wᵀ + LoRA) + bias, the scale on
            each output feature applied in the kernel's epilogue before the bias (DoRA's
            magnitude over the weight norm).  Differentiable: d col_scale = Σ_rows dy ⊙ (x Wᵀ
            + LoRA); the other gradients see dy ⊙ col_scale.
    The weight may also be the transposed view ``w.t()`` of a contiguous (K, N) matrix
    (transformers' Conv1D storage): it is read in place, not copied.
    Returns y (..., N) in x's dtype.

    Differentiable in x, lora_a, lora_b, bias and a scaling tensor that requires grad
    (d bias = Σ_rows dy;  d scaling_a = Σ_{rows of a} Σ_r (dy B_a)[m, r] · (x A_aᵀ)[m, r]);
    weight never gets a gradient.
    """
    V.tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dim (..., K)")
    V.tensor("weight", weight, ndim=2)
    if bias is not None:
        V.tensor("bias", bias, ndim=1)
    V.tensor("lora_a", lora_a, ndims=(2, 3))
    V.tensor("lora_b", lora_b, ndims=(2, 3))
    if col_scale is not None:
        V.tensor("col_scale", col_scale, ndim=1)
    x, weight, bias, lora_a, lora_b = _autocast(x, weight, bias, lora_a, lora_b)
    V.float_dtype("x", x)
    V.same_dtype("x", x, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b)
    V.same_device("x", x, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b)
    K = x.shape[-1]
    N = weight.shape[0]
    if weight.shape[1] != K:
        raise ValueError(f"weight must have shape (N, {K}) to match x's last dim, "
                         f"got {tuple(weight.shape)}")
    if bias is not None:
        if bias.shape[0] != N:
            raise ValueError(f"bias must have shape ({N},), got {tuple(bias.shape)}")
        bias = bias.contiguous()  # kernels read it as a plain array
    if lora_a.dim() != lora_b.dim():
        raise ValueError(f"lora_a {tuple(lora_a.shape)} and lora_b {tuple(lora_b.shape)} must "
                         f"both be single (2 dims) or both stacked (3 dims)")
    stacked = lora_a.dim() == 3
    A_ = lora_a.shape[0] if stacked else 1
    r = lora_a.shape[-2]
    if lora_a.shape[-1] != K:
        raise ValueError(f"lora_a must have shape ({'A, ' if stacked else ''}r, {K}), "
                         f"got {tuple(lora_a.shape)}")
    want_b = (A_, N, r) if stacked else (N, r)
    if tuple(lora_b.shape) != want_b:
        raise ValueError(f"lora_b must have shape {want_b} to match lora_a {tuple(lora_a.shape)}"
                         f" and weight {tuple(weight.shape)}, got {tuple(lora_b.shape)}")
    if r < 1:
        raise ValueError(f"lora_a: rank r must be >= 1, got shape {tuple(lora_a.shape)}")
    if A_ == 0 and adapter_ids is None:
        raise ValueError("lora_a holds A = 0 adapters, but adapter_ids=None means adapter 0 "
                         "for every row; pass adapter_ids (-1 = base only)")
    if col_scale is not None:
        if col_scale.shape[0] != N:
            raise ValueError(f"col_scale must have shape ({N},) (one per output feature), "
                             f"got {tuple(col_scale.shape)}")
        if not col_scale.is_floating_point():
            raise TypeError(f"col_scale must be a float tensor, got {col_scale.dtype}")
        if col_scale.device != x.device:
            raise ValueError(f"col_scale is on {col_scale.device} but x is on {x.device}")
        col_scale = col_scale.to(_cdt(x.dtype)).contiguous()  # differentiable cast
    scaling = _scaling(scaling, A_, stacked, x.device)
    if not stacked:
        lora_a, lora_b = lora_a.unsqueeze(0), lora_b.unsqueeze(0)
    lead = x.shape[:-1]
    ids = _ids(adapter_ids, lead, x.device)
    x2 = x.reshape(math.prod(lead), K)  # not (-1, K): K may be 0
    x2, lora_a, lora_b = (V.last_dim_contiguous(t) for t in (x2, lora_a, lora_b))
    weight = weight if transposed(weight) else V.last_dim_contiguous(weight)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, lora_a, lora_b, bias, scaling, col_scale))
    p = problem(x2, weight, lora_a, needs_grad, col_scale is not None)
    chosen = registry.dispatch("lora_linear", p, backend)
    if col_scale is None:
        y = _call(x2, weight, bias, lora_a, lora_b, scaling, ids, chosen)
    else:
        want_pre = torch.is_grad_enabled() and col_scale.requires_grad
        y = _call_cs(x2, weight, bias, lora_a, lora_b, scaling, ids, col_scale, want_pre,
                     chosen)
    return y.reshape(*lead, N)


def transposed(weight) -> bool:
    """Is weight (N, K) the transposed view of a contiguous (K, N) matrix (Conv1D), with a
    non-contiguous last dim?  Such a weight goes to the backends as it is."""
    N, K = weight.shape
    return K > 1 and weight.stride(1) != 1 and (N <= 1 or weight.stride(0) == 1)


def problem(x2, weight, lora_a, needs_grad, col_scale=False):
    """The dispatch Problem of a call: x2 (M, K), weight (N, K), lora_a (A, r, K).  The flags
    col_scale / weight_t appear in ``extra`` only when set (other calls keep their keys)."""
    extra = {"M": x2.shape[0], "N": weight.shape[0]}
    if col_scale:
        extra["col_scale"] = True
    if transposed(weight):
        extra["weight_t"] = True
    return registry.Problem("lora_linear", x2.device.type, x2.dtype, head_dim=x2.shape[1],
                            rank=lora_a.shape[1], adapters=lora_a.shape[0],
                            needs_grad=needs_grad, extra=extra)


def _autocast(*ts):
    """Inside torch.autocast, compute in the autocast dtype as F.linear does (differentiable
    casts of the float operands; the op itself accumulates in fp32)."""
    x = ts[0]
    if not (x.is_floating_point() and torch.is_autocast_enabled(x.device.type)):
        return ts
    dt = torch.get_autocast_dtype(x.device.type)
    return tuple(t.to(dt) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                 for t in ts)


def _no_autocast(x):
    """Backends get operands already in one dtype: autocast must not re-cast inside them."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


_SCALING_CACHE: dict = {}  # (float scaling, A, device) -> (A,) fp32 tensor, never mutated


def _scaling(scaling, A, stacked, device):
    if isinstance(scaling, torch.Tensor):
        if scaling.is_complex() or scaling.dtype == torch.bool:
            raise TypeError(f"scaling must be a real tensor, got {scaling.dtype}")
        if scaling.device != device and scaling.device.type != "cpu":
            raise ValueError(f"scaling is on {scaling.device} but x is on {device}; it must be "
                             f"on x's device (or the CPU)")
        if scaling.numel() != A or scaling.dim() > 1:
            raise ValueError(f"scaling must be a float or a tensor of shape ({A},), "
                             f"got shape {tuple(scaling.shape)}")
        return scaling.reshape(A).to(device=device, dtype=torch.float32)
    if isinstance(scaling, (int, float)) and not isinstance(scaling, bool):
        key = (float(scaling), A, device)
        t = _SCALING_CACHE.get(key)
        if t is None:  # a host-to-device tensor per call cost ~20 us (a third of a decode GEMV)
            if len(_SCALING_CACHE) >= 64:
                _SCALING_CACHE.clear()
            t = _SCALING_CACHE[key] = torch.full((A,), float(scaling), dtype=torch.float32,
                                                 device=device)
        return t
    raise TypeError(f"scaling must be a float or a tensor, got {type(scaling).__name__}")


def _ids(adapter_ids, lead, device):
    """adapter_ids shaped lead (per token) or lead[:1] (per sequence) -> (M,) int64."""
    if adapter_ids is None:
        return None
    V.tensor("adapter_ids", adapter_ids)
    if adapter_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"adapter_ids must be an int32/int64 tensor, got {adapter_ids.dtype}")
    if adapter_ids.device != device:
        raise ValueError(f"adapter_ids is on {adapter_ids.device} but x is on {device}")
    if tuple(adapter_ids.shape) == tuple(lead):
        ids = adapter_ids
    elif len(lead) >= 1 and tuple(adapter_ids.shape) == tuple(lead[:1]):
        ids = adapter_ids.reshape(-1, *([1] * (len(lead) - 1))).expand(lead)
    else:
        raise ValueError(f"adapter_ids must have shape {tuple(lead)} (per token) or "
                         f"{tuple(lead[:1])} (per sequence), got {tuple(adapter_ids.shape)}")
    return ids.reshape(-1).long().contiguous()


def _check_ids(ids, A):
    if ids is None or not V.checks_enabled() or ids.numel() == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < -1 or hi >= A:
        raise ValueError(f"adapter_ids must lie in [-1, {A}) (A = {A} adapters), "
                         f"got min {lo} max {hi}")


def _call(*args):
    """Eager fast path for plain tensors, else the registered custom op."""
    if _eager.plain(*args[:7]):
        return _Eager.apply(*args) if _eager.needs_grad(*args[:7]) else _fwd_impl(*args)
    return torch.ops.mmcore.lora_linear_fwd(*args)


def _fwd_impl(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
              lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: torch.Tensor,
              adapter_ids: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    _check_ids(adapter_ids, lora_a.shape[0])
    with _no_autocast(x):
        y = registry.run("lora_linear", backend, "forward",
                         (x, weight, bias, lora_a, lora_b, scaling, adapter_ids),
                         lambda: problem(x, weight, lora_a, False))
    return y.contiguous()


_fwd = torch.library.custom_op("mmcore::lora_linear_fwd", _fwd_impl, mutates_args=())


@_fwd.register_fake
def _(x, weight, bias, lora_a, lora_b, scaling, adapter_ids, backend):
    return x.new_empty(x.shape[0], weight.shape[0])


def _bwd_impl(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor,
              lora_b: torch.Tensor, scaling: torch.Tensor, adapter_ids: Optional[torch.Tensor],
              need_dx: bool, need_da: bool, need_db: bool, backend: str
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (V.last_dim_contiguous(dy), x, weight, lora_a, lora_b, scaling, adapter_ids,
            need_dx, need_da, need_db)
    with _no_autocast(x):
        dx, da, db = registry.run("lora_linear", backend, "backward", args,
                                  lambda: problem(x, weight, lora_a, True))
    # custom ops cannot return None: unrequested grads come back as empty tensors (one each:
    # outputs of a custom op may not alias each other)
    e = lambda: x.new_empty(0)  # noqa: E731
    return (dx.contiguous() if need_dx else e(), da.contiguous() if need_da else e(),
            db.contiguous() if need_db else e())


_bwd = torch.library.custom_op("mmcore::lora_linear_bwd", _bwd_impl, mutates_args=())


@_bwd.register_fake
def _(dy, x, weight, lora_a, lora_b, scaling, adapter_ids, need_dx, need_da, need_db, backend):
    e = lambda: x.new_empty(0)  # noqa: E731
    return (torch.empty_like(x) if need_dx else e(), torch.empty_like(lora_a) if need_da else e(),
            torch.empty_like(lora_b) if need_db else e())


def _setup(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scaling, ids, backend = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, scaling, ids)
    ctx.backend = backend
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward(ctx, dy, bwd=None):
    x, weight, lora_a, lora_b, scaling, ids = ctx.saved_tensors
    nx, _, nbias, na, nb, ns = ctx.needs_input_grad[:6]
    dx = da = db = None
    if nx or na or nb:
        if torch.is_grad_enabled():  # create_graph=True: the differentiable reference backward
            from .reference.lora import lora_bwd as ref_bwd

            def bwd(*a):
                return ref_bwd(*a[:-1])
        bwd = bwd or torch.ops.mmcore.lora_linear_bwd
        dx, da, db = bwd(dy, x, weight, lora_a, lora_b, scaling, ids, nx, na, nb, ctx.backend)
    with _no_autocast(x):
        dbias = _dbias(dy, ctx.bias_dtype) if nbias else None
        dscaling = _dscaling(dy, x, lora_a, lora_b, ids) if ns else None
    return (dx if nx else None, None, dbias, da if na else None, db if nb else None,
            dscaling, None, None)


def _cdt(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dbias(dy, dtype):
    """dy (M, N) -> d bias (N,) = Σ_m dy[m], accumulated in fp32 (fp64 for fp64)."""
    return dy.sum(0, dtype=_cdt(dy.dtype)).to(dtype)


def _dscaling(dy, x, lora_a, lora_b, ids):
    """d scaling (A,) fp32: ds_a = Σ_{m: ids[m] = a} Σ_r (dy B_a)[m, r] · T_a[m, r], T_a = x A_aᵀ.

    dy (M, N), x (M, K), lora_a (A, r, K), lora_b (A, N, r), ids (M,) or None (all rows use
    adapter 0; -1 rows use none).  Two thin matmuls per adapter, in fp32 (fp64 for fp64)."""
    cdt = _cdt(x.dtype)
    xc, dyc = x.to(cdt), dy.to(cdt)
    out = []
    for a in range(lora_a.shape[0]):
        t = xc @ lora_a[a].to(cdt).t()  # (M, r)
        g = dyc @ lora_b[a].to(cdt)  # (M, r)
        rows = (t * g).sum(1)  # (M,)
        out.append((rows if ids is None else rows * (ids == a)).sum())
    return torch.stack(out).to(torch.float32)


_fwd.register_autograd(_backward, setup_context=_setup)
_Eager = _eager.function("_LoraLinearEager", _fwd_impl, _bwd_impl, _setup, _backward)


# ---------------------------------------------------------------- with a col_scale (DoRA)


def _call_cs(*args):
    """-> y: the col_scale variant (eager fast path, else its custom op)."""
    if _eager.plain(*args[:8]):
        if _eager.needs_grad(*args[:8]):
            return _EagerCS.apply(*args)[0]
        return _fwd_cs_impl(*args)[0]
    return torch.ops.mmcore.lora_linear_cs_fwd(*args)[0]


def _fwd_cs_impl(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: torch.Tensor,
                 adapter_ids: Optional[torch.Tensor], col_scale: torch.Tensor, want_pre: bool,
                 backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (y (M, N), pre (M, N) with want_pre, else an empty tensor)."""
    _check_ids(adapter_ids, lora_a.shape[0])
    with _no_autocast(x):
        out = registry.run("lora_linear", backend, "forward",
                           (x, weight, bias, lora_a, lora_b, scaling, adapter_ids, col_scale,
                            want_pre),
                           lambda: problem(x, weight, lora_a, False, True))
    y, pre = out if want_pre else (out, x.new_empty(0))
    return y.contiguous(), pre.contiguous()


_fwd_cs = torch.library.custom_op("mmcore::lora_linear_cs_fwd", _fwd_cs_impl, mutates_args=())


@_fwd_cs.register_fake
def _(x, weight, bias, lora_a, lora_b, scaling, adapter_ids, col_scale, want_pre, backend):
    y = x.new_empty(x.shape[0], weight.shape[0])
    return y, (x.new_empty(x.shape[0], weight.shape[0]) if want_pre else x.new_empty(0))


def _setup_cs(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scaling, ids, col_scale, want_pre, backend = inputs
    pre = output[1] if want_pre else None
    ctx.save_for_backward(x, weight, lora_a, lora_b, scaling, ids, col_scale, pre)
    ctx.backend = backend
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward_cs(ctx, dy, _dpre, bwd=None):
    """dy ⊙ c feeds the plain backward (dx, d lora_a, d lora_b, d scaling); d bias = Σ dy;
    d c = Σ_rows dy ⊙ pre (fp32, fp64 for fp64)."""
    x, weight, lora_a, lora_b, scaling, ids, col_scale, pre = ctx.saved_tensors
    nx, _, nbias, na, nb, ns, _, nc = ctx.needs_input_grad[:8]
    cdt = _cdt(x.dtype)
    with _no_autocast(x):
        g = (dy.to(cdt) * col_scale).to(dy.dtype)  # (M, N): what the bracket's backward sees
    dx = da = db = None
    if nx or na or nb:
        if torch.is_grad_enabled():  # create_graph=True: the differentiable reference backward
            from .reference.lora import lora_bwd as ref_bwd

            def bwd(*a):
                return ref_bwd(*a[:-1])
        bwd = bwd or torch.ops.mmcore.lora_linear_bwd
        dx, da, db = bwd(g, x, weight, lora_a, lora_b, scaling, ids, nx, na, nb, ctx.backend)
    with _no_autocast(x):
        dbias = _dbias(dy, ctx.bias_dtype) if nbias else None
        dscaling = _dscaling(g, x, lora_a, lora_b, ids) if ns else None
        dcol = (dy.to(cdt) * pre.to(cdt)).sum(0) if nc and pre is not None else None
    return (dx if nx else None, None, dbias, da if na else None, db if nb else None,
            dscaling, None, dcol, None, None)


_fwd_cs.register_autograd(_backward_cs, setup_context=_setup_cs)
_EagerCS = _eager.function("_LoraLinearCSEager", _fwd_cs_impl, _bwd_impl, _setup_cs,
                           _backward_cs)
