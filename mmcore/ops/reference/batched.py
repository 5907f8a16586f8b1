"""The `torch` backend's whole-problem path for small calls with attention dropout.

The chunked reference (attention.py) loops over samples and query chunks, which costs several
times the dense eager attention at BERT sizes (B = 8, S = 128).  Training with dropout runs
only on this backend, so a call whose scores fit a budget (B·Hq·Sq·Sk <= BUDGET elements) and
whose inputs are finite is computed here in a few batched products instead: the same allowed
mask, the same regenerated dropout mask (dropout.mask: a function of the indices only), the
same formulas.  Anything else (non-finite inputs, large problems) stays on the chunked path.
"""
from __future__ import annotations

import torch

from . import dropout as _dropout

BUDGET = 1 << 22  # scores per call (fp32: 16 MiB per (B, Hq, Sq, Sk) tensor)


def applies(q, k, dropout_p, *check) -> bool:
    """Small enough, and the tensors `check` finite (the chunked path owns the NaN / Inf rules
    where a masked weight 0 would meet a non-finite value: v in the forward; q, k, v and dout
    in the backward.  Non-finite q / k in the forward only reach scores, which the mask
    replaces by -inf where hidden, as the chunked path does)."""
    B, Hq, Sq, _ = q.shape
    if not dropout_p or B * Hq * Sq * k.shape[2] > BUDGET or q.numel() == 0 or k.numel() == 0:
        return False
    return all(bool(torch.isfinite(t).all()) for t in check)


def allowed(B, Sq, Sk, seqlens_q, seqlens_k, left, right, causal, G, key_lo, key_hi,
            key_mask, device):
    """(B, Sq, Sk) bool: allowed(b, i, j) of docs/design.md, rows i >= Lq_b all False."""
    Lq = torch.full((B,), Sq, device=device) if seqlens_q is None else seqlens_q.to(device)
    Lk = torch.full((B,), Sk, device=device) if seqlens_k is None else seqlens_k.to(device)
    i = torch.arange(Sq, device=device)[None, :, None]
    j = torch.arange(Sk, device=device)[None, None, :]
    if key_lo is not None:
        m = (j >= key_lo.long()[:, :, None]) & (j < key_hi.long()[:, :, None])
    else:
        p = i + (Lk - Lq)[:, None, None]
        m = torch.ones(B, Sq, Sk, dtype=torch.bool, device=device)
        if left >= 0:
            m = m & (j >= p - left)
        if right >= 0:
            m = m & (j <= p + right)
        glob = (j < G) | (p < G)
        if causal:
            glob = glob & (j <= p)
        m = m | glob
    m = m & (j < Lk[:, None, None]) & (i < Lq[:, None, None])
    if key_mask is not None:
        m = m & key_mask[:, None, :]
    return m


def _probs(q, k, scale, mask, softcap, cdt):
    """-> s (B, Hkv, g, Sq, Sk) masked scores, p normalised weights (0 on empty rows), m, l."""
    from .attention import _softmax
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    g = Hq // Hkv
    qc = q.to(cdt).reshape(B, Hkv, g * Sq, D)
    s = (torch.matmul(qc, k.to(cdt).transpose(-1, -2)) * scale).view(B, Hkv, g, Sq, Sk)
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    s = s.masked_fill(~mask[:, None, None], float("-inf"))
    p, m, l = _softmax(s)
    return s, p, m, l


def _z(seed, B, Hq, Hkv, Sq, Sk, p, dtype, device):
    keep = _dropout.mask(seed, B, Hq, Sq, Sk, p, device)  # (B, Hq, Sq, Sk)
    return (keep.to(dtype) * (1.0 / (1.0 - p))).view(B, Hkv, Hq // Hkv, Sq, Sk)


def forward(q, k, v, mask, scale, softcap, dropout_p, seed, cdt):
    """-> out (B, Hq, Sq, D) in q.dtype, lse (B, Hq, Sq) fp32."""
    B, Hq, Sq, _ = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    s, p, m, l = _probs(q, k, scale, mask, softcap, cdt)
    pd = (p * _z(seed, B, Hq, Hkv, Sq, Sk, dropout_p, cdt, q.device)).view(B, Hkv, -1, Sk)
    o = torch.matmul(pd, v.to(cdt)).view(B, Hkv, Hq // Hkv, Sq, -1)
    o = torch.where(l == 0, torch.zeros((), dtype=cdt, device=q.device), o / l)
    lse = torch.where(m == float("inf"), m, m + torch.log(l))  # -inf where l == 0
    return o.reshape(B, Hq, Sq, -1).to(q.dtype), lse.reshape(B, Hq, Sq).float()


def backward(dout, q, k, v, mask, scale, softcap, dropout_p, seed, cdt):
    """-> dq, dk, dv in the input dtypes (formulas of attention.window_bwd, batched)."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    g = Hq // Hkv
    s, p, m, l = _probs(q, k, scale, mask, softcap, cdt)
    p = torch.where(l == 0, torch.zeros((), dtype=cdt, device=q.device), p / l)
    z = _z(seed, B, Hq, Hkv, Sq, Sk, dropout_p, cdt, q.device)
    do = dout.to(cdt).reshape(B, Hkv, g * Sq, -1)
    vc = v.to(cdt)
    dv = torch.matmul((p * z).view(B, Hkv, g * Sq, Sk).transpose(-1, -2), do)
    dp = torch.matmul(do, vc.transpose(-1, -2)).view(B, Hkv, g, Sq, Sk) * z
    delta = (p * dp).sum(-1, keepdim=True)
    ds = p * (dp - delta) * scale
    if softcap:  # through the cap; masked scores are -inf: their factor is irrelevant (p = 0)
        t = torch.where(mask[:, None, None], s / softcap, torch.zeros((), dtype=cdt,
                                                                     device=q.device))
        ds = ds * (1 - t * t)
    ds = ds.view(B, Hkv, g * Sq, Sk)
    dq = torch.matmul(ds, k.to(cdt)).view(B, Hq, Sq, D)
    dk = torch.matmul(ds.transpose(-1, -2), q.to(cdt).reshape(B, Hkv, g * Sq, D))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
