"""Pure-PyTorch reference for lora_linear (the `torch` backend).

Normalised operands (mmcore/ops/lora_linear.py makes them):
  x (M, K); weight (N, K); bias (N,) or None; lora_a (A, r, K); lora_b (A, N, r);
  scaling (A,) fp32; adapter_ids (M,) int64 in [-1, A) or None (= every row uses adapter 0);
  col_scale (N,) fp32 (fp64 for fp64) or None: y = col_scale * (x Wᵀ + LoRA) + b (DoRA).
The weight may also be the transposed view of a contiguous (K, N) matrix (Conv1D).
Computation is in fp32 (fp64 for fp64 inputs); -1 rows get only the base term.
"""
from __future__ import annotations

import torch


def _cdt(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _groups(adapter_ids, A, M, device):
    """[(adapter, row_index or None)], rows grouped by adapter (SGMV-style segments)."""
    if adapter_ids is None:
        return [(0, None)]
    ids, order = torch.sort(adapter_ids, stable=True)
    uniq, counts = torch.unique_consecutive(ids, return_counts=True)
    out, start = [], 0
    for a, c in zip(uniq.tolist(), counts.tolist()):
        if a >= 0:
            out.append((a, order[start:start + c]))
        start += c
    return out


def lora_fwd(x, weight, bias, lora_a, lora_b, scaling, adapter_ids, col_scale=None,
             want_pre=False):
    """-> y (M, N) in x.dtype: c ⊙ (x Wᵀ + s_a (x A_aᵀ) B_aᵀ) + b per row (c = col_scale, 1
    when None); with want_pre, (y, pre) where pre (M, N) in x.dtype is the term in brackets
    (what d col_scale needs)."""
    cdt = _cdt(x.dtype)
    xc = x.to(cdt)
    y = xc @ weight.to(cdt).t()
    for a, rows in _groups(adapter_ids, lora_a.shape[0], x.shape[0], x.device):
        xa = xc if rows is None else xc[rows]
        t = (xa @ lora_a[a].to(cdt).t()) @ lora_b[a].to(cdt).t() * scaling[a].to(cdt)
        if rows is None:
            y = y + t
        else:
            y.index_add_(0, rows, t)
    pre = y
    if col_scale is not None:
        y = y * col_scale.to(cdt)
    if bias is not None:
        y = y + bias.to(cdt)
    if want_pre:
        return y.to(x.dtype), pre.to(x.dtype)
    return y.to(x.dtype)


def lora_bwd(dy, x, weight, lora_a, lora_b, scaling, adapter_ids, need_dx, need_da, need_db):
    """-> (dx (M, K) | None, d lora_a (A, r, K) | None, d lora_b (A, N, r) | None).

    dx = dy W + s (dy B) A;  dA = s (dy B)ᵀ x;  dB = s dyᵀ (x Aᵀ).  No gradient for W."""
    cdt = _cdt(x.dtype)
    dyc = dy.to(cdt)
    xc = x.to(cdt)
    dx = dyc @ weight.to(cdt) if need_dx else None
    da = torch.zeros(lora_a.shape, dtype=cdt, device=x.device) if need_da else None
    db = torch.zeros(lora_b.shape, dtype=cdt, device=x.device) if need_db else None
    for a, rows in _groups(adapter_ids, lora_a.shape[0], x.shape[0], x.device):
        A_, B_, s = lora_a[a].to(cdt), lora_b[a].to(cdt), scaling[a].to(cdt)
        dya = dyc if rows is None else dyc[rows]
        xa = xc if rows is None else xc[rows]
        dyb = dya @ B_  # (m, r)
        if need_dx:
            t = (dyb @ A_) * s
            if rows is None:
                dx = dx + t
            else:
                dx.index_add_(0, rows, t)
        if need_da:
            da[a] += (dyb.t() @ xa) * s
        if need_db:
            db[a] += (dya.t() @ (xa @ A_.t())) * s
    return (
        dx.to(x.dtype) if need_dx else None,
        da.to(lora_a.dtype) if need_da else None,
        db.to(lora_b.dtype) if need_db else None,
    )
