"""Longformer self-attention on mmcore.ops.window_attention (exact mapping).

HF's LongformerSelfAttention: every non-global query i attends to the keys j with
``|i - j| <= attention_window / 2`` that are neither padding nor global, plus all global keys
(regular key/value projections); global queries are recomputed with the separate
``query_global / key_global / value_global`` projections against every non-padding key; padding
query rows are 0.

* Global tokens a common prefix [0, G) and right padding (the layout every backend serves):

      out = window_attention(q, k, v, window=(w, w), global_tokens=G, seqlens=L)
      out[:, :, :G] = window_attention(q_global[:, :, :G], k_global, v_global, seqlens_k=L)

* Any other layout (global tokens anywhere, left / holey padding): the G_max global keys of
  each sample are gathered in front of the keys, so one call computes the local window and
  the global keys in one softmax (no merge of partial results, exact gradients):

      k' = [k[globals_b] (G_max, padded), k]        key_mask' = [slot < G_b, valid & ~global]
      out = window_attention(q, k', v', window=(w, w), global_tokens=G_max, key_mask=key_mask')

  (queries sit at key columns G_max + i: bottom-right alignment, so no query is global and
  the window is the same key indices); global rows: ``window_attention(q_global[globals_b],
  k_global, v_global, key_mask=valid)`` scattered back; padding rows 0.

Attention dropout while training (HF drops the local and the global rows' weights) is the
op's ``dropout_p`` in every call above.

output_attentions=True is served by the same calls with ``return_lse=True``: HF's weights are
not an (S, S) matrix but ``attn_probs`` (B, S, H, G_max + 2w + 1) -- the G_max global keys'
weights (slot order = token order; empty slots 0), then the band key i + d, d = -w..w (0
outside the sequence, on padding and on global keys) -- with the rows of global and padding
tokens 0, and ``global_attn_probs`` (B, H, G_max, S) (padding keys 0; an empty slot is HF's
softmax of a row of finfo.min: 1 / S in fp32 / fp16 / bf16).  Both are recomputed as
``exp(scale · q·k − lse)`` on the band and the global columns only (memory
O(B·H·S·(w + G_max)), no (S, S) tensor); under dropout they are the dropped weights, from the
op's own mask (the reference hash of mmcore.ops.reference.dropout, with the seed the call
draws).  They are differentiable (the lse's gradient is recomputed from the same scores).
"""
from __future__ import annotations

import math

import torch

from ..ops import window_attention
from ..ops.reference import dropout as _dropout
from . import hf_interface as hfi

_ATTR = "_mmcore_longformer"


def _layout(attention_mask):
    """(B, S) Longformer mask (-10000 pad / 0 local / +10000 global) -> (L, G) or None."""
    if attention_mask is None or attention_mask.dim() != 2:
        return None
    B, S = attention_mask.shape
    valid = attention_mask >= 0
    glob = attention_mask > 0
    L = valid.sum(1)
    G = glob.sum(1)
    pos = torch.arange(S, device=attention_mask.device)[None]
    if not bool((valid == (pos < L[:, None])).all()):
        return None
    if not bool((G == G[0]).all()):
        return None
    g = int(G[0])
    if not bool((glob == (pos < g)).all()):
        return None
    if bool((L < g).any()):
        return None
    return L, g


def _heads(x, B, S, H, D):
    return x.view(B, S, H, D).transpose(1, 2)


def make_forward(mod, orig_forward, backend):
    def forward(hidden_states, attention_mask=None, is_index_masked=None,
                is_index_global_attn=None, is_global_attn=None, output_attentions=False,
                **kwargs):
        why = None
        if kwargs:
            why = "extra forward arguments"
        if why is None and (attention_mask is None or attention_mask.dim() != 2 or
                            attention_mask.shape != hidden_states.shape[:2]):
            why = "Longformer attention mask not a (batch, seq) tensor"
        if why is None and mod.training and mod.dropout > 0:
            w = mod.one_sided_attn_window_size
            x = hidden_states  # (B, S, E): the op sees (B, H, S, head_dim) heads of it
            why = hfi.dropout_dense_reason(
                backend, 2 * w + 1, x.shape[1],
                x.new_empty(0, mod.num_heads, x.shape[1], mod.head_dim))
            if why is None and output_attentions and hfi._compiling():
                why = ("output_attentions=True with attention dropout under torch.compile (the "
                       "op's dropout seed is drawn inside the graph)")
        if why is not None:
            hfi.count(mod, why)
            return orig_forward(hidden_states, attention_mask=attention_mask,
                                is_index_masked=is_index_masked,
                                is_index_global_attn=is_index_global_attn,
                                is_global_attn=is_global_attn,
                                output_attentions=output_attentions, **kwargs)
        lay = _layout(attention_mask)
        drop = float(mod.dropout) if (mod.training and mod.dropout > 0) else 0.0
        if lay is None:
            res = _any_layout(mod, hidden_states, attention_mask, backend, drop,
                              output_attentions)
        else:
            res = _prefix_layout(mod, hidden_states, lay, backend, drop, output_attentions)
        hfi.count(mod)
        B, S, E = hidden_states.shape
        out = res[0]
        outputs = (out.transpose(1, 2).reshape(B, S, E),)
        if output_attentions:
            outputs += tuple(res[1:])
        return outputs
    return forward


