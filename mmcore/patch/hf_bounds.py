"""Hugging Face masks as per-row key intervals: ``window_attention``'s bounds mode
(``key_bounds=(lo, hi)``, ``key_mask``; docs/design.md) for the patterns that are not one
window per layer.

Two sources, both eager-only (the recognised layout depends on the data):

* **Mask functions** (:func:`from_mask_function`, called by ``hf_interface.mmcore_mask`` when
  ``hf_masks.classify`` does not know the pattern).  HF builds ``or_masks`` / ``and_masks`` of
  ``causal_mask_function``, ``sliding_window_overlay(w)``, ``blockwise_overlay(ids)`` (the
  image / prefix groups of Gemma-3 and PaliGemma), ... .  Every leaf is recognised by its code
  object (not its name), its closure data is read, and each leaf is evaluated as one interval
  of absolute key positions per query row, in O(B * S) without an (Sq, Sk) mask:

      causal [-inf, q+1)      sliding overlay w [q-w+1, +inf)      bidirectional [-inf, +inf)
      blockwise group g of q: [first, last + 1) over the valid keys of group g

  ``and`` intersects intervals; ``or`` unites them.  The result is exact "modulo padding":
  keys the padding hides (``key_mask``) may sit inside an interval.  Where that is not
  guaranteed (a group whose valid keys are not contiguous among the valid keys, a union with a
  valid key in its gap) the rows are not served by that call: rows of a scattered blockwise
  group get one more call on the keys permuted for that group (``hf_scattered``: at most
  ``MAX_GROUPS`` groups, each an interval there), any other such row leaves the pattern
  unclaimed.  The plan (:class:`Plan`) is then checked by evaluating the mask function itself
  on a few probe rows of every sample.

* **Dense 4-D masks** (:func:`factor_dense`, called by ``mmcore_attention_forward``): the
  additive or boolean mask a model built itself (mllama's cross-attention and vision masks) is
  factored as first / last allowed key per row (the bounds) and the keys hidden inside some
  row's interval (``key_mask``, which must hide them from every row whose interval covers
  them).  Rows that see every key while other rows have holes (mllama's text rows before the
  first image, its valid vision patches) are served by a second call without ``key_mask``.
  The factoring is verified with one comparison against the mask (a host sync).

Padded query rows (a padding token in the query position) get an empty interval: their output
is 0, as in mmcore's causal and windowed layers.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import varlen

_INF = 1 << 40  # "unbounded" in absolute key positions (int64)
_PROBE_ROWS = 16


class BoundsSpec(NamedTuple):
    """Tag of a 2-D padding mask whose layer runs in bounds mode.

    lo, hi: (B, Sq) int32, key columns [lo, hi) of the layer's key tensor (column 0 = absolute
    position kv_offset) that query row i sees, intersected with the padding mask; empty
    (lo == hi == 0) for padded query rows.  q_offset / kv_offset: as in ``MaskSpec``.  groups:
    the permuted calls of scattered blockwise groups (``hf_scattered.Group``), whose rows
    are empty in lo / hi."""
    lo: torch.Tensor
    hi: torch.Tensor
    q_offset: int
    kv_offset: int
    groups: tuple = ()


class Plan(NamedTuple):
    """A mask function as op calls: the natural call's lo, hi (B, Sq) int32 key columns, and
    the permuted calls of scattered blockwise groups (``hf_scattered.Group``; their rows are
    empty in the natural call)."""
    lo: torch.Tensor
    hi: torch.Tensor
    groups: tuple = ()


class Factored(NamedTuple):
    """A dense mask as bounds: lo, hi (B, Sq) int32; key_mask (B, Sk) bool or None; full
    (B, Sq) bool or None: rows served by a second call over every key (their lo = hi = 0 in
    the first call); average (B, Sq) bool or None: rows whose output is the mean of the
    values (an additive mask hiding every key: HF's eager softmax of equal scores)."""
    lo: torch.Tensor
    hi: torch.Tensor
    key_mask: Optional[torch.Tensor]
    full: Optional[torch.Tensor]
    average: Optional[torch.Tensor] = None


# ------------------------------------------------------------------ leaves by code object
def _codes():
    """-> {code object: leaf name} for HF's mask building blocks (transformers imported)."""
    global _CODES
    if _CODES is None:
        from transformers import masking_utils as mu
        z = torch.zeros(1, 1, dtype=torch.long)
        c = {mu.or_masks(mu.causal_mask_function).__code__: "or",
             mu.and_masks(mu.causal_mask_function).__code__: "and",
             mu.causal_mask_function.__code__: "causal",
             mu.bidirectional_mask_function.__code__: "bidirectional",
             mu.sliding_window_overlay(1).__code__: "sliding",
             mu.sliding_window_bidirectional_overlay(1).__code__: "sliding_bidirectional",
             mu.chunked_overlay(1, z).__code__: "chunked",
             mu.blockwise_overlay(z).__code__: "blockwise"}
        try:  # Gemma-3's bidirectional text window (distance < w)
            from transformers.models.gemma3 import modeling_gemma3 as g3
            c[g3._bidirectional_window_overlay(1).__code__] = "gemma3_bidirectional_window"
        except (ImportError, AttributeError):  # pragma: no cover - other versions
            pass
        _CODES = c
    return _CODES


_CODES = None


def _closure(fn):
    code = getattr(fn, "__code__", None)
    names = getattr(code, "co_freevars", ())
    out = {}
    for n, cell in zip(names, getattr(fn, "__closure__", None) or ()):
        try:
            out[n] = cell.cell_contents
        except ValueError:
            pass
    return out


class _Iv(NamedTuple):
    """Per-row interval [lo, hi) of absolute key positions, (B, Sq) int64; exact (B, Sq) bool
    (False: the rows' allowed set is not that interval modulo padding)."""
    lo: torch.Tensor
    hi: torch.Tensor
    exact: torch.Tensor


class _Ctx:
    """The call's geometry: query absolute positions, key range, key validity counts."""

    def __init__(self, B, Sq, Sk, q_offset, kv_offset, valid, device):
        self.B, self.Sq, self.Sk = B, Sq, Sk
        self.kv0 = kv_offset
        self.q = torch.arange(Sq, device=device, dtype=torch.long)[None] + q_offset  # (1, Sq)
        self.valid = valid  # (B, Sk) bool: key column j valid
        cnt = torch.zeros(B, Sk + 1, dtype=torch.long, device=device)
        cnt[:, 1:] = valid.long().cumsum(1)
        self.cnt = cnt  # (B, Sk + 1) prefix counts of valid keys
        self.shape = (B, Sq)
        self.true = torch.ones(B, Sq, dtype=torch.bool, device=device)

    def col(self, a):
        """absolute positions -> key columns clamped to [0, Sk]."""
        return (a - self.kv0).clamp(0, self.Sk)

    def count(self, a, b):
        """valid keys in absolute [a, b), (B, Sq)."""
        ca, cb = self.col(a), self.col(b)
        n = self.cnt.gather(1, cb) - self.cnt.gather(1, ca)
        return torch.where(cb > ca, n, torch.zeros_like(n))

    def iv(self, lo, hi, exact=None):
        lo = torch.as_tensor(lo, device=self.q.device).expand(self.shape)
        hi = torch.as_tensor(hi, device=self.q.device).expand(self.shape)
        return _Iv(lo, hi, self.true if exact is None else exact)

    # the algebra _eval runs on (hf_scattered._GroupCtx has the same three, on permuted keys)
    def union(self, a, b):
        return _union(self, a, b)

    def intersect(self, a, b):
        return _intersect(a, b)

    def blockwise(self, ids):
        return _blockwise(self, ids)


def _union(ctx, a, b):
    """a | b as one interval; exact where no valid key (``ctx.count``) lies in the gap."""
    ea, eb = a.lo >= a.hi, b.lo >= b.hi
    gap_lo, gap_hi = torch.minimum(a.hi, b.hi), torch.maximum(a.lo, b.lo)
    joined = (gap_hi <= gap_lo) | (ctx.count(gap_lo, gap_hi) == 0)
    lo = torch.where(ea, b.lo, torch.where(eb, a.lo, torch.minimum(a.lo, b.lo)))
    hi = torch.where(ea, b.hi, torch.where(eb, a.hi, torch.maximum(a.hi, b.hi)))
    return _Iv(lo, hi, a.exact & b.exact & (ea | eb | joined))


def _intersect(a, b):
    return _Iv(torch.maximum(a.lo, b.lo), torch.minimum(a.hi, b.hi), a.exact & b.exact)


def _int_arg(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _blockwise(ctx, ids):
    """blockwise_overlay(ids): row q of group g >= 0 sees the keys of group g.  ids (B, L)."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point() or \
            ids.shape[0] not in (1, ctx.B):
        return None
    end = ctx.kv0 + ctx.Sk
    if ids.shape[1] < max(end, int(ctx.q[0, -1]) + 1):
        return None  # HF would index out of range: let its own mask builder say so
    ids = ids.to(ctx.q.device).long().expand(ctx.B, -1)
    gq = ids.gather(1, ctx.q.expand(ctx.B, -1))  # (B, Sq)
    gk = ids[:, ctx.kv0:end]  # (B, Sk)
    member = (gk >= 0) & ctx.valid
    G = int(ids.max()) + 1 if ids.numel() else 0
    if G <= 0:
        return ctx.iv(_INF, -_INF)
    if G > ids.shape[1] + 1:
        return None  # group ids are not HF's (0, 1, ... per block): not claimed
    slot = torch.where(member, gk, torch.full_like(gk, G))  # non-members -> slot G (dropped)
    j = torch.arange(ctx.Sk, device=gk.device).expand(ctx.B, -1)
    first = torch.full((ctx.B, G + 1), ctx.Sk, dtype=torch.long, device=gk.device)
    first = first.scatter_reduce(1, slot, j, "amin")
    last = torch.full((ctx.B, G + 1), -1, dtype=torch.long, device=gk.device)
    last = last.scatter_reduce(1, slot, j, "amax")
    n = torch.zeros(ctx.B, G + 1, dtype=torch.long, device=gk.device)
    n = n.scatter_add(1, slot, member.long())
    span = ctx.cnt.gather(1, (last + 1).clamp(0, ctx.Sk)) - ctx.cnt.gather(1, first.clamp(0,
                                                                                        ctx.Sk))
    contiguous = (n == 0) | (span == n)  # every valid key inside the group's span is in it
    g = torch.where(gq >= 0, gq, torch.full_like(gq, G)).clamp(max=G)
    has = (gq >= 0) & (gq < G) & (n.gather(1, g) > 0)
    lo = torch.where(has, first.gather(1, g) + ctx.kv0, torch.full_like(gq, _INF))
    hi = torch.where(has, last.gather(1, g) + 1 + ctx.kv0, torch.full_like(gq, -_INF))
    exact = ~(gq >= 0) | contiguous.gather(1, g)
    return _Iv(lo, hi, exact)


def _eval(fn, ctx, depth=0):
    """The interval of a HF mask function, or None when a part of it is not known."""
    if depth > 16 or not callable(fn):
        return None
    kind = _codes().get(getattr(fn, "__code__", None))
    cv = _closure(fn)
    q = ctx.q
    if kind in ("or", "and"):
        subs = cv.get("mask_functions")
        if not isinstance(subs, (tuple, list)):
            return None
        acc = ctx.iv(_INF, -_INF) if kind == "or" else ctx.iv(-_INF, _INF)
        for s in subs:
            iv = _eval(s, ctx, depth + 1)
            if iv is None:
                return None
            acc = ctx.union(acc, iv) if kind == "or" else ctx.intersect(acc, iv)
        return acc
    if kind == "causal":
        return ctx.iv(-_INF, q + 1)
    if kind == "bidirectional":
        return ctx.iv(-_INF, _INF)
    if kind in ("sliding", "sliding_bidirectional", "gemma3_bidirectional_window"):
        w = cv.get("sliding_window")
        if not _int_arg(w):
            return None
        if kind == "sliding":  # kv > q - w
            return ctx.iv(q - w + 1, _INF)
        if kind == "sliding_bidirectional":  # |q - kv| <= w
            return ctx.iv(q - w, q + w + 1)
        return ctx.iv(q - w + 1, q + w)  # |q - kv| < w
    if kind == "chunked":  # (kv - p) // c == (q - p) // c, p = left padding of the sample
        c, pad = cv.get("chunk_size"), cv.get("left_padding")
        if not _int_arg(c) or c <= 0 or not isinstance(pad, torch.Tensor) or \
                pad.dim() != 1 or pad.shape[0] not in (1, ctx.B):
            return None
        p = pad.to(q.device).long()[:, None]
        start = torch.div(q - p, c, rounding_mode="floor") * c + p
        return ctx.iv(start, start + c)
    if kind == "blockwise":
        return ctx.blockwise(cv.get("block_sequence_ids"))
    return None


def _probe_rows(lo, hi, qvalid, n=_PROBE_ROWS):
    """Up to n + 4 query rows where the pattern changes shape (block edges) and a spread."""
    Sq = lo.shape[1]
    rows = set(torch.linspace(0, Sq - 1, min(Sq, 6)).round().long().tolist())
    if Sq > 1:
        odd = ((hi[:, 1:] - hi[:, :-1]) != 1) | ((lo[:, 1:] - lo[:, :-1]).abs() > 1)
        odd = odd & qvalid[:, 1:]
        idx = torch.nonzero(odd.any(0)).flatten() + 1
        if idx.numel() > n:
            idx = idx[torch.linspace(0, idx.numel() - 1, n).round().long()]
        for i in idx.tolist():
            rows.update((i - 1, i))
    return torch.tensor(sorted(rows), dtype=torch.long, device=lo.device)


def plan_of(mask_function, batch_size, q_length, kv_length, q_offset, kv_offset,
            attention_mask, device, scattered=True):
    """Eager: -> :class:`Plan` for the layer's keys (column 0 = position kv_offset), exact with
    the padding mask as ``key_mask``, or None (not recognised, not expressible, or the probe
    disagrees).  scattered: rows of scattered blockwise groups may be served by permuted calls
    (``hf_scattered``); else they make the pattern unclaimed.

    attention_mask: HF's 2-D padding mask (B, >= kv_offset + kv_length) or None."""
    from . import hf_scattered
    if not (_int_arg(q_offset) and _int_arg(kv_offset)) or q_length <= 0 or kv_length <= 0:
        return None
    B, Sq, Sk = batch_size, q_length, kv_length
    need = kv_offset + kv_length
    if attention_mask is None:
        pm = torch.ones(B, need, dtype=torch.bool, device=device)
    else:
        pm = attention_mask.to(device=device, dtype=torch.bool)
        if pm.dim() != 2 or pm.shape[0] != B:
            return None
        if pm.shape[1] < need:
            pm = torch.nn.functional.pad(pm, (0, need - pm.shape[1]))
        pm = pm[:, :need]
    ctx = _Ctx(B, Sq, Sk, q_offset, kv_offset, pm[:, kv_offset:], device)
    qpos = ctx.q.expand(B, -1)
    qvalid = (qpos < need) & pm.gather(1, qpos.clamp(max=need - 1))
    try:
        iv = _eval(mask_function, ctx)
        if iv is None:
            return None
        groups = () if bool((iv.exact | ~qvalid).all()) else \
            hf_scattered.plan(mask_function, ctx, iv, qvalid) if scattered else None
    except (RuntimeError, IndexError, TypeError, ValueError):
        return None
    if groups is None:
        return None
    lo, hi = ctx.col(iv.lo), ctx.col(iv.hi)
    keep = qvalid & (lo < hi)
    for g in groups:
        keep &= ~g.rows
    lo = torch.where(keep, lo, torch.zeros_like(lo)).to(torch.int32).contiguous()
    hi = torch.where(keep, hi, torch.zeros_like(hi)).to(torch.int32).contiguous()
    if not _probe_ok(mask_function, lo, hi, groups, ctx, qvalid):
        return None
    return Plan(lo, hi, groups)


def from_mask_function(mask_function, batch_size, q_length, kv_length, q_offset, kv_offset,
                       attention_mask, device):
    """Eager: -> (lo, hi) (B, Sq) int32 key columns (one call in the natural key order), or
    None; see :func:`plan_of` (which may also plan permuted calls)."""
    p = plan_of(mask_function, batch_size, q_length, kv_length, q_offset, kv_offset,
                attention_mask, device, scattered=False)
    return None if p is None else (p.lo, p.hi)


def _probe_ok(mask_function, lo, hi, groups, ctx, qvalid):
    """The mask function itself, on a few rows of every sample, equals what the plan's calls
    let those rows see (on valid query rows and valid keys)."""
    from . import hf_scattered
    rows = set(_probe_rows(lo, hi, qvalid).tolist())
    for g in groups:
        rows.update(_probe_rows(g.lo, g.hi, g.rows).tolist())
    rows = torch.tensor(sorted(rows), dtype=torch.long, device=lo.device)
    dev = lo.device
    b = torch.arange(ctx.B, device=dev)[:, None, None, None]
    h = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=dev)
    qi = (rows + ctx.q[0, 0])[None, None, :, None]
    kv = (torch.arange(ctx.Sk, device=dev) + ctx.kv0)[None, None, None, :]
    try:
        got = torch.as_tensor(mask_function(b, h, qi, kv)).to(dev).bool()
        got = got.expand(ctx.B, 1, rows.numel(), ctx.Sk)[:, 0]
    except Exception:  # noqa: BLE001 - a function that does not broadcast: not ours
        return False
    claim = hf_scattered.claim(lo, hi, groups, ctx.Sk, rows)
    care = qvalid[:, rows, None] & ctx.valid[:, None, :]
    return bool(((got == claim) | ~care).all())


# ------------------------------------------------------------------ dense 4-D masks
def allowed_of(mask, Sq, Sk):
    """4-D mask (B' | 1, H', Sq, >= Sk), bool (True = attend) or additive (0 / finfo.min or
    -inf) -> (allowed (B', Sq, Sk) bool, average (B', Sq) bool or None), or None (other values,
    heads that differ).  average: rows of an additive mask that hide every key, where HF's eager
    softmax of equal scores averages the values (a boolean mask's such rows give 0, as
    mmcore's padded rows)."""
    if mask.dim() != 4 or mask.shape[-2] != Sq or mask.shape[-1] < Sk:
        return None
    m = mask[..., :Sk]
    if m.dtype == torch.bool:
        allowed = m
    elif m.is_floating_point():
        allowed = m == 0
        if not bool((allowed | (m <= torch.finfo(m.dtype).min)).all()):
            return None
    else:
        return None
    if allowed.shape[1] > 1 and not bool((allowed == allowed[:, :1]).all()):
        return None
    allowed = allowed[:, 0]
    average = None
    if m.dtype != torch.bool:
        average = ~allowed.any(-1)
        if not bool(average.any()):
            average = None
    return allowed, average


def factor_dense(mask, B, Sq, Sk):
    """A dense 4-D mask -> :class:`Factored`, or None when it is not exactly
    ``lo <= j < hi & key_mask[j]`` per row (plus rows that see every key, and rows of an
    additive mask that hide every key)."""
    got = allowed_of(mask, Sq, Sk)
    if got is None or got[0].shape[0] not in (1, B):
        return None
    allowed, average = got
    dev = allowed.device
    j = torch.arange(Sk, device=dev)
    anyk = allowed.any(-1)  # (B', Sq)
    lo = torch.where(anyk, allowed.to(torch.uint8).argmax(-1), 0)  # first allowed key
    hi = torch.where(anyk, Sk - allowed.flip(-1).to(torch.uint8).argmax(-1), 0)
    inside = (j[None, None] >= lo[..., None]) & (j[None, None] < hi[..., None])
    km = ~(inside & ~allowed).any(1)  # (B', Sk): hidden from every row that covers it
    wrong = ((inside & km[:, None]) != allowed).any(-1)  # (B', Sq)
    full = allowed.all(-1)
    if not bool((~wrong | full).all()):
        return None
    lo, hi = lo.to(torch.int32), hi.to(torch.int32)
    second = bool(wrong.any())
    if bool(km.all()):
        km = None
    if second:
        lo = torch.where(full, torch.zeros_like(lo), lo)
        hi = torch.where(full, torch.zeros_like(hi), hi)

    def bq(t):
        return None if t is None else t.expand(B, Sq).contiguous()
    return Factored(bq(lo), bq(hi), None if km is None else km.expand(B, Sk).contiguous(),
                    bq(full) if second else None, bq(average))


def dense_of(lo, hi, key_mask, Sk, full=None):
    """Bounds (B, Sq) + key_mask (B, Sk) or None [+ full rows (B, Sq)] -> (B, 1, Sq, Sk)
    bool."""
    j = torch.arange(Sk, device=lo.device)[None, None]
    m = (j >= lo[..., None].long()) & (j < hi[..., None].long())
    if key_mask is not None:
        m = m & key_mask[:, None, :]
    if full is not None:
        m = m | full[..., None]
    return m[:, None]


# ------------------------------------------------------------------ the hooks hf_interface calls
def mask_for(mask_function, batch_size, q_length, kv_length, q_offset, kv_offset,
             attention_mask, device):
    """``mmcore_mask`` for patterns ``hf_masks.classify`` does not know (eager only): the 2-D
    padding mask (B, kv_offset + kv_length) tagged with a :class:`BoundsSpec`, or None."""
    got = plan_of(mask_function, batch_size, q_length, kv_length, q_offset, kv_offset,
                  attention_mask, device)
    if got is None:
        return None
    pm = varlen.key_padding(attention_mask, batch_size, kv_offset + kv_length, device)
    pm._mmcore_spec = BoundsSpec(got.lo, got.hi, q_offset, kv_offset, got.groups)
    return pm


def spec_of(attention_mask):
    """The BoundsSpec of a tagged 2-D mask, else None.  Tags are made eagerly, but a compiled
    forward can receive one (``generate`` builds the masks before a compiled decoding step):
    the attention then runs on the bounds inside the graph (``attend_tagged`` is
    trace-safe)."""
    spec = getattr(attention_mask, "_mmcore_spec", None)
    return spec if isinstance(spec, BoundsSpec) else None


def handed_back(attention_mask, batch_size, q_length, kv_length, q_offset, kv_offset):
    """A mask :func:`mask_for` made, handed back to the mask interface as the "2-D padding
    mask" (a model whose inner text model builds its masks again, e.g. PaliGemma's Gemma):
    it is already prepared, as HF treats a 4-D mask; -> it, or None when not ours."""
    if torch.compiler.is_compiling():
        return None  # comparing the offsets would guard on them (a recompile per token)
    spec = spec_of(attention_mask)
    if spec is None:
        return None
    if isinstance(q_offset, torch.Tensor):
        q_offset = int(q_offset)
    if isinstance(kv_offset, torch.Tensor):
        kv_offset = int(kv_offset)
    if tuple(spec.lo.shape) != (batch_size, q_length) or q_offset != spec.q_offset or \
            kv_offset != spec.kv_offset or attention_mask.shape[-1] != kv_offset + kv_length:
        raise ValueError(
            f"mmcore attention: a mask prepared for queries {tuple(spec.lo.shape)} at offset "
            f"{spec.q_offset} / keys at offset {spec.kv_offset} was handed back for batch "
            f"{batch_size}, {q_length} queries at offset {q_offset}, {kv_length} keys at "
            f"offset {kv_offset}; pass the model's original 2-D attention_mask instead")
    return attention_mask


def _backend(module):
    return getattr(module, "_mmcore_backend", None) or "auto"


def _run(q, k, v, lo, hi, key_mask, full, scale, softcap, backend, average=None,
         dropout_p=0.0):
    """window_attention in bounds mode; rows in `full` (B, Sq) from a second call over every
    key, rows in `average` (B, Sq) the mean of the values.  q (B, Hq, Sq, D), k/v
    (B, Hkv, Sk, D) -> (B, Hq, Sq, D).  dropout_p: the op's attention dropout (training)."""
    from ..ops import window_attention
    out = window_attention(q, k, v, key_bounds=(lo, hi), key_mask=key_mask, scale=scale,
                           softcap=softcap, dropout_p=dropout_p, backend=backend)
    if full is not None:
        Sk = k.shape[2]
        hi2 = torch.where(full, torch.full_like(hi, Sk), torch.zeros_like(hi))
        out2 = window_attention(q, k, v, key_bounds=(torch.zeros_like(lo), hi2), scale=scale,
                                softcap=softcap, dropout_p=dropout_p, backend=backend)
        out = torch.where(full[:, None, :, None], out2, out)
    if average is not None and dropout_p:  # uniform weights (q = 0) over every key, dropped
        Sk = k.shape[2]
        hi2 = torch.where(average, torch.full_like(hi, Sk), torch.zeros_like(hi))
        out3 = window_attention(torch.zeros_like(q), k, v, key_bounds=(torch.zeros_like(lo),
                                hi2), scale=scale, dropout_p=dropout_p, backend=backend)
        out = torch.where(average[:, None, :, None], out3, out)
    elif average is not None:
        mean = v.float().mean(2, keepdim=True).to(out.dtype)  # (B, Hkv, 1, D)
        mean = mean.repeat_interleave(q.shape[1] // v.shape[1], 1)
        out = torch.where(average[:, None, :, None], mean, out)
    return out


def attend_tagged(module, query, key, value, attention_mask, spec, scaling, softcap, reason,
                  dense, dropout_p=0.0):
    """The attention of a layer whose mask ``mask_for`` tagged: -> (out (B, Hq, Sq, D),
    reason or None).  `dense(mask)` computes the eager-equivalent dense path (for `reason`).
    A plan with scattered groups runs 1 + len(spec.groups) op calls (``hf_scattered``)."""
    from . import hf_scattered
    B, _, Sq, _ = query.shape
    Sk = key.shape[2]
    lo, hi = spec.lo, spec.hi
    if lo.shape != (B, Sq) or attention_mask.dim() != 2 or attention_mask.shape[0] != B or \
            attention_mask.shape[1] < Sk or \
            any(tuple(g.perm.shape) != (B, Sk) for g in spec.groups):
        raise ValueError(f"mmcore attention: the bounds of the mask ({tuple(lo.shape)}) do not "
                         f"fit the attention call (B={B}, Sq={Sq}, Sk={Sk})")
    km = attention_mask[:, -Sk:].bool()
    lo, hi = lo.to(query.device), hi.to(query.device)
    groups = hf_scattered.to_device(spec.groups, query.device)
    if reason is not None:
        allowed = hf_scattered.claim(lo, hi, groups, Sk) & km[:, None, :]
        return dense(allowed[:, None]), reason
    if not torch.compiler.is_compiling() and bool(km.all()):
        km = None
    backend = _backend(module)
    out = _run(query, key, value, lo, hi, km, None, float(scaling), softcap, backend,
               dropout_p=dropout_p)
    return hf_scattered.run(out, query, key, value, groups, km, float(scaling), softcap,
                            backend, dropout_p=dropout_p), None


def attend_dense(module, query, key, value, mask, scaling, softcap=None, dropout_p=0.0):
    """A dense 4-D mask factored into bounds (eager only): -> out (B, Hq, Sq, D), or None
    when the mask is not of that form (the caller takes the dense path)."""
    if torch.compiler.is_compiling():
        return None
    B, _, Sq, _ = query.shape
    Sk = key.shape[2]
    # the layers of one forward share the mask tensor: factor it once (keyed by its version)
    key_ = (mask._version, B, Sq, Sk, str(query.device))
    cached = getattr(mask, "_mmcore_factored", None)
    if cached is not None and cached[0] == key_:
        f = cached[1]
    else:
        f = factor_dense(mask.to(query.device), B, Sq, Sk)
        try:
            mask._mmcore_factored = (key_, f)
        except (AttributeError, RuntimeError):  # pragma: no cover - tensor subclasses
            pass
    if f is None:
        return None
    return _run(query, key, value, f.lo, f.hi, f.key_mask, f.full, float(scaling), softcap,
                _backend(module), f.average, dropout_p)
