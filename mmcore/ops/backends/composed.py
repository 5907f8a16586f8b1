"""lora_linear composed from PyTorch's GEMMs (the `composed` backend).

    y = F.linear(x, W, b)      one base GEMM (cuBLAS on a GPU, ATen's BLAS on a CPU)
    y.addmm_(s·(x Aᵀ), Bᵀ)     the low-rank term added in place (no (M, N) temporary)

Multi-adapter batches group rows by adapter: one stable sort of the ids and one read of the
group sizes (a host synchronisation), then per adapter the low-rank term of its rows,
scattered into y with index_add_; rows with id -1 get the base term only.  Backward (frozen
base, never dW): dx = dy W + s (dy B) A, dA = s (dy B)ᵀ x, dB = s dyᵀ (x Aᵀ), per group, each
only when asked for.  The scaling stays a tensor (no host read per call).

With a col_scale c (N,) (DoRA): the base GEMM without the bias, the low-rank term, then one
elementwise pass y = c ⊙ y + b.  A weight passed as a transposed view (Conv1D's (K, N)
storage) goes to the GEMMs as it is: BLAS reads either layout, no copy.

Operands as in mmcore/ops/lora_linear.py: x (M, K), weight (N, K), bias (N,) | None,
lora_a (A, r, K), lora_b (A, N, r), scaling (A,) fp32, adapter_ids (M,) int64 | None.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..reference.lora import _groups


def groups(adapter_ids, A):
    """[(adapter, rows (m,) int64 or None)] (None: no ids, every row uses adapter 0); rows
    grouped by one stable sort, the same grouping as the reference backend."""
    return _groups(adapter_ids, A, 0, None)


def forward(x, weight, bias, lora_a, lora_b, scaling, adapter_ids, col_scale=None,
            want_pre=False):
    """-> y (M, N) in x.dtype; with col_scale (N,) y = col_scale ⊙ (x Wᵀ + LoRA) + b, and
    with want_pre also the bracket, pre (M, N) (see mmcore/ops/lora_linear.py)."""
    y = F.linear(x, weight, bias if col_scale is None else None)
    s = scaling.to(x.dtype)
    for a, rows in groups(adapter_ids, lora_a.shape[0]):
        if rows is None:
            t = torch.mm(x, lora_a[a].t()).mul_(s[a])  # (M, r)
            y.addmm_(t, lora_b[a].t())
        else:
            t = torch.mm(x[rows], lora_a[a].t()).mul_(s[a])  # (m, r)
            y.index_add_(0, rows, torch.mm(t, lora_b[a].t()))
    if col_scale is None:
        return y
    c = col_scale.to(x.dtype)
    out = torch.mul(y, c) if bias is None else torch.addcmul(bias, y, c)
    return (out, y) if want_pre else out


def backward(dy, x, weight, lora_a, lora_b, scaling, adapter_ids, need_dx, need_da, need_db):
    """-> (dx (M, K) | None, d lora_a (A, r, K) | None, d lora_b (A, N, r) | None)."""
    dx = torch.mm(dy, weight) if need_dx else None
    da = torch.zeros_like(lora_a) if need_da else None
    db = torch.zeros_like(lora_b) if need_db else None
    s = scaling.to(x.dtype)
    for a, rows in groups(adapter_ids, lora_a.shape[0]):
        dya = dy if rows is None else dy[rows]
        xa = x if rows is None else x[rows]
        if need_dx or need_da:
            tb = torch.mm(dya, lora_b[a]).mul_(s[a])  # s (dy B): (m, r)
            if need_dx and rows is None:
                dx.addmm_(tb, lora_a[a])
            elif need_dx:
                dx.index_add_(0, rows, torch.mm(tb, lora_a[a]))
            if need_da:
                da[a] = torch.mm(tb.t(), xa)
        if need_db:
            db[a] = torch.mm(dya.t(), torch.mm(xa, lora_a[a].t()).mul_(s[a]))
    return dx, da, db
