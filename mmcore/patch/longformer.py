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
op's ``dropout_p`` in every call above.  output_attentions=True runs HF's own forward for that
call.
"""
from __future__ import annotations

import math

import torch

from ..ops import window_attention
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
        if output_attentions:
            why = "output_attentions=True needs the attention weights"
        elif kwargs:
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
            out = _any_layout(mod, hidden_states, attention_mask, backend, drop)
        else:
            out = _prefix_layout(mod, hidden_states, lay, backend, drop)
        hfi.count(mod)
        B, S, E = hidden_states.shape
        return (out.transpose(1, 2).reshape(B, S, E),)
    return forward


def _prefix_layout(mod, hidden_states, lay, backend, drop=0.0):
    """Right padding, global tokens a common prefix [0, G): -> out (B, H, S, D)."""
    L, G = lay
    B, S, E = hidden_states.shape
    H, D = mod.num_heads, mod.head_dim
    w = mod.one_sided_attn_window_size
    scale = 1.0 / math.sqrt(D)
    q = _heads(mod.query(hidden_states), B, S, H, D)
    k = _heads(mod.key(hidden_states), B, S, H, D)
    v = _heads(mod.value(hidden_states), B, S, H, D)
    seq = None if bool((L == S).all()) else L
    out = window_attention(q, k, v, window=(w, w), global_tokens=G, seqlens_q=seq,
                           seqlens_k=seq, scale=scale, dropout_p=drop, backend=backend)
    if G > 0:
        hg = hidden_states[:, :G]
        qg = _heads(mod.query_global(hg), B, G, H, D)
        kg = _heads(mod.key_global(hidden_states), B, S, H, D)
        vg = _heads(mod.value_global(hidden_states), B, S, H, D)
        og = window_attention(qg, kg, vg, seqlens_q=None if seq is None else
                              torch.full_like(L, G), seqlens_k=seq, scale=scale,
                              dropout_p=drop, backend=backend)
        out = torch.cat([og, out[:, :, G:]], dim=2)
    return out


def _gather(x, idx):
    """x (B, H, S, D), idx (B, n) -> (B, H, n, D)."""
    B, H, _, D = x.shape
    return torch.gather(x, 2, idx[:, None, :, None].expand(B, H, idx.shape[1], D))


def _any_layout(mod, hidden_states, attention_mask, backend, drop=0.0):
    """Global tokens anywhere, any padding (key_mask): -> out (B, H, S, D)."""
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
    if G == 0:
        out = window_attention(q, k, v, window=(w, w), key_mask=local, scale=scale,
                               dropout_p=drop, backend=backend)
    else:
        order = torch.argsort((~glob).to(torch.uint8), dim=1, stable=True)[:, :G]  # (B, G)
        slot_ok = torch.arange(G, device=glob.device)[None] < n_g[:, None]  # (B, G)
        k2 = torch.cat([_gather(k, order), k], dim=2)
        v2 = torch.cat([_gather(v, order), v], dim=2)
        out = window_attention(q, k2, v2, window=(w, w), global_tokens=G,
                               key_mask=torch.cat([slot_ok, local], dim=1), scale=scale,
                               dropout_p=drop, backend=backend)
        hg = torch.gather(hidden_states, 1, order[:, :, None].expand(B, G, E))
        qg = _heads(mod.query_global(hg), B, G, H, D)
        kg = _heads(mod.key_global(hidden_states), B, S, H, D)
        vg = _heads(mod.value_global(hidden_states), B, S, H, D)
        og = window_attention(qg, kg, vg, key_mask=None if bool(valid.all()) else valid,
                              scale=scale, dropout_p=drop, backend=backend)
        slot = (glob.long().cumsum(1) - 1).clamp(min=0)  # (B, S): row -> its global slot
        out = torch.where(glob[:, None, :, None], _gather(og, slot), out)
    return torch.where(valid[:, None, :, None], out, torch.zeros((), dtype=out.dtype,
                                                                 device=out.device))


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
