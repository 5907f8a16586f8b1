"""Pure-PyTorch reference for window_attention and cross_attention (the `torch` backend).

Chunked over queries: a chunk of C queries only ever sees the keys of its window plus the
global prefix, so no (Sq, Sk) matrix exists; the few global queries (position < G) are done
as dense rows over all keys.  Memory beyond inputs/outputs is O(C·(left+right+G)) per chunk.
Computation is in fp32 (fp64 for fp64 inputs) whatever the input dtype.

Conventions (docs/design.md): q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D); left/right = -1 means
unbounded; causal forces right = 0 and also restricts global rows to j <= p; lse is the
natural-log sum-exp of the scaled (and, with softcap c > 0, capped: c·tanh(s/c)) scores, -inf
(and output 0) for a row that sees no key.  Bounds mode (key_lo / key_hi (B, Sq) int32): row i
sees keys key_lo[b, i] <= j < key_hi[b, i] instead of the window pattern; key_mask (B, Sk) bool
hides keys in either mode.  Attention dropout (dropout_p > 0, a seed (2,) int64): the
normalised weights are multiplied by the regenerated keep mask / (1 − p) of
mmcore/ops/reference/dropout.py, in the forward and again in the backward; lse stays the
un-dropped softmax's.
"""
from __future__ import annotations

import math

import torch

from . import batched as _batched
from . import dropout as _dropout

_CHUNK = 256


