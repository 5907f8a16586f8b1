"""Scattered ``blockwise_overlay`` groups on the op: one bounds-mode call per group, on the keys
in a per-group order (eager planning, like the rest of :mod:`mmcore.patch.hf_bounds`).

A group g of ``blockwise_overlay(ids)`` (PaliGemma's prefix: every token of token type 0;
a Gemma-3 image block) whose members are not contiguous among the valid keys makes the
allowed set of its rows two or more intervals: with ``or(causal, blockwise)`` a row q of g
sees ``[0, q] | {k in g}``.  Attention does not depend on the order of the keys (k, v and
``key_mask`` permuted together), so these rows are served by a call on the keys reordered as

    perm_g = [members of g, in order | the other keys, in order]        (per sample, (B, Sk))

where the set becomes ONE interval: ``[0, |g| + #(non-members <= q))``.  The mask function is
evaluated in that order by the same interval algebra as the natural one
(``hf_bounds._eval`` on a :class:`_GroupCtx`): every leaf that is an interval of positions
(causal, sliding overlays, chunks, bidirectional) is an interval on the members and an
interval on the non-members (both keep their order); the group's own blockwise leaf is all
members; ``and`` / ``or`` act part by part; the row is claimed when the two parts join into
one interval of the permuted keys (no valid key in their gap).  ``or(causal, blockwise)``
always does; a sliding window ``and``-ed to it (Gemma-3 / PaliGemma-2 sliding layers) cuts the
non-members to ``(q - w, q]``, which joins the members only when no valid non-member key
lies at or before ``q - w``: otherwise the pattern is not claimed (dense path).

Plan and cost: rows whose set is one interval in the natural order keep the natural call
(their other rows get an empty interval there); each scattered group with rows that are not
adds one ``window_attention`` call over all Sq rows and the gathered keys (rows outside the
group get an empty interval), and the outputs are combined row by row with ``torch.where``.
So the layer costs 1 + (number of scattered groups) op calls plus a gather of k and v
(B, Hkv, Sk, D) per group; more than :data:`MAX_GROUPS` scattered groups are not claimed.
Every call is an ordinary op call: forward and backward are exact on every backend that
serves ``key_bounds`` / ``key_mask``, the gradients of k and v flow back through the gather.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from . import hf_bounds as hb

MAX_GROUPS = 4  # scattered groups served with one call each; more: not claimed (dense)


class Group(NamedTuple):
    """One permuted call.  perm (B, Sk) int64: the key column at permuted position p; lo, hi
    (B, Sq) int32: the permuted positions [lo, hi) row i sees (empty outside `rows`); rows
    (B, Sq) bool: the query rows this call serves."""
    perm: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    rows: torch.Tensor


class _Seg(NamedTuple):
    """A row set in permuted positions: its part on the members of g ([0, |g|)) and on the
    other keys ([|g|, Sk)), each an ``hb._Iv`` (B, Sq)."""
    m: object
    n: object


class _GroupCtx:
    """``hb._eval``'s algebra on the keys permuted for group g (see the module docstring)."""

    def __init__(self, base, raw_ids, ids, g):
        B, Sk = base.B, base.Sk
        self.base, self.raw, self.q, self.shape = base, raw_ids, base.q, base.shape
        self.B, self.Sk, self.kv0 = B, Sk, base.kv0
        dev = base.q.device
        member = ids[:, base.kv0:base.kv0 + Sk] == g  # (B, Sk)
        self.perm = torch.argsort((~member).to(torch.int64), dim=1, stable=True)  # (B, Sk)
        cm = torch.zeros(B, Sk + 1, dtype=torch.long, device=dev)
        cm[:, 1:] = member.long().cumsum(1)
        self.cm = cm  # (B, Sk + 1): members among key columns < c
        self.M = cm[:, -1:]  # (B, 1): |g| per sample
        vp = torch.zeros(B, Sk + 1, dtype=torch.long, device=dev)
        vp[:, 1:] = base.valid.gather(1, self.perm).long().cumsum(1)
        self.vp = vp  # (B, Sk + 1): valid keys among permuted positions < p
        self.rows = ids.gather(1, base.q.expand(B, -1)) == g  # (B, Sq)

    def iv(self, lo, hi, exact=None):
        """An interval [lo, hi) of absolute positions -> its member and non-member parts."""
        dev = self.q.device
        cl = self.base.col(torch.as_tensor(lo, device=dev).expand(self.shape))
        ch = self.base.col(torch.as_tensor(hi, device=dev).expand(self.shape))
        ml, mh = self.cm.gather(1, cl), self.cm.gather(1, ch)
        t = self.base.true
        return _Seg(hb._Iv(ml, mh, t), hb._Iv(self.M + cl - ml, self.M + ch - mh, t))

    def count(self, a, b):
        """valid keys at permuted positions [a, b), (B, Sq)."""
        ca, cb = a.clamp(0, self.Sk), b.clamp(0, self.Sk)
        n = self.vp.gather(1, cb) - self.vp.gather(1, ca)
        return torch.where(cb > ca, n, torch.zeros_like(n))

    def union(self, a, b):
        return _Seg(hb._union(self, a.m, b.m), hb._union(self, a.n, b.n))

    def intersect(self, a, b):
        return _Seg(hb._intersect(a.m, b.m), hb._intersect(a.n, b.n))

    def blockwise(self, ids):
        """The group's own leaf: all members for its rows (other rows: not claimed here)."""
        if ids is not self.raw:
            return None  # a second blockwise leaf: not planned
        zero = torch.zeros(self.shape, dtype=torch.long, device=self.q.device)
        return _Seg(hb._Iv(zero, self.M.expand(self.shape), self.rows),
                    hb._Iv(self.M.expand(self.shape), zero, self.rows))


