"""Longformer self-attention on mmcore.ops.window_attention (exact mapping).

HF's LongformerSelfAttention: every non-global query i attends to the keys j with
``|i - j| <= attention_window / 2`` that are neither padding nor global, plus all global keys
(regular key/value projections); global queries are recomputed with the separate
``query_global / key_global / value_global`` projections against every non-padding key; padding
query rows are 0.  With the global tokens a common prefix [0, G) and right padding, that is
exactly

    out = window_attention(q, k, v, window=(w, w), global_tokens=G, seqlens=L)
    out[:, :, :G] = window_attention(q_global[:, :, :G], k_global, v_global, seqlens_k=L)

Any other layout (global tokens not a common prefix, padding not at the end, attention
dropout while training, output_attentions=True) runs HF's own forward for that call.
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
        elif mod.training and mod.dropout > 0:
            why = "attention dropout while training"
        elif kwargs:
            why = "extra forward arguments"
        lay = None if why else _layout(attention_mask)
        if why is None and lay is None:
            why = "Longformer mask layout not a right-padded batch with a common global prefix"
        if why is not None:
            hfi.count(mod, why)
            return orig_forward(hidden_states, attention_mask=attention_mask,
                                is_index_masked=is_index_masked,
                                is_index_global_attn=is_index_global_attn,
                                is_global_attn=is_global_attn,
                                output_attentions=output_attentions, **kwargs)
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
                               seqlens_k=seq, scale=scale, backend=backend)
        if G > 0:
            hg = hidden_states[:, :G]
            qg = _heads(mod.query_global(hg), B, G, H, D)
            kg = _heads(mod.key_global(hidden_states), B, S, H, D)
            vg = _heads(mod.value_global(hidden_states), B, S, H, D)
            og = window_attention(qg, kg, vg, seqlens_q=None if seq is None else
                                  torch.full_like(L, G), seqlens_k=seq, scale=scale,
                                  backend=backend)
            out = torch.cat([og, out[:, :, G:]], dim=2)
        hfi.count(mod)
        return (out.transpose(1, 2).reshape(B, S, E),)
    return forward


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