def _cdt(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _lengths(seqlens, S, B):
    return [S] * B if seqlens is None else [int(x) for x in seqlens.tolist()]


def _row_blocks(Lq, Lk, left, right, causal, G):
    """Yield (i0, i1, key_index LongTensor-or-range, dense) query blocks for one sample.

    Global query rows (position p < G) come first as one dense block over all keys."""
    off = Lk - Lq
    ig = min(Lq, max(0, G - off))  # rows [0, ig) have p < G: global queries
    if ig > 0:
        yield 0, ig, (0, Lk), None
    for i0 in range(ig, Lq, _CHUNK):
        i1 = min(Lq, i0 + _CHUNK)
        p0, p1 = i0 + off, i1 - 1 + off
        lo = 0 if left < 0 else max(0, p0 - left)
        hi = Lk if right < 0 else min(Lk, p1 + right + 1)
        gk = min(G, Lk)
        if lo <= gk:
            yield i0, i1, (0, max(hi, gk)), None
        else:
            yield i0, i1, (lo, hi), (0, gk)


def _bounds_blocks(lo, hi, Lq, Lk):
    """Bounds mode: yield (i0, i1, (k0, k1), None) query chunks with the key range their rows
    see (lo / hi: (Lq,) int64 of one sample, on the CPU)."""
    for i0 in range(0, Lq, _CHUNK):
        i1 = min(Lq, i0 + _CHUNK)
        k0 = max(0, int(lo[i0:i1].min()))
        k1 = min(Lk, int(hi[i0:i1].max()))
        yield i0, i1, (k0, max(k0, k1)), None


def _blocks(b, Lq, Lk, left, right, causal, G, key_lo, key_hi):
    if key_lo is None:
        return _row_blocks(Lq, Lk, left, right, causal, G)
    return _bounds_blocks(key_lo[b].long().cpu(), key_hi[b].long().cpu(), Lq, Lk)


def _block_mask(b, i0, i1, kidx, off, Lk, left, right, causal, G, key_lo, key_hi, key_mask):
    """(C, nk) bool: allowed(i, j) for rows [i0, i1) of sample b and keys kidx."""
    if key_lo is None:
        m = _mask(i0, i1, kidx, off, Lk, left, right, causal, G)
    else:
        j = kidx[None, :]
        m = (j >= key_lo[b, i0:i1, None].long()) & (j < key_hi[b, i0:i1, None].long()) & \
            (j < Lk)
    if key_mask is not None:
        m = m & key_mask[b, kidx][None, :]
    return m


def _key_index(rng, glob, device):
    idx = torch.arange(rng[0], rng[1], device=device)
    if glob is not None and glob[1] > glob[0]:
        idx = torch.cat([torch.arange(glob[0], glob[1], device=device), idx])
    return idx


def _mask(i0, i1, kidx, off, Lk, left, right, causal, G):
    """allowed(i, j) of docs/design.md for rows [i0, i1) and keys kidx -> (C, nk) bool."""
    return allowed(torch.arange(i0, i1, device=kidx.device), kidx, off, Lk, left, right,
                   causal, G)


def allowed(rows, kidx, off, Lk, left, right, causal, G):
    """allowed(i, j) of docs/design.md in one sample (off = Lk - Lq) for query rows `rows` (R,)
    and keys kidx (nk,) -> (R, nk) bool (rows are taken as valid: i < Lq is the caller's)."""
    p = rows[:, None] + off
    j = kidx[None, :]
    inwin = torch.ones_like(p, dtype=torch.bool) & (j < Lk)
    if left >= 0:
        inwin = inwin & (j >= p - left)
    if right >= 0:
        inwin = inwin & (j <= p + right)
    glob = (j < G) | (p < G)
    if causal:
        glob = glob & (j <= p)
    return (inwin | glob) & (j < Lk)


def _scores(qc, kc, scale, mask, g, softcap=0.0):
    """qc (Hq, C, D), kc (Hkv, nk, D) -> scores (Hkv, g, C, nk) with -inf where masked
    (capped to softcap·tanh(s / softcap) first when softcap > 0)."""
    Hkv = kc.shape[0]
    C = qc.shape[1]
    s = torch.matmul(qc.reshape(Hkv, g * C, -1), kc.transpose(-1, -2)) * scale
    s = s.view(Hkv, g, C, -1)
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    return s.masked_fill(~mask, float("-inf"))


def _softmax(s):
    """Row softmax of masked scores (…, C, nk), max-subtracted (exact at any logit size)
    -> (p, m, l): p = exp(s - m) unnormalised, m the row max, l = rowsum(p).

    A row with no allowed key (m = -inf) gets p = 0, l = 0.  A NaN score makes m NaN and the
    whole row NaN; a +inf score gives exp(inf - inf) = NaN for the row, as IEEE says."""
    m = s.amax(-1, keepdim=True)  # amax propagates NaN
    # subtract 0 for rows with m = -inf or NaN: masked scores (-inf) then still give 0
    p = torch.exp(s - torch.nan_to_num(m, nan=0.0, neginf=0.0, posinf=float("inf")))
    return p, m, p.sum(-1, keepdim=True)


def _mm_masked(a, b, allowed, chunk=32):
    """a @ b in which an entry a[..., i, j] that `allowed` (broadcast to a's last two dims)
    masks out never multiplies row b[..., j, :].

    a is already 0 there; the point is 0 * NaN = NaN: a non-finite value in a key / row that
    `allowed` hides must not reach the rows that do not see it.  Finite b (the usual case)
    costs one isfinite check."""
    fin = torch.isfinite(b).all(-1)  # (..., n)
    if bool(fin.all()):
        return torch.matmul(a, b)
    bad = (~fin).reshape(-1, fin.shape[-1]).any(0).nonzero().flatten()
    out = torch.matmul(a, b.index_fill(-2, bad, 0))
    allowed = allowed.expand(*allowed.shape[:-2], a.shape[-2], a.shape[-1])
    for c0 in range(0, bad.numel(), chunk):
        jb = bad[c0:c0 + chunk]
        ab = a.index_select(-1, jb)[..., None]  # (..., rows, nb, 1)
        bb = b.index_select(-2, jb).unsqueeze(-3)  # (..., 1, nb, D)
        keep = allowed.index_select(-1, jb)[..., None]
        out = out + torch.where(keep, ab * bb, torch.zeros((), dtype=out.dtype,
                                                            device=out.device)).sum(-2)
    return out


def window_fwd(q, k, v, seqlens_q, seqlens_k, left, right, causal, global_tokens, scale,
               softcap=0.0, key_lo=None, key_hi=None, key_mask=None, dropout_p=0.0,
               seed=None):
    """-> out (B, Hq, Sq, D) in q.dtype, lse (B, Hq, Sq) fp32.

    Non-finite inputs reach exactly the rows that see them (docs/design.md): a NaN query or seen
    key makes the row NaN (lse NaN), a +inf score makes it NaN (lse +inf), a non-finite value
    row is summed with IEEE rules into the rows that see it and into no other."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    cdt = _cdt(q.dtype)
    if causal:
        right = 0
    if _batched.applies(q, k, dropout_p, v):  # small, finite, with dropout: batched
        mask = _batched.allowed(B, Sq, Sk, seqlens_q, seqlens_k, left, right, causal,
                                global_tokens, key_lo, key_hi, key_mask, q.device)
        return _batched.forward(q, k, v, mask, scale, softcap, dropout_p, seed, cdt)
    out = torch.zeros(B, Hq, Sq, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.full((B, Hq, Sq), float("-inf"), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    g = Hq // Hkv
    for b, (Lq, Lk) in enumerate(zip(_lengths(seqlens_q, Sq, B), _lengths(seqlens_k, Sk, B))):
        if Lq <= 0 or Lk <= 0:
            continue
        off = Lk - Lq
        for i0, i1, rng, glob in _blocks(b, Lq, Lk, left, right, causal, global_tokens,
                                         key_lo, key_hi):
            kidx = _key_index(rng, glob, q.device)
            if kidx.numel() == 0:
                continue
            mask = _block_mask(b, i0, i1, kidx, off, Lk, left, right, causal, global_tokens,
                               key_lo, key_hi, key_mask)
            qc = q[b, :, i0:i1].to(cdt)  # (Hq, C, D)
            kc = k[b][:, kidx].to(cdt)  # (Hkv, nk, D)
            vc = v[b][:, kidx].to(cdt)
            p, m, l = _softmax(_scores(qc, kc, scale, mask, g, softcap))  # (Hkv, g, C, nk)
            pd = p if not dropout_p else p * _drop(seed, b, Hq, i0, i1, kidx, dropout_p, p)
            o = _mm_masked(pd, vc[:, None], mask)  # (Hkv, g, C, D)
            o = torch.where(l == 0, torch.zeros_like(o), o / l)
            lse_b = torch.where(m == float("inf"), m, m + torch.log(l))  # -inf when l == 0
            out[b, :, i0:i1] = o.reshape(Hq, i1 - i0, -1).to(q.dtype)
            lse[b, :, i0:i1] = lse_b.reshape(Hq, i1 - i0).float()
    return out, lse


def window_bwd(dout, q, k, v, out, lse, seqlens_q, seqlens_k, left, right, causal,
               global_tokens, scale, softcap=0.0, key_lo=None, key_hi=None, key_mask=None,
               dropout_p=0.0, seed=None):
    """-> dq (B, Hq, Sq, D), dk, dv (B, Hkv, Sk, D) in the input dtypes.

    Recomputes P per block as a self-normalised softmax (a block holds every key its rows
    see, so no saved lse is needed: exact at any logit size): dV += Pᵀ dO;
    dS = P ∘ (dP − rowsum(P∘dP)), dP = dO Vᵀ; dQ = scale·dS K; dK += scale·dSᵀ Q.
    With softcap c, dS is taken through the cap: dS_raw = dS ∘ (1 − (S_capped / c)²).
    With dropout (Z = keep / (1 − p)): O = (P∘Z) V, so dV += (P∘Z)ᵀ dO and dP = (dO Vᵀ)∘Z.
    Masked entries take part in no product (see _mm_masked)."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    cdt = _cdt(q.dtype)
    if causal:
        right = 0
    if _batched.applies(q, k, dropout_p, q, k, v, dout):
        mask = _batched.allowed(B, Sq, Sk, seqlens_q, seqlens_k, left, right, causal,
                                global_tokens, key_lo, key_hi, key_mask, q.device)
        return _batched.backward(dout, q, k, v, mask, scale, softcap, dropout_p, seed, cdt)
    dq = torch.zeros(B, Hq, Sq, D, dtype=cdt, device=q.device)
    dk = torch.zeros(B, Hkv, Sk, D, dtype=cdt, device=q.device)
    dv = torch.zeros(B, Hkv, Sk, v.shape[-1], dtype=cdt, device=q.device)
    if dq.numel() == 0 or dk.numel() == 0:
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
    g = Hq // Hkv
    zero = torch.zeros((), dtype=cdt, device=q.device)
    for b, (Lq, Lk) in enumerate(zip(_lengths(seqlens_q, Sq, B), _lengths(seqlens_k, Sk, B))):
        if Lq <= 0 or Lk <= 0:
            continue
        off = Lk - Lq
        for i0, i1, rng, glob in _blocks(b, Lq, Lk, left, right, causal, global_tokens,
                                         key_lo, key_hi):
            kidx = _key_index(rng, glob, q.device)
            if kidx.numel() == 0:
                continue
            C = i1 - i0
            mask = _block_mask(b, i0, i1, kidx, off, Lk, left, right, causal, global_tokens,
                               key_lo, key_hi, key_mask)
            qc = q[b, :, i0:i1].to(cdt)
            kc = k[b][:, kidx].to(cdt)
            vc = v[b][:, kidx].to(cdt)
            doc = dout[b, :, i0:i1].to(cdt).reshape(Hkv, g, C, -1)
            s_ = _scores(qc, kc, scale, mask, g, softcap)
            p, m, l = _softmax(s_)
            p = torch.where(l == 0, torch.zeros_like(p), p / l)
            # a block with a NaN / inf anywhere keeps every masked pair out of every product
            clean = bool(torch.isfinite(l).all()) and all(
                bool(torch.isfinite(t).all()) for t in (qc, kc, vc, doc))
            sel = (lambda x: x) if clean else (lambda x: torch.where(mask, x, zero))  # noqa
            mm = (lambda a, b_, _: torch.matmul(a, b_)) if clean else _mm_masked  # noqa
            p = sel(p)
            z = None if not dropout_p else _drop(seed, b, Hq, i0, i1, kidx, dropout_p, p)
            pd = p if z is None else p * z
            dv[b].index_add_(1, kidx, mm(pd.transpose(-1, -2), doc, mask.T).sum(1))
            dp = torch.matmul(doc, vc[:, None].transpose(-1, -2))  # (Hkv, g, C, nk)
            if z is not None:
                dp = dp * z
            # rowsum(P∘dP) == rowsum(dO∘O); this form is exact when a row sees one key
            delta = sel(p * dp).sum(-1, keepdim=True)
            ds = sel(p * (dp - delta)) * scale
            if softcap:  # through the cap: d(c·tanh(x/c))/dx = 1 − tanh²; masked s is -inf
                t = torch.where(mask, s_ / softcap, zero)
                ds = ds * (1 - t * t)
            dq[b, :, i0:i1] = mm(ds, kc[:, None], mask).reshape(Hq, C, D)
            dk[b].index_add_(1, kidx, mm(ds.transpose(-1, -2), qc.reshape(Hkv, g, C, D),
                                         mask.T).sum(1))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _drop(seed, b, Hq, i0, i1, kidx, p, like):
    """The dropout factor (Hkv, g, C, nk) of a block, like `like`: keep / (1 − p) or 0."""
    z = _dropout.scale_block(seed, b, Hq, i0, i1, kidx, p, like.dtype)
    return z.view(like.shape)


def cross_fwd(q, k, v, seqlens_q, seqlens_k, scale, softcap=0.0, dropout_p=0.0, seed=None):
    return window_fwd(q, k, v, seqlens_q, seqlens_k, -1, -1, False, 0, scale, softcap,
                      dropout_p=dropout_p, seed=seed)


def cross_bwd(dout, q, k, v, out, lse, seqlens_q, seqlens_k, scale, softcap=0.0,
              dropout_p=0.0, seed=None):
    return window_bwd(dout, q, k, v, out, lse, seqlens_q, seqlens_k, -1, -1, False, 0, scale,
                      softcap, dropout_p=dropout_p, seed=seed)


def default_scale(D: int) -> float:
    return 1.0 / math.sqrt(D)
