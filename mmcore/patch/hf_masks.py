"""What a Hugging Face mask function stands for: the patterns mmcore's window attention computes
exactly, recognised two ways.

* Eagerly (``classify``): the mask function's closures are read (HF builds ``and_masks`` of
  ``causal_mask_function`` / ``sliding_window_overlay(w)`` / ...), the window value is taken from
  the closure, packed sequences (``packed_sequence_mask_function``) give their per-token
  segment ids, and the result is checked on a few probe rows.
* Under ``torch.compile`` (``classify_traced``): closures cannot be read there (dynamo does not
  trace ``__closure__``), so only what is trace-safe is used: the code object's name, the
  ``local_size`` HF passes for sliding masks, the config, and which skip flags were passed.
  The probe then runs as a tensor check with ``torch._assert_async``: a pattern mistaken for
  another raises at run time instead of giving a wrong answer.  Ambiguous patterns (an
  ``and_mask`` without a padding mask may hide packed sequences; chunked attention) are not
  claimed: HF's dense mask serves them.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class MaskSpec(NamedTuple):
    """What the HF mask creator asked for, in absolute positions.

    kind: "causal" or "bidirectional"; window: HF's sliding window (int) or None;
    q_offset / kv_offset: absolute position of query row 0 / key column 0 (an int, or a 0-dim
    tensor from a static cache); segments: (B, S) packed-sequence ids or None."""
    kind: str
    window: Optional[int]
    q_offset: object
    kv_offset: object
    segments: Optional[torch.Tensor] = None


# ------------------------------------------------------------------ eager: read the closures
def _closure_vars(fn):
    names = getattr(getattr(fn, "__code__", None), "co_freevars", ())
    cells = getattr(fn, "__closure__", None) or ()
    out = {}
    for n, c in zip(names, cells):
        try:
            out[n] = c.cell_contents
        except ValueError:
            pass
    return out


def _qualname(fn):
    return getattr(getattr(fn, "__code__", None), "co_qualname", None) or \
        getattr(fn, "__qualname__", "")


def _leaves(fn, depth=0):
    """Flatten HF's ``and_masks`` closures into their leaf mask functions (None if unknown)."""
    if depth > 8:
        return None
    if _qualname(fn).startswith("and_masks."):
        subs = _closure_vars(fn).get("mask_functions")
        if not isinstance(subs, (tuple, list)):
            return None
        out = []
        for s in subs:
            leaves = _leaves(s, depth + 1)
            if leaves is None:
                return None
            out.extend(leaves)
        return out
    return [fn]


def _leaf_kind(f):
    """-> (kind, window) of one leaf mask function, or None."""
    qn = _qualname(f)
    if qn == "causal_mask_function":
        return "causal", None
    if qn == "bidirectional_mask_function":
        return "bidirectional", None
    for prefix, kind in (("sliding_window_overlay.", "causal"),
                         ("sliding_window_bidirectional_overlay.", "bidirectional")):
        if qn.startswith(prefix):
            w = _closure_vars(f).get("sliding_window")
            if isinstance(w, int) and not isinstance(w, bool) and w >= 0:
                return kind, w
    return None


def _combine(leaves):
    """Leaves of an and-mask -> (kind, window) when they are one kind and at most one window."""
    kind, window = None, None
    for f in leaves:
        lk = _leaf_kind(f)
        if lk is None or (kind is not None and lk[0] != kind):
            return None
        kind = lk[0]
        if lk[1] is not None:
            if window is not None:
                return None
            window = lk[1]
    return None if kind is None else (kind, window)


