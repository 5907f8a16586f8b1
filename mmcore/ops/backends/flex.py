"""FlexAttention wrapped to the window_attention contract (the `flex` backend).

Every window problem: (left, right) with bottom-right alignment per sample, causal, a
global-token prefix, per-sample lengths, GQA (enable_gqa), and lse (natural log) from the
kernel; bounds mode and key masks in the mask_mod, soft-capping as a score_mod.  On CUDA flex_attention runs compiled once with dynamic shapes (new lengths,
batch sizes and windows do not recompile: the window, G, causal and the lengths reach the
mask as tensors); the backward recomputes through flex under autograd (one more forward).
On the CPU it runs eagerly (torch 2.13's compiled CPU flex has no lse and no backward, and
fails to build with dynamic batch sizes): a dense O(Sq·Sk) path that checks the wrapper and
the mask semantics against the oracle; `auto` never picks it there, and it has no backward.

Block masks are built from block indices, never by evaluating the mask on (Sq, Sk)
(:func:`block_flags`): for each (query block, key block) pair, whether any pair in it may be
allowed (it is visited, with the mask applied per element) and whether all are (visited
without the mask).  Without lengths they are cached per (B, Sq, Sk, window, causal, G,
device); with lengths they are rebuilt per call from the lengths, on the device, with no
host synchronisation.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict

import torch

from . import sdpa

BLOCK = 128
_BIG = 1 << 30  # an unbounded window side
_CACHE: OrderedDict = OrderedDict()
_PARAMS: dict = {}
_COMPILED = []


def _flex():
    from torch.nn.attention import flex_attention as fa

    return fa


def _softcap_mod(c):
    """score_mod for logit soft-capping: c·tanh(s / c) (None when c is 0: no score_mod)."""
    if not c:
        return None

    def score_mod(score, b, h, i, j):
        return torch.tanh(score / c) * c

    return score_mod


def _call(q, k, v, block_mask, scale, softcap=0.0):
    """-> out, lse through flex_attention (compiled on CUDA)."""
    fa = _flex()
    if q.device.type == "cuda":
        if not _COMPILED:
            _COMPILED.append(torch.compile(fa.flex_attention, dynamic=True))
        fn = _COMPILED[0]
    else:
        fn = fa.flex_attention
    kw = dict(block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1],
              score_mod=_softcap_mod(softcap))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the eager (CPU) path warns on every call
        if hasattr(fa, "AuxRequest"):
            out, aux = fn(q, k, v, return_aux=fa.AuxRequest(lse=True), **kw)
            return out, aux.lse
        return fn(q, k, v, return_lse=True, **kw)


def _params(left, right, causal, G, device):
    """(left, right, G, causal) as an int32 tensor the mask reads (no recompiles; cached:
    never written after creation)."""
    key = (left, right, causal, G, device)
    t = _PARAMS.get(key)
    if t is None:
        if len(_PARAMS) > 256:
            _PARAMS.clear()
        t = _PARAMS[key] = torch.tensor([_BIG if left < 0 else left,
                                         _BIG if right < 0 else right, G, int(causal)],
                                        dtype=torch.int32, device=device)
    return t


def _mask_mod(prm, Lq, Lk, key_lo=None, key_hi=None, key_mask=None):
    """allowed(b, h, i, j) of docs/design.md; prm from _params, Lq / Lk (B,) int32 lengths;
    bounds mode (key_lo / key_hi (B, Sq) int32) and key_mask (B, Sk) bool when given."""

    def pattern(b, i, j):
        lq, lk = Lq[b], Lk[b]
        if key_lo is not None:
            return (i < lq) & (j < lk) & (j >= key_lo[b, i]) & (j < key_hi[b, i])
        p = i + lk - lq
        left, right, G, causal = prm[0], prm[1], prm[2], prm[3]
        inwin = (j >= p - left) & (j <= p + right)
        glob = ((j < G) | (p < G)) & ((causal == 0) | (j <= p))
        return (i < lq) & (j < lk) & (inwin | glob)

    if key_mask is None:
        return lambda b, h, i, j: pattern(b, i, j)
    return lambda b, h, i, j: pattern(b, i, j) & key_mask[b, j]


def block_flags(Lq, Lk, Sq, Sk, left, right, causal, G, bq=BLOCK, bk=BLOCK):
    """Which (query block, key block) pairs to visit: (any (B, nq, nk), full (B, nq, nk)).

    any: some (i, j) in the block may be allowed (a superset; the mask decides per element);
    full: every (i, j) of the block is allowed (visited without the mask).  Lq / Lk: (B,)
    int64 valid lengths; left / right < 0 mean unbounded; right is 0 when causal."""
    dev = Lq.device
    L = left if left >= 0 else _BIG
    R = 0 if causal else (right if right >= 0 else _BIG)
    lq, lk = Lq[:, None, None], Lk[:, None, None]  # (B, 1, 1)
    i0 = (torch.arange(0, Sq, bq, device=dev))[None, :, None]  # (1, nq, 1)
    j0 = (torch.arange(0, Sk, bk, device=dev))[None, None, :]  # (1, 1, nk)
    i1 = torch.clamp(i0 + bq, max=Sq) - 1  # last row / key of the block in the tensor
    j1 = torch.clamp(j0 + bk, max=Sk) - 1
    off = lk - lq
    # any: the valid part of the block is not empty, and some pair is in the window or global
    ie, je = torch.minimum(i1, lq - 1), torch.minimum(j1, lk - 1)
    plo, phi = i0 + off, ie + off
    nonempty = (i0 < lq) & (j0 < lk)
    any_win = (je >= plo - L) & (j0 <= phi + R)
    if causal:
        any_glob = ((j0 < G) & (j0 <= phi)) | ((plo < G) & (j0 <= torch.clamp(phi, max=G - 1)))
    else:
        any_glob = (j0 < G) | (plo < G)
    anyb = nonempty & (any_win | any_glob)
    # full: every row and key of the block is valid, and the window (or the global part)
    # covers all of it
    valid = (i1 < lq) & (j1 < lk)
    plo, phi = i0 + off, i1 + off
    win_all = (j0 >= phi - L) & (j1 <= plo + R)
    causal_ok = (j1 <= plo) if causal else torch.ones_like(win_all)
    glob_all = ((j1 < G) | (phi < G)) & causal_ok
    full = anyb & valid & (win_all | glob_all)
    return anyb, full


def _ordered(flags):
    """(B, nq, nk) bool -> (num (B, 1, nq) int32, indices (B, 1, nq, nk) int32), the
    visited key blocks of each query block first, in order."""
    num = flags.sum(-1, dtype=torch.int32)[:, None]
    idx = torch.argsort((~flags).to(torch.int8), dim=-1, stable=True).to(torch.int32)[:, None]
    return num, idx


def bounds_flags(lo, hi, Lq, Lk, Sq, Sk, bq=BLOCK, bk=BLOCK):
    """Bounds mode: (any, full) (B, nq, nk) block flags from the row bounds lo / hi (B, Sq):
    a key block is visited when it meets [min lo, max hi) of the block's valid rows; no block
    is taken as full (the mask is applied everywhere)."""
    B = lo.shape[0]
    nq = (Sq + bq - 1) // bq
    pad = nq * bq - Sq
    rows = torch.arange(nq * bq, device=lo.device)[None] < Lq[:, None]  # (B, nq*bq)
    big = torch.iinfo(torch.int32).max
    lo_ = torch.nn.functional.pad(lo, (0, pad), value=big).masked_fill(~rows, big)
    hi_ = torch.nn.functional.pad(hi, (0, pad), value=-1).masked_fill(~rows, -1)
    blo = lo_.view(B, nq, bq).amin(-1).clamp(min=0)[:, :, None].long()  # (B, nq, 1)
    bhi = torch.minimum(hi_.view(B, nq, bq).amax(-1).long(), Lk[:, None])[:, :, None]
    j0 = torch.arange(0, Sk, bk, device=lo.device)[None, None, :]
    j1 = torch.clamp(j0 + bk, max=Sk)
    anyb = (j0 < bhi) & (j1 > blo) & (blo < bhi)
    return anyb, torch.zeros_like(anyb)


def block_mask(q, k, seqlens_q, seqlens_k, left, right, causal, G, key_lo=None, key_hi=None,
               key_mask=None):
    """The BlockMask of a call (cached when there are no lengths, bounds or key mask)."""
    B, Sq, Sk = q.shape[0], q.shape[2], k.shape[2]
    key = None
    if seqlens_q is None and seqlens_k is None and key_lo is None and key_mask is None:
        key = (q.device, B, Sq, Sk, left, right, causal, G)
        hit = _CACHE.get(key)
        if hit is not None:
            _CACHE.move_to_end(key)
            return hit
    dev = q.device
    Lq = seqlens_q if seqlens_q is not None else torch.full((B,), Sq, device=dev)
    Lk = seqlens_k if seqlens_k is not None else torch.full((B,), Sk, device=dev)
    if key_lo is not None:
        anyb, full = bounds_flags(key_lo, key_hi, Lq.long(), Lk.long(), Sq, Sk)
    else:
        anyb, full = block_flags(Lq.long(), Lk.long(), Sq, Sk, left, right, causal, G)
    if key_mask is not None:  # a block may hold hidden keys: never visited without the mask
        anyb, full = anyb, torch.zeros_like(full)
    n, idx = _ordered(anyb & ~full)
    fn, fidx = _ordered(full)
    mm = _mask_mod(_params(left, right, causal, G, dev), Lq.to(torch.int32),
                   Lk.to(torch.int32), key_lo, key_hi, key_mask)
    bm = _flex().BlockMask.from_kv_blocks(n, idx, fn, fidx, BLOCK_SIZE=(BLOCK, BLOCK),
                                          mask_mod=mm, seq_lengths=(Sq, Sk))
    if key is not None:
        _CACHE[key] = bm
        if len(_CACHE) > 32:
            _CACHE.popitem(last=False)
    return bm


def forward(q, k, v, seqlens_q, seqlens_k, left, right, causal, global_tokens, scale,
            softcap=0.0, key_lo=None, key_hi=None, key_mask=None):
    """-> out (B, Hq, Sq, D), lse (B, Hq, Sq) fp32.  Rows that see no key: 0, lse -inf."""
    if sdpa.empty(q, k):
        return sdpa.forward(q, k, v, seqlens_q, seqlens_k, False, scale)
    q, k, v = sdpa.zero_padding(q, k, v, seqlens_q, seqlens_k)
    q, k, v = _zero_hidden(q, k, v, key_mask)
    bm = block_mask(q, k, seqlens_q, seqlens_k, left, right, causal, global_tokens, key_lo,
                    key_hi, key_mask)
    out, lse = _call(q, k, v, bm, scale, softcap)
    return out, lse.float()


def _zero_hidden(q, k, v, key_mask):
    """k, v zeroed at hidden keys (a NaN there must not reach a row through 0·NaN)."""
    if key_mask is None:
        return q, k, v
    m = key_mask[:, None, :, None]
    return q, torch.where(m, k, 0.0), torch.where(m, v, 0.0)


def backward(dout, q, k, v, out, lse, seqlens_q, seqlens_k, left, right, causal,
             global_tokens, scale, softcap=0.0, key_lo=None, key_hi=None, key_mask=None):
    """CUDA: dq, dk, dv by autograd through the compiled flex (recomputes the forward).

    Needs autograd to record: true in the eager path (mmcore's autograd.Function); inside
    the custom op (a torch.compile'd model) it is not, and this raises, so that `auto`
    serves the backward from the next backend (the lse contract is the same)."""
    if sdpa.empty(q, k):
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if q.device.type != "cuda":
        raise RuntimeError("flex: no backward on the CPU (FlexAttention runs eagerly there)")
    q, k, v = sdpa.zero_padding(q, k, v, seqlens_q, seqlens_k)
    q, k, v = _zero_hidden(q, k, v, key_mask)
    bm = block_mask(q, k, seqlens_q, seqlens_k, left, right, causal, global_tokens, key_lo,
                    key_hi, key_mask)
    q_, k_, v_ = (t.detach().requires_grad_(True) for t in (q, k, v))
    with torch.enable_grad():
        o, _ = _call(q_, k_, v_, bm, scale, softcap)
    if not o.requires_grad:
        raise RuntimeError("flex: backward needs autograd, which is off inside mmcore's custom "
                           "op (a torch.compile'd caller); another backend serves it")
    return torch.autograd.grad(o, (q_, k_, v_), dout)


def check(p) -> list:
    if p.device == "cpu" and p.needs_grad:
        return ["no backward on the CPU (FlexAttention runs eagerly there)"]
    return []