# ------------------------------------------------------------------ attention weights
def _peek_seed(drop):
    """The dropout seed the next op call will draw (torch's default generator left as it
    was), or None without dropout."""
    if not drop:
        return None
    state = torch.get_rng_state()
    seed = _dropout.draw_seed()
    torch.set_rng_state(state)
    return seed


def _band_scores(q, k, w, cdt):
    """q, k (B, H, S, D) -> (B, H, S, 2w + 1) in cdt: [..., i, w + d] = q_i · k_{i+d} (0 where
    i + d is outside [0, S)).  Blocks of c query rows against their c + 2w keys: memory
    O(B·H·S·(c + 2w)) with c = max(w, 16), never (S, S)."""
    B, H, S, D = q.shape
    c = max(w, 16)
    nb = -(-S // c)
    qp = torch.nn.functional.pad(q.to(cdt), (0, 0, 0, nb * c - S)).view(B, H, nb, c, D)
    kp = torch.nn.functional.pad(k.to(cdt), (0, 0, w, nb * c - S + w))  # (B, H, nb·c + 2w, D)
    kb = kp.unfold(2, c + 2 * w, c).transpose(-1, -2)  # (B, H, nb, c + 2w, D)
    m = torch.matmul(qp, kb.transpose(-1, -2))  # (B, H, nb, c, c + 2w)
    ar = torch.arange(c, device=q.device)
    idx = (ar[:, None] + torch.arange(2 * w + 1, device=q.device)[None])  # (c, 2w + 1)
    band = m.gather(-1, idx.expand(B, H, nb, c, 2 * w + 1))
    return band.reshape(B, H, nb * c, 2 * w + 1)[:, :, :S]


def _probs(s, ok, lse, grad):
    """s (..., C) scaled scores, ok (..., C) bool, lse (...) of the op -> exp(s - lse) where
    ok, else 0 (and 0 in rows whose lse is not finite).  With grad, lse carries the gradient
    of the logsumexp of the allowed scores (its value stays the op's)."""
    lse = lse.to(s.dtype)
    if grad:
        l2 = torch.logsumexp(s.masked_fill(~ok, float("-inf")), dim=-1)
        l2 = torch.where(torch.isfinite(l2), l2, torch.zeros((), dtype=s.dtype, device=s.device))
        lse = lse.detach() + (l2 - l2.detach())
    ok = ok & torch.isfinite(lse)[..., None]
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    return torch.where(ok, torch.exp(torch.where(ok, s - lse[..., None], zero)), zero)


def _local_probs(q, k, kglob, lse, local, rows, w, scale, slot_ok, cols, drop, seed, dtype):
    """HF's ``attn_probs`` (B, S, H, G + 2w + 1) from the op's lse of the local rows.

    q, k (B, H, S, D); kglob (B, H, G, D) the global keys in slot order (None: G = 0); lse
    (B, H, S); local (B, S) bool keys in the band (valid, not global); rows (B, S) bool rows
    kept (valid, not global); slot_ok (B, G) bool; cols: (glob_cols (B, G) or None,
    band_offset int) the key indices of the op call (for the dropout mask)."""
    B, H, S, D = q.shape
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    band = _band_scores(q, k, w, cdt) * scale  # (B, H, S, 2w + 1)
    lp = torch.nn.functional.pad(local, (w, w), value=False)
    band_ok = lp.unfold(1, 2 * w + 1, 1)[:, None]  # (B, 1, S, 2w + 1)
    if kglob is not None:
        gs = torch.matmul(q.to(cdt), kglob.to(cdt).transpose(-1, -2)) * scale  # (B, H, S, G)
        s = torch.cat([gs, band], dim=-1)
        ok = torch.cat([slot_ok[:, None, None, :].expand(B, 1, S, slot_ok.shape[1]),
                        band_ok], dim=-1)
    else:
        s, ok = band, band_ok
    ok = ok & rows[:, None, :, None]
    p = _probs(s, ok.expand(s.shape), lse, grad)
    if seed is not None:
        glob_cols, off = cols
        i = torch.arange(S, device=q.device)
        bc = off + i[:, None] + torch.arange(-w, w + 1, device=q.device)[None]  # (S, 2w + 1)
        bc = bc.clamp(min=0)[None].expand(B, S, 2 * w + 1)
        kc = bc if glob_cols is None else torch.cat(
            [glob_cols[:, None, :].expand(B, S, glob_cols.shape[1]), bc], dim=-1)
        p = p * _keep(seed, B, H, i, kc, drop, p.dtype)
    return p.to(dtype).transpose(1, 2)  # (B, S, H, C), as HF's


def _keep(seed, B, H, rows, cols, drop, dtype):
    """The op's dropout scale (B, H, R, C): 1 / (1 - p) where element (b, h, rows[r],
    cols[b, r, c]) of the call was kept, else 0 (mmcore.ops.reference.dropout's hash, which
    the op's dropout uses)."""
    dev = rows.device
    ar = lambda n: torch.arange(n, dtype=torch.int64, device=dev)  # noqa: E731
    out = torch.empty(B, H, rows.numel(), cols.shape[-1], dtype=dtype, device=dev)
    for b in range(B):  # keep() broadcasts a (R, C) column index over the rows
        kb = _dropout.keep(seed, b, ar(H), rows.long(), cols[b].long(), drop)
        out[b] = kb.to(dtype) * (1.0 / (1.0 - drop))
    return out


def _global_probs(qg, kg, lse, valid, slot_ok, scale, drop, seed, dtype):
    """HF's ``global_attn_probs`` (B, H, G, S): qg (B, H, G, D) the global rows' queries in
    slot order, kg (B, H, S, D), lse (B, H, G) of their op call, valid (B, S) keys, slot_ok
    (B, G).  An empty slot is HF's softmax of a row of finfo(dtype).min (taken in float32)."""
    B, H, G, D = qg.shape
    S = kg.shape[2]
    cdt = torch.float64 if qg.dtype == torch.float64 else torch.float32
    grad = torch.is_grad_enabled() and (qg.requires_grad or kg.requires_grad)
    s = torch.matmul(qg.to(cdt), kg.to(cdt).transpose(-1, -2)) * scale  # (B, H, G, S)
    ok = (valid[:, None, None, :] & slot_ok[:, None, :, None]).expand(s.shape)
    p = _probs(s, ok, lse, grad)
    fill = torch.softmax(torch.full((S,), torch.finfo(dtype).min, dtype=dtype,
                                    device=qg.device), dim=-1, dtype=torch.float32).to(cdt)
    p = torch.where(slot_ok[:, None, :, None], p, fill)
    if seed is not None:
        cols = torch.arange(S, device=qg.device)[None, None].expand(B, G, S)
        p = p * _keep(seed, B, H, torch.arange(G, device=qg.device), cols, drop, p.dtype)
    return p.to(dtype)


def _prefix_layout(mod, hidden_states, lay, backend, drop=0.0, attn=False):
    """Right padding, global tokens a common prefix [0, G): -> (out (B, H, S, D),) [+ HF's
    attn_probs (B, S, H, G + 2w + 1) [+ global_attn_probs (B, H, G, S) when G > 0]]."""
    L, G = lay
    B, S, E = hidden_states.shape
    H, D = mod.num_heads, mod.head_dim
    w = mod.one_sided_attn_window_size
    scale = 1.0 / math.sqrt(D)
    q = _heads(mod.query(hidden_states), B, S, H, D)
    k = _heads(mod.key(hidden_states), B, S, H, D)
    v = _heads(mod.value(hidden_states), B, S, H, D)
    seq = None if bool((L == S).all()) else L
    seed = _peek_seed(drop) if attn else None
    res = window_attention(q, k, v, window=(w, w), global_tokens=G, seqlens_q=seq,
                           seqlens_k=seq, scale=scale, dropout_p=drop, return_lse=attn,
                           backend=backend)
    out, lse = res if attn else (res, None)
    extra = ()
    if attn:
        pos = torch.arange(S, device=hidden_states.device)[None]
        valid = pos < L[:, None]  # (B, S)
        local = valid & (pos >= G)
        slot_ok = torch.ones(B, G, dtype=torch.bool, device=hidden_states.device)
        gcols = torch.arange(G, device=hidden_states.device)[None].expand(B, G)
        extra = (_local_probs(q, k, k[:, :, :G] if G > 0 else None, lse, local, local, w,
                              scale, slot_ok, (gcols if G > 0 else None, 0), drop, seed,
                              hidden_states.dtype),)
    if G > 0:
        hg = hidden_states[:, :G]
        qg = _heads(mod.query_global(hg), B, G, H, D)
        kg = _heads(mod.key_global(hidden_states), B, S, H, D)
        vg = _heads(mod.value_global(hidden_states), B, S, H, D)
        seed = _peek_seed(drop) if attn else None
        res = window_attention(qg, kg, vg, seqlens_q=None if seq is None else
                               torch.full_like(L, G), seqlens_k=seq, scale=scale,
                               dropout_p=drop, return_lse=attn, backend=backend)
        og, lse_g = res if attn else (res, None)
        out = torch.cat([og, out[:, :, G:]], dim=2)
        if attn:
            extra += (_global_probs(qg, kg, lse_g, valid, slot_ok, scale, drop, seed,
                                    hidden_states.dtype),)
    return (out,) + extra


def _gather(x, idx):
    """x (B, H, S, D), idx (B, n) -> (B, H, n, D)."""
    B, H, _, D = x.shape
    return torch.gather(x, 2, idx[:, None, :, None].expand(B, H, idx.shape[1], D))


def _any_layout(mod, hidden_states, attention_mask, backend, drop=0.0, attn=False):
    """Global tokens anywhere, any padding (key_mask): -> (out (B, H, S, D),) [+ HF's
    attn_probs (B, S, H, G_max + 2w + 1) [+ global_attn_probs (B, H, G_max, S) when
    G_max > 0]]."""
    B, S, E = hidden_states.shape
    H, D = mod.num_heads, mod.head_dim
    w = mod.one_sided_attn_window_size
    scale = 1.0 / math.sqrt(D)
    valid = attention_mask >= 0  # (B, S): HF's is_index_masked is < 0, global > 0
    glob = attention_mask > 0
    q = _heads(mod.query(hidden_states), B, S, H, D)
    k = _heads(mod.key(hidden_states), B, S, H, D)
    v = _heads(mod.value(hidden_states), B, S, H, D)
    n_g = glob.sum(1)  # (B,)
    G = int(n_g.max())
    local = valid & ~glob
    zero = torch.zeros((), dtype=q.dtype, device=q.device)
    dt = hidden_states.dtype
    seed = _peek_seed(drop) if attn else None
    if G == 0:
        res = window_attention(q, k, v, window=(w, w), key_mask=local, scale=scale,
                               dropout_p=drop, return_lse=attn, backend=backend)
        out, lse = res if attn else (res, None)
        extra = ()
        if attn:
            extra = (_local_probs(q, k, None, lse, local, local, w, scale, None, (None, 0),
                                  drop, seed, dt),)
        return (torch.where(valid[:, None, :, None], out, zero),) + extra
    order = torch.argsort((~glob).to(torch.uint8), dim=1, stable=True)[:, :G]  # (B, G)
    slot_ok = torch.arange(G, device=glob.device)[None] < n_g[:, None]  # (B, G)
    kglob = _gather(k, order)
    k2 = torch.cat([kglob, k], dim=2)
    v2 = torch.cat([_gather(v, order), v], dim=2)
    res = window_attention(q, k2, v2, window=(w, w), global_tokens=G,
                           key_mask=torch.cat([slot_ok, local], dim=1), scale=scale,
                           dropout_p=drop, return_lse=attn, backend=backend)
    out, lse = res if attn else (res, None)
    extra = ()
    if attn:
        gcols = torch.arange(G, device=glob.device)[None].expand(B, G)
        extra = (_local_probs(q, k, kglob, lse, local, local, w, scale, slot_ok, (gcols, G),
                              drop, seed, dt),)
    hg = torch.gather(hidden_states, 1, order[:, :, None].expand(B, G, E))
    qg = _heads(mod.query_global(hg), B, G, H, D)
    kg = _heads(mod.key_global(hidden_states), B, S, H, D)
    vg = _heads(mod.value_global(hidden_states), B, S, H, D)
    seed = _peek_seed(drop) if attn else None
    res = window_attention(qg, kg, vg, key_mask=None if bool(valid.all()) else valid,
                           scale=scale, dropout_p=drop, return_lse=attn, backend=backend)
    og, lse_g = res if attn else (res, None)
    slot = (glob.long().cumsum(1) - 1).clamp(min=0)  # (B, S): row -> its global slot
    out = torch.where(glob[:, None, :, None], _gather(og, slot), out)
    if attn:
        extra += (_global_probs(qg, kg, lse_g, valid, slot_ok, scale, drop, seed, dt),)
    return (torch.where(valid[:, None, :, None], out, zero),) + extra


def wrap(mod, backend="auto"):
    """Route a LongformerSelfAttention's forward through mmcore; -> undo record."""
    had = "forward" in mod.__dict__
    prev = mod.__dict__.get("forward")
    mod.forward = make_forward(mod, mod.forward, backend)
    setattr(mod, _ATTR, True)
    return (mod, had, prev)


def unwrap(undo):
    mod, had, prev = undo
    if had:
        mod.forward = prev
    else:
        mod.__dict__.pop("forward", None)
    mod.__dict__.pop(_ATTR, None)