def _blockwise_leaves(fn, out, depth=0):
    """The ``block_sequence_ids`` of every blockwise leaf under ``or`` / ``and``."""
    if depth > 16:
        return
    kind = hb._codes().get(getattr(fn, "__code__", None))
    cv = hb._closure(fn)
    if kind in ("or", "and"):
        for s in cv.get("mask_functions") or ():
            _blockwise_leaves(s, out, depth + 1)
    elif kind == "blockwise":
        out.append(cv.get("block_sequence_ids"))


def plan(mask_function, ctx, iv, qvalid):
    """Rows of `iv` (the natural evaluation, ``hb._Iv``) that are valid but not exact ->
    a tuple of :class:`Group` serving them (empty when there are none), or None (a row not in
    a blockwise group, several blockwise leaves, more than MAX_GROUPS groups, a group whose
    rows are not one interval in its order either)."""
    bad = qvalid & ~iv.exact  # (B, Sq)
    if not bool(bad.any()):
        return ()
    leaves = []
    _blockwise_leaves(mask_function, leaves)
    if len(leaves) != 1 or not all(x is leaves[0] for x in leaves):
        return None
    raw = leaves[0]
    ids = raw.to(ctx.q.device).long().expand(ctx.B, -1)
    gq = ids.gather(1, ctx.q.expand(ctx.B, -1))  # (B, Sq)
    gb = gq[bad]
    if bool((gb < 0).any()):
        return None
    gs = torch.unique(gb).tolist()
    if len(gs) > MAX_GROUPS:
        return None
    groups = []
    for g in gs:
        gc = _GroupCtx(ctx, raw, ids, g)
        s = hb._eval(mask_function, gc)
        if not isinstance(s, _Seg):
            return None
        f = hb._union(gc, s.m, s.n)
        rows = bad & gc.rows
        if not bool((f.exact | ~rows).all()):
            return None
        lo, hi = f.lo.clamp(0, ctx.Sk), f.hi.clamp(0, ctx.Sk)
        keep = rows & (lo < hi)
        z = torch.zeros_like(lo)
        groups.append(Group(gc.perm, torch.where(keep, lo, z).to(torch.int32).contiguous(),
                            torch.where(keep, hi, z).to(torch.int32).contiguous(), rows))
    return tuple(groups)


def claim(lo, hi, groups, Sk, rows=None):
    """The keys a plan lets rows see, in natural key columns: (B, R, Sk) bool (R = Sq, or the
    rows (R,) int64 given).  lo, hi (B, Sq): the natural call's bounds."""
    sel = (lambda t: t) if rows is None else (lambda t: t[:, rows])
    j = torch.arange(Sk, device=lo.device)[None, None]
    m = (j >= sel(lo)[..., None].long()) & (j < sel(hi)[..., None].long())
    for g in groups:
        B = g.perm.shape[0]
        pos = torch.empty_like(g.perm).scatter_(
            1, g.perm, torch.arange(Sk, device=g.perm.device).expand(B, -1))  # (B, Sk)
        pos = pos[:, None, :]
        mg = (pos >= sel(g.lo)[..., None].long()) & (pos < sel(g.hi)[..., None].long())
        m = torch.where(sel(g.rows)[..., None], mg, m)
    return m


def to_device(groups, device):
    return tuple(Group(*(t.to(device) for t in g)) for g in groups)


def run(out, q, k, v, groups, key_mask, scale, softcap, backend, dropout_p=0.0):
    """The groups' calls over `out` (the natural call's output, (B, Hq, Sq, D)): q (B, Hq, Sq,
    D), k/v (B, Hkv, Sk, D), key_mask (B, Sk) bool or None -> (B, Hq, Sq, D).  dropout_p: the
    op's attention dropout (training)."""
    from ..ops import window_attention
    for g in groups:
        idx = g.perm[:, None, :, None]  # (B, 1, Sk, 1)
        kg = torch.take_along_dim(k, idx, dim=2)
        vg = torch.take_along_dim(v, idx, dim=2)
        km = None if key_mask is None else key_mask.gather(1, g.perm)
        og = window_attention(q, kg, vg, key_bounds=(g.lo, g.hi), key_mask=km, scale=scale,
                              softcap=softcap, dropout_p=dropout_p, backend=backend)
        out = torch.where(g.rows[:, None, :, None], og, out)
    return out
