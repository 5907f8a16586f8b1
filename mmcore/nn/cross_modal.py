"""Cross-modal attention modules: one direction (CrossModalAttention) and the bidirectional
co-attention fusion block (CoAttention) of the seed design.

Projections are plain ``nn.Linear`` modules (q_proj, k_proj, v_proj, o_proj), so LoRA / peft
wrapping works on them.  When all of them are plain nn.Linear, CoAttention runs the three input
projections of a stream as one GEMM (weights concatenated on the fly) and folds the residual
into the output GEMM (addmm); wrapped projections are called one by one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmcore.ops.co_attention import co_attention
from mmcore.ops.cross_attention import cross_attention


def _heads(x, n, d):
    """(B, S, n*d) -> (B, n, S, d), a free view."""
    B, S, _ = x.shape
    return x.view(B, S, n, d).transpose(1, 2)


def _merge(o):
    """(B, H, S, D) -> (B, S, H*D)."""
    B, H, S, D = o.shape
    return o.transpose(1, 2).reshape(B, S, H * D)


class CrossModalAttention(nn.Module):
    """Multi-head attention of `x` (queries) over `context` (keys/values): a drop-in for the
    cross-attention layer of a transformer (text over image tokens, or the reverse).

    out = o_proj(attention(q_proj(x), k_proj(context), v_proj(context)))

    Args:
        d_model: query / output width; n_heads: query heads (d_model % n_heads == 0).
        kv_dim: width of `context` (default d_model).  n_kv_heads: GQA kv heads (default
            n_heads).  bias: on all projections.  dropout: on the attention output, before
            o_proj (the kernels do not drop probabilities).  scale: default 1/sqrt(head_dim).
        backend: "auto" or a backend name for mmcore.cross_attention.
    forward(x (B, Sq, d_model), context (B, Sk, kv_dim), x_lengths=None, context_lengths=None,
    return_lse=False) -> out (B, Sq, d_model) [, lse (B, n_heads, Sq)].  Rows past x_lengths
    and all rows of a sample with context length 0 attend to nothing (attention 0, so the row
    is o_proj's bias).
    """

    def __init__(self, d_model, n_heads, kv_dim=None, n_kv_heads=None, bias=True, dropout=0.0,
                 scale=None, backend="auto", device=None, dtype=None):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be divisible by n_kv_heads ({n_kv_heads})")
        kv_dim = d_model if kv_dim is None else kv_dim
        kw = dict(device=device, dtype=dtype)
        self.d_model, self.n_heads, self.n_kv_heads = d_model, n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.scale, self.backend = scale, backend
        self.q_proj = nn.Linear(d_model, d_model, bias=bias, **kw)
        self.k_proj = nn.Linear(kv_dim, n_kv_heads * self.head_dim, bias=bias, **kw)
        self.v_proj = nn.Linear(kv_dim, n_kv_heads * self.head_dim, bias=bias, **kw)
        self.o_proj = nn.Linear(d_model, d_model, bias=bias, **kw)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, context, x_lengths=None, context_lengths=None, return_lse=False):
        D = self.head_dim
        q = _heads(self.q_proj(x), self.n_heads, D)  # (B, H, Sq, D)
        k = _heads(self.k_proj(context), self.n_kv_heads, D)  # (B, Hkv, Sk, D)
        v = _heads(self.v_proj(context), self.n_kv_heads, D)
        o, lse = cross_attention(q, k, v, seqlens_q=x_lengths, seqlens_k=context_lengths,
                                 scale=self.scale, return_lse=True, backend=self.backend)
        out = self.o_proj(self.dropout(_merge(o)))
        return (out, lse) if return_lse else out


class CoAttention(nn.Module):
    """Bidirectional co-attention fusion block with shared projections (seed design):

        F_t = H_t + Wo · softmax(H_t Wq (H_v Wk)^T / sqrt(d)) H_v Wv
        F_v = H_v + Wo · softmax(H_v Wq (H_t Wk)^T / sqrt(d)) H_t Wv

    multi-head (d = head dim).  On the triton backend both directions are one kernel launch.
    With ``out_proj=True`` (default) the residual add is folded into the Wo GEMM (addmm);
    with ``out_proj=False`` (the seed's value path without Wo) it is fused into the attention
    kernel's epilogue (out = residual + attn).  Other backends call cross_attention twice.

    Args: d_model, n_heads (d_model % n_heads == 0), dropout (on the attention output before
    Wo; with out_proj=False and dropout active the residual add is not fused), bias, out_proj,
    scale (default 1/sqrt(head_dim)), backend.
    forward(h_t (B, St, d_model), h_v (B, Sv, d_model), text_lengths=None, image_lengths=None,
    return_lse=False) -> (f_t, f_v[, lse_t (B, H, St), lse_v (B, H, Sv)]).  A row past its
    stream's length, or of a sample whose other stream is empty, gets attention 0:
    f = h (+ Wo's bias).
    """

    def __init__(self, d_model, n_heads, dropout=0.0, bias=True, out_proj=True, scale=None,
                 backend="auto", device=None, dtype=None):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        kw = dict(device=device, dtype=dtype)
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.scale, self.backend = scale, backend
        self.q_proj = nn.Linear(d_model, d_model, bias=bias, **kw)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias, **kw)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias, **kw)
        self.o_proj = nn.Linear(d_model, d_model, bias=bias, **kw) if out_proj else None
        self.dropout = nn.Dropout(dropout)

    def _plain(self, *mods):
        return all(type(m) is nn.Linear for m in mods)

    def _qkv(self, h):
        """h (B, S, d_model) -> q, k, v (B, H, S, D) views (one GEMM when unwrapped)."""
        H, D = self.n_heads, self.head_dim
        if self._plain(self.q_proj, self.k_proj, self.v_proj):
            w = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
            b = None if self.q_proj.bias is None else torch.cat(
                [self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])
            B, S, _ = h.shape
            qkv = F.linear(h, w, b).view(B, S, 3, H, D)
            return qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return tuple(_heads(p(h), H, D) for p in (self.q_proj, self.k_proj, self.v_proj))

    def _out(self, a, h):
        """h + o_proj(a), residual folded into the GEMM when o_proj is a plain Linear."""
        if not self._plain(self.o_proj):
            return h + self.o_proj(a)
        B, S, d = h.shape
        f = torch.addmm(h.reshape(B * S, d), a.reshape(B * S, d), self.o_proj.weight.t())
        if self.o_proj.bias is not None:
            f = f + self.o_proj.bias
        return f.view(B, S, d)

    def forward(self, h_t, h_v, text_lengths=None, image_lengths=None, return_lse=False):
        q_t, k_t, v_t = self._qkv(h_t)
        q_v, k_v, v_v = self._qkv(h_v)
        kw = dict(text_lengths=text_lengths, image_lengths=image_lengths, scale=self.scale,
                  return_lse=True, backend=self.backend)
        drop = self.training and self.dropout.p > 0
        if self.o_proj is None and not drop:
            H, D = self.n_heads, self.head_dim
            f_t, f_v, lse_t, lse_v = co_attention(
                q_t, k_t, v_t, q_v, k_v, v_v, residual_t=_heads(h_t, H, D),
                residual_v=_heads(h_v, H, D), **kw)
            f_t, f_v = _merge(f_t), _merge(f_v)
        else:
            a_t, a_v, lse_t, lse_v = co_attention(q_t, k_t, v_t, q_v, k_v, v_v, **kw)
            a_t, a_v = self.dropout(_merge(a_t)), self.dropout(_merge(a_v))
            if self.o_proj is None:
                f_t, f_v = h_t + a_t, h_v + a_v
            else:
                f_t, f_v = self._out(a_t, h_t), self._out(a_v, h_v)
        return (f_t, f_v, lse_t, lse_v) if return_lse else (f_t, f_v)
