"""Attention maps without the attention matrix: the exact probabilities of chosen query rows.

The ops never materialise P = softmax(scale · Q Kᵀ); they keep only the log-sum-exp of each
row (``return_lse=True``).  With it, any row is recomputed exactly in a second pass:

    P[i, j] = exp(scale · q_i · k_j − lse_i)   for allowed(i, j), else 0

over the same mask the op used (docs/design.md: window, causal, global tokens, seqlens with
bottom-right alignment, GQA).  The second pass touches only the chosen rows: memory and work
are O(rows × keys); nothing is computed for the other rows.  The lse comes from the backend
that ran the op (``backend=``), so the rows show what that backend computed.

    from mmcore.ops.attention_maps import window_attention_rows
    p = window_attention_rows(q, k, v, rows=[0, 17], window=(128, 128), global_tokens=1)
    p.shape   # (B, Hq, 2, Sk); each valid row sums to 1, rows that see no key are 0

Also ``cross_attention_rows`` and ``co_attention_rows`` (both directions of the co-attention
fusion), and ``rows_from_lse`` when the caller already holds the lse of a forward pass.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from . import _validate as V
from .co_attention import co_attention
from .cross_attention import cross_attention
from .reference.attention import allowed
from .window_attention import _window, window_attention

__all__ = ["window_attention_rows", "cross_attention_rows", "co_attention_rows",
           "rows_from_lse", "allowed_rows"]

Rows = Union[Sequence[int], torch.Tensor]


def _rows(rows: Rows, S: int, name: str = "rows") -> torch.Tensor:
    """Chosen query rows -> int64 (R,) CPU tensor, each in [0, S)."""
    if isinstance(rows, int) and not isinstance(rows, bool):
        rows = [rows]
    r = torch.as_tensor(rows)
    if r.numel() == 0 and r.dim() == 1:
        return torch.empty(0, dtype=torch.long)
    if r.dim() != 1 or r.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8,
                                       torch.uint8):
        raise ValueError(f"{name} must be a 1-D sequence of ints, got "
                         f"{tuple(r.shape)} {r.dtype}")
    r = r.long().cpu()
    if r.numel() and (int(r.min()) < 0 or int(r.max()) >= S):
        raise ValueError(f"{name} must lie in [0, {S}) (the query length), got "
                         f"min {int(r.min())}, max {int(r.max())}")
    return r


def _lengths(seqlens: Optional[torch.Tensor], S: int, B: int) -> torch.Tensor:
    return torch.full((B,), S, dtype=torch.long) if seqlens is None else seqlens.cpu().long()


def allowed_rows(rows: torch.Tensor, B: int, Sq: int, Sk: int, *, left: int = -1,
                 right: int = -1, causal: bool = False, global_tokens: int = 0,
                 seqlens_q=None, seqlens_k=None) -> torch.Tensor:
    """docs/design.md's allowed(i, j) for the query rows `rows` only -> (B, R, Sk) bool.

    left / right: -1 = unbounded; causal forces right = 0 and keeps global pairs causal.
    cross_attention is the unbounded case with G = 0."""
    if causal:
        right = 0
    Lq, Lk = _lengths(seqlens_q, Sq, B), _lengths(seqlens_k, Sk, B)
    keys = torch.arange(Sk)
    out = torch.empty(B, rows.numel(), Sk, dtype=torch.bool)
    for b in range(B):  # the mask rule of the torch backend (reference.attention.allowed)
        lq, lk = int(Lq[b]), int(Lk[b])
        out[b] = allowed(rows, keys, lk - lq, lk, left, right, causal, global_tokens) \
            & (rows < lq)[:, None]
    return out


def rows_from_lse(q, k, lse, rows: Rows, allowed: torch.Tensor, scale: float) -> torch.Tensor:
    """The second pass.  q (B, Hq, Sq, D), k (B, Hkv, Sk, D), lse (B, Hq, Sq) of the forward
    pass, rows (R,), allowed (B, R, Sk) bool -> P (B, Hq, R, Sk) float32 (float64 for
    float64 inputs): exp(scale · q_i · k_j − lse_i) where allowed, 0 elsewhere and in rows
    whose lse is -inf.  Scores are computed in float32 (or float64) from the input dtype.

    Memory: the (B, Hq, R, Sk) result and one fp32 copy of k; no (Sq, Sk) tensor."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    g = Hq // Hkv
    r = _rows(rows, Sq)
    R = r.numel()
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    dev = q.device
    ri = r.to(dev)
    qr = q.detach().index_select(2, ri).to(cdt)  # (B, Hq, R, D)
    kk = k.detach().to(cdt)  # (B, Hkv, Sk, D)
    # GQA: the g query heads of kv head h are consecutive -> (B, Hkv, g·R, D) @ (B, Hkv, D, Sk)
    s = torch.matmul(qr.reshape(B, Hkv, g * R, D), kk.transpose(-1, -2)) * scale
    s = s.view(B, Hq, R, Sk)
    m = lse.detach().index_select(2, ri).to(cdt)[..., None]  # (B, Hq, R, 1)
    ok = allowed.to(dev)[:, None] & torch.isfinite(m)  # (B, Hq, R, Sk)
    # where() keeps masked scores (and padded NaN inputs) out of the result
    return torch.where(ok, torch.exp(torch.where(ok, s - m, torch.zeros((), dtype=cdt,
                                                                          device=dev))),
                       torch.zeros((), dtype=cdt, device=dev))


