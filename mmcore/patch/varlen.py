"""Padding layouts and packed sequences as ``window_attention`` calls (gather -> op -> scatter).

``window_attention`` takes right padding (``seqlens_q`` / ``seqlens_k``, bottom-right aligned per
sample).  Any other layout of a 2-D key padding mask is brought to that form by a per-sample
stable compaction: the valid keys (and queries) move to the front in their order, the op runs
with the valid counts as seqlens, and the outputs go back to their rows (rows of padding
tokens get 0).  The compaction keeps the order of the tokens, so

* causal and plain bidirectional attention are exact for any mask (left, right, holey);
* a sliding window or a global prefix counts positions, so it is exact when the valid tokens
  of each sample form one contiguous run (left or right padding), and for a global prefix when
  that run starts at 0 -- ``compact_ok`` says whether that holds.

Every step is a tensor op (argsort, gather) without data-dependent Python control flow, so it
traces under ``torch.compile(fullgraph=True)``; the caller decides eagerly whether a cheaper
call (no gather) or the dense path is needed.

Packed sequences (``position_ids`` restarting inside a row, HF's packed-sequence mask) become a
batch of segments: each segment is gathered into a row of its own (padded to the longest), the
op runs causal with the segment lengths as seqlens, and the outputs are scattered back.  That
layout depends on the data (number and length of segments), so it is eager-only.
"""
from __future__ import annotations

import torch


def key_padding(attention_mask, batch_size, need, device):
    """HF's 2-D padding mask (or None: no padding) as a fresh bool (B, need) tensor: cut or
    padded with False to `need` key columns (a tag set on it never lands on the caller's)."""
    if attention_mask is None:
        return torch.ones(batch_size, need, dtype=torch.bool, device=device)
    pm = attention_mask.to(device=device, dtype=torch.bool)
    if pm.shape[-1] < need:
        pm = torch.nn.functional.pad(pm, (0, need - pm.shape[-1]))
    pm = pm[:, :need].contiguous()
    return pm.clone() if pm is attention_mask else pm


def _gather_rows(x, idx):
    """x (B, H, S, D), idx (B, S') -> (B, H, S', D) with row j of sample b = x[b, :, idx[b, j]]."""
    B, H, _, D = x.shape
    return torch.gather(x, 2, idx[:, None, :, None].expand(B, H, idx.shape[1], D))


def masks(pm, Sq, Sk, d, causal):
    """Key and query validity: pm (B, Sk) bool key mask; query i is the token of key column
    d + i (d an int or a 0-dim tensor).  Causal layers never see keys after the last query."""
    dev = pm.device
    qcol = torch.arange(Sq, device=dev) + d  # (Sq,)
    inside = (qcol >= 0) & (qcol < Sk)
    qvalid = pm.gather(1, qcol.clamp(0, Sk - 1)[None].expand(pm.shape[0], Sq)) & inside[None]
    kvalid = pm
    if causal:
        kvalid = pm & (torch.arange(Sk, device=dev)[None] <= qcol[-1])
    return qvalid, kvalid


def compact_ok(kvalid, need_start_zero):
    """0-dim bool tensor: every sample's valid keys form one contiguous run (starting at 0 when
    need_start_zero), so compaction keeps distances (windows) and the first tokens (globals)."""
    Sk = kvalid.shape[1]
    pos = torch.arange(Sk, device=kvalid.device)[None]
    n = kvalid.sum(1)
    first = torch.where(kvalid, pos, Sk).amin(1)
    last = torch.where(kvalid, pos, -1).amax(1)
    ok = (n == 0) | (last - first + 1 == n)
    if need_start_zero:
        ok = ok & ((n == 0) | (first == 0))
    return ok.all()


def is_prefix(valid):
    """0-dim bool tensor: each row's valid entries are a prefix (right padding)."""
    n = valid.sum(1, keepdim=True)
    return (valid == (torch.arange(valid.shape[1], device=valid.device)[None] < n)).all()


def attend_compacted(op, q, k, v, qvalid, kvalid, compact_q):
    """op(q, k, v, seqlens_q, seqlens_k) on the compacted layout, outputs back in place.

    compact_q=False (plain bidirectional attention): every query row is computed against the
    valid keys, none is zeroed."""
    korder = torch.argsort((~kvalid).to(torch.uint8), dim=1, stable=True)
    Lk = kvalid.sum(1)
    k, v = _gather_rows(k, korder), _gather_rows(v, korder)
    if not compact_q:
        return op(q, k, v, None, Lk)
    qorder = torch.argsort((~qvalid).to(torch.uint8), dim=1, stable=True)
    out = op(_gather_rows(q, qorder), k, v, qvalid.sum(1), Lk)  # rows >= Lq are 0
    return _gather_rows(out, torch.argsort(qorder, dim=1))


def attend_segments(op, q, k, v, segments):
    """Packed sequences: segments (B, S) non-decreasing ids per row (0, 0, 1, 1, 1, 2, ...);
    each segment is attended on its own.  Eager only (the layout depends on the data)."""
    B, Hq, S, D = q.shape
    n_b = segments[:, -1] + 1  # segments per row
    gid = (segments + (torch.cumsum(n_b, 0) - n_b)[:, None]).reshape(-1)  # (B*S,)
    N = int(n_b.sum())
    lengths = torch.bincount(gid, minlength=N)
    L = int(lengths.max())
    starts = torch.cumsum(lengths, 0) - lengths
    idx = (starts[:, None] + torch.arange(L, device=q.device)[None]).clamp(max=B * S - 1)

    def split(x):  # (B, H, S, D) -> (N, H, L, D)
        H = x.shape[1]
        flat = x.transpose(0, 1).reshape(H, B * S, D)
        return flat[:, idx.reshape(-1)].reshape(H, N, L, D).transpose(0, 1)

    out = op(split(q), split(k), split(v), lengths, lengths)  # (N, Hq, L, D)
    j = torch.arange(B * S, device=q.device) - starts[gid]
    flat = out.transpose(0, 1).reshape(Hq, N * L, D)[:, gid * L + j]  # (Hq, B*S, D)
    return flat.reshape(Hq, B, S, D).transpose(0, 1)