def _packed(leaves):
    """HF's packed-sequence mask -> (kind, window, ids) or None.  Leaves: one
    ``packed_sequence_mask_function(ids)`` and either the pattern's own leaves (transformers
    <= 5.17: on token indices) or one ``remap_positions_for_packed_sequence(inner,
    position_ids)`` (later: on positions, which within a segment are the indices shifted)."""
    packs = [f for f in leaves if _qualname(f).startswith("packed_sequence_mask_function.")]
    if len(packs) != 1:
        return None
    rest = [f for f in leaves if f is not packs[0]]
    if any(_qualname(f).startswith("remap_positions_for_packed_sequence.") for f in rest):
        if len(rest) != 1:
            return None
        rest = _leaves(_closure_vars(rest[0]).get("mask_function"))
    ids = _closure_vars(packs[0]).get("packed_sequence_mask")
    cls = _combine(rest) if rest else None
    if cls is None or cls[0] != "causal" or not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        return None
    return cls[0], cls[1], ids


def classify(mask_function, q_length, kv_length, q_offset, kv_offset):
    """Eager: -> (kind, window, segments) for the patterns computed exactly, else None."""
    leaves = _leaves(mask_function)
    if not leaves:
        return None
    packed = _packed(leaves)
    if packed is not None:
        ids = packed[2]
        if isinstance(q_offset, torch.Tensor) or isinstance(kv_offset, torch.Tensor) or \
                q_offset != 0 or kv_offset != 0 or not (q_length == kv_length == ids.shape[1]):
            return None
        return packed
    cls = _combine(leaves)
    if cls is None or not bool(_probe(mask_function, *cls).all()):
        return None
    return cls[0], cls[1], None


# ------------------------------------------------------------------ traced: trace-safe only
def classify_traced(mask_function, local_size, use_vmap, attention_mask, config, kwargs):
    """Under torch.compile: -> (kind, window, None) or None, from what dynamo can trace; the
    probe is enforced with torch._assert_async."""
    if use_vmap:
        return None
    from transformers.masking_utils import bidirectional_mask_function, causal_mask_function
    if mask_function is causal_mask_function:
        return "causal", None, None
    if mask_function is bidirectional_mask_function:
        return "bidirectional", None, None
    qn = _qualname(mask_function)
    if not (qn.startswith("and_masks.") or qn == "and_mask"):
        return None
    chunk = getattr(config, "attention_chunk_size", None)
    if local_size is None or attention_mask is None or chunk is not None \
            or not isinstance(local_size, int) or local_size < 0:
        return None  # maybe packed sequences or chunked attention: HF's dense mask
    kind = "bidirectional" if "allow_is_bidirectional_skip" in kwargs else "causal"
    # the probe indices depend on a run-time zero: a probe of constants only is folded by
    # inductor into a reduction it fails to generate code for (torch 2.13)
    zero = attention_mask.long().sum().clamp(max=0)  # 0, unknown to the compiler
    wrong = (~_probe(mask_function, kind, local_size, zero)).sum()
    torch._assert_async(wrong == 0, f"mmcore: the attention mask is not the {kind} sliding "
                                    f"window {local_size} that mmcore recognised under "
                                    f"torch.compile")
    return kind, local_size, None


# ------------------------------------------------------------------ the patterns themselves
def expected(kind, window, q, kv):
    """Bool mask of HF's pattern at absolute positions q (column) and kv (row) tensors."""
    if kind == "causal":
        m = kv <= q
        if window is not None:
            m = m & (kv > q - window)
    else:
        m = torch.ones_like(kv <= q)
        if window is not None:
            m = m & ((q - kv).abs() <= window)
    return m


def _probe(mask_function, kind, window, zero=0):
    """Bool tensor: the mask function equals the pattern on rows around the window edges."""
    w = 4 if window is None else window
    n = 2 * w + 6
    q = torch.tensor([0, 1, w - 1, w, w + 1, 2 * w + 3]).clamp(min=0)[:, None] + zero
    kv = torch.arange(n)[None, :] + zero
    b = torch.zeros(1, 1, dtype=torch.long)
    h = torch.zeros(1, 1, dtype=torch.long)
    try:
        got = torch.as_tensor(mask_function(b, h, q, kv)).expand(q.shape[0], n)
    except Exception:  # noqa: BLE001 - anything odd (eager only): not ours
        return torch.zeros((), dtype=torch.bool)
    return got.bool() == expected(kind, window, q, kv)