def window_attention_rows(q, k, v, rows: Rows, *, window=None, causal=False, global_tokens=0,
                          seqlens_q=None, seqlens_k=None, scale=None, backend="auto",
                          lse=None) -> torch.Tensor:
    """Exact attention probabilities of `window_attention` for the query rows `rows`.

    Args: as ``mmcore.window_attention`` (q (B, Hq, Sq, D), k, v (B, Hkv, Sk, D), window,
        causal, global_tokens, seqlens_q, seqlens_k, scale, backend); rows: R query indices
        (the same for every sample and head); lse: the (B, Hq, Sq) lse of a forward pass
        already run with these arguments (else the op runs once with return_lse=True).
    Returns P (B, Hq, R, Sk) float32 (float64 for float64 inputs): P[b, h, r, j] is the
    weight of key j in output row rows[r]; a valid row sums to 1, padded rows and rows that
    see no key are all 0.  Memory O(R · Sk) beyond the op's own O(Sq) lse."""
    V.attention_qkv(q, k, v)
    B, Hq, Sq, D = q.shape
    Sk = k.shape[2]
    r = _rows(rows, Sq)
    left, right = _window(window, Sq, Sk)
    scale = V.scale(scale, D)
    sq = V.seqlens("seqlens_q", seqlens_q, B, q)
    sk = V.seqlens("seqlens_k", seqlens_k, B, q)
    if lse is None:
        with torch.no_grad():
            _, lse = window_attention(q, k, v, window=window, causal=causal,
                                      global_tokens=global_tokens, seqlens_q=sq, seqlens_k=sk,
                                      scale=scale, return_lse=True, backend=backend)
    _check_lse(lse, q)
    allowed = allowed_rows(r, B, Sq, Sk, left=left, right=right, causal=causal,
                           global_tokens=global_tokens, seqlens_q=sq, seqlens_k=sk)
    return rows_from_lse(q, k, lse, r, allowed, scale)


def cross_attention_rows(q, k, v, rows: Rows, *, seqlens_q=None, seqlens_k=None, scale=None,
                         backend="auto", lse=None) -> torch.Tensor:
    """Exact attention probabilities of `cross_attention` for the query rows `rows`.

    Args as ``mmcore.cross_attention``; returns P (B, Hq, R, Sk) (see window_attention_rows).
    A sample with no keys (Lk_b = 0) gives all-zero rows."""
    V.attention_qkv(q, k, v)
    B, Hq, Sq, D = q.shape
    r = _rows(rows, Sq)
    scale = V.scale(scale, D)
    sq = V.seqlens("seqlens_q", seqlens_q, B, q)
    sk = V.seqlens("seqlens_k", seqlens_k, B, q)
    if lse is None:
        with torch.no_grad():
            _, lse = cross_attention(q, k, v, seqlens_q=sq, seqlens_k=sk, scale=scale,
                                     return_lse=True, backend=backend)
    _check_lse(lse, q)
    allowed = allowed_rows(r, B, Sq, k.shape[2], seqlens_q=sq, seqlens_k=sk)
    return rows_from_lse(q, k, lse, r, allowed, scale)


def co_attention_rows(q_t, k_t, v_t, q_v, k_v, v_v, *, text_rows: Rows = (),
                      image_rows: Rows = (), text_lengths=None, image_lengths=None, scale=None,
                      backend="auto", lse_t=None, lse_v=None):
    """Both directions of co-attention: text rows over image keys and image rows over text
    keys, from the lse of one ``co_attention`` call (on triton: the fused two-direction
    kernel's lse).

    Args as ``mmcore.ops.co_attention.co_attention``; text_rows (Rt,) indices into St,
    image_rows (Rv,) into Sv.
    Returns (P_t (B, H, Rt, Sv), P_v (B, H, Rv, St)).  Rows past a stream's length, and all
    rows of a sample whose other stream is empty, are 0."""
    V.attention_qkv(q_t, k_v, v_v)
    V.attention_qkv(q_v, k_t, v_t)
    B, H, St, D = q_t.shape
    Sv = q_v.shape[2]
    rt, rv = _rows(text_rows, St, "text_rows"), _rows(image_rows, Sv, "image_rows")
    scale = V.scale(scale, D)
    lt = V.seqlens("text_lengths", text_lengths, B, q_t)
    lv = V.seqlens("image_lengths", image_lengths, B, q_t)
    if lse_t is None or lse_v is None:
        with torch.no_grad():
            _, _, lse_t, lse_v = co_attention(q_t, k_t, v_t, q_v, k_v, v_v, text_lengths=lt,
                                              image_lengths=lv, scale=scale, return_lse=True,
                                              backend=backend)
    _check_lse(lse_t, q_t, "lse_t")
    _check_lse(lse_v, q_v, "lse_v")
    p_t = rows_from_lse(q_t, k_v, lse_t, rt, allowed_rows(rt, B, St, Sv, seqlens_q=lt,
                                                          seqlens_k=lv), scale)
    p_v = rows_from_lse(q_v, k_t, lse_v, rv, allowed_rows(rv, B, Sv, St, seqlens_q=lv,
                                                          seqlens_k=lt), scale)
    return p_t, p_v


def _check_lse(lse, q, name="lse"):
    if not isinstance(lse, torch.Tensor) or tuple(lse.shape) != tuple(q.shape[:3]):
        got = tuple(lse.shape) if isinstance(lse, torch.Tensor) else type(lse).__name__
        raise ValueError(f"{name} must be a (B, Hq, Sq) = {tuple(q.shape[:3])} tensor, got {got}")
    if lse.device != q.device:
        raise ValueError(f"{name} is on {lse.device}, q on {q.device}")
