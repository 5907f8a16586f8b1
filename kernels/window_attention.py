"""Triton kernels for window_attention: sliding-window attention with a global-token prefix.

FlashAttention-2 style.  Layout q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D), any strides with a
contiguous last dim; query head h reads kv head h // (Hq // Hkv) (no repeated K/V exists).

Mask (docs/design.md), per sample b with valid lengths Lq, Lk and off = Lk - Lq (bottom-right
alignment), query i at position p = i + off:

    allowed(i, j) = i < Lq and j < Lk and (p - left <= j <= p + right
                                           or ((j < G or p < G) and (not causal or j <= p)))

Work is O(Sq·(left + right + G)·D): a query block visits only
  * the key blocks of its window, [lo, hi) rounded down to a block boundary, and
  * the global-prefix key blocks [0, G) that lie below that window range (no double count);
  * a query block that holds a global query (p < G) visits every key (causal: up to p).
The backward dK/dV program of a key block visits the mirror image: the query blocks whose
window holds the block, plus the global-query blocks [0, G - off) below them (all query
blocks when the key block holds global keys).  Both lists are walked as one loop over
"virtual" block indices t: t < n_glob is global block t, else window block t - n_glob.

Issue 26 features, each a constexpr (off: the kernels compile to what they were without it):
  HAS_SOFTCAP  scores c·tanh(s / c) before masking and softmax (lse over the capped scores);
               the backward recomputes t = tanh(s / c) with the same formula (_tanh, exp2
               only) and folds dS_raw = dS (1 - t²) into P before the dP dot, so no extra
               tile is live across a dot.
  BOUNDS       key_bounds (lo, hi) int32 (B, Sq): allowed(i, j) = i < Lq and j < Lk and
               lo_i <= j < hi_i (absolute key indices; the window, causal and G are unused).
               A query block visits keys [max(0, min lo), min(Lk, max hi)) over its rows
               that see something.  The dK/dV program of a key block needs the query rows
               that see it: _bounds_rows_kernel first tabulates, per 16-key granule, the
               first and last row whose range meets it (one scan of lo / hi per sample,
               O(Sq·Sk / 16) integer work, shared by all heads); the program visits the query
               blocks from the first to the last row of its granules (rows in between that
               do not see the block are masked: wasted work, never a wrong result).  Scanning
               every query block's lo / hi in each dK/dV program instead would cost
               O(Sq / BLOCK_M) dependent loads per program and head, comparable to the
               attention work itself for narrow bands at long Sq.
  KEY_MASK     key_mask (B, Sk) (uint8 here), AND-ed into allowed(i, j) in both modes; a
               block is "full" (no element mask) only when none of its keys is masked; a
               dK/dV program whose keys are all masked writes zeros at once.
  DROPOUT      attention dropout with mmcore/ops/reference/dropout.py's mask, recomputed
               wherever P is: u = mix(row key ^ column key) in uint32 (the seed level hashed
               once on the host: dropout_args; per (b, h) and row once per query block, per
               column once per key block), kept iff u >= round(p 2^32), Z = keep / (1 - p).
               The lse and l stay the un-dropped softmax's; O = (P∘Z) V, dV = (P∘Z)ᵀ dO,
               dP = (dO Vᵀ)∘Z, so delta = rowsum(P dP) = rowsum(dO∘O) as without dropout.

Kernels
  _fwd_kernel       online softmax, fp32 accumulators, lse in fp32 (natural log); with
                    SPLIT_K each program takes a slice of the key blocks and writes
                    fp32 partials that _combine_kernel merges by lse (split-K decoding).
  _bwd_dq_kernel    one program per query block, two passes over its key blocks: the row
                    statistics (max m and sum l of the scores, delta = rowsum(P dP); stored
                    for the dK/dV kernel), then dQ with P = exp2(S - m) / l
  _bwd_dkdv_kernel  one program per (key block, kv head), loops over the g query heads
                    that share the kv head and their query blocks (GQA reduced in registers)
  _bounds_rows_kernel  bounds mode only: the per-granule row table for _bwd_dkdv_kernel
The backward is deterministic by construction: every dq / dk / dv element is written by
exactly one program, in a fixed loop order, with no atomics.

Rows that see no key: out 0, lse -inf, gradients 0.  Padding past the valid lengths (which
may hold NaN) is never loaded: every load is masked with other=0, and masked scores are
-inf so their probabilities are exactly 0.  Base offsets are computed in int64.

Non-finite inputs (the non-finite pass).  A NaN / inf inside the valid part must reach only
the rows that see it, but in a block with masked pairs the P·V (dS·K) dot multiplies a
masked P = 0 by every row of V: 0 * NaN = NaN.  The hot kernels stay lean: with FLAGS = 1
they also write one int8 per row, 1 where the row's fp32 result is not finite; a second
launch of the same kernel with FLAGS = 2 returns at once in every program without a flagged
row (one (BLOCK_M,) load), and recomputes the others with _dot_masked, which keeps a
non-finite row of V (K) out of the dot for the rows that do not see it.  With finite inputs
the cost is that store, one launch and those loads.  Not covered (documented limits): the
split-K decode path, and non-finite Q / dO rows in the dK/dV kernel.

Nothing here imports the rest of mmcore.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["window_attention_fwd", "window_attention_bwd", "dropout_args", "DECODE_MAX_SQ"]

from ._autotune import autotune, config_class, smem_budget

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

_UNBOUNDED = 1 << 30  # a window side of -1 (unbounded) becomes this many positions
LOG2E = 1.4426950408889634
DECODE_MAX_SQ = 16  # Sq <= this takes the split-K (flash-decoding) forward
# constants read inside kernels must be constexpr globals
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(0.6931471805599453)
_NEG_INF = tl.constexpr(float("-inf"))
_TWO_LOG2E = tl.constexpr(2.0 * LOG2E)
_BIG = tl.constexpr(1 << 30)  # "no row" / "no key" sentinel of the bounds-mode ranges
GRAN = 16  # keys per granule of the bounds-mode row-range table (divides every BLOCK_N)
_GRAN = tl.constexpr(GRAN)

# scalars that change between calls: never specialise (no recompiles, no constexpr ints).
# D stays specialised: its divisibility by 16 lets the head-dim masks keep loads vectorised;
# so does the GQA group GROUP: GROUP == 1 (no GQA) drops dK/dV's loop over the group's heads.
# the dropout seed key and threshold change every call: never specialised either
_NO_SPEC = ["H", "Sq", "Sk", "left", "right", "G", "TUNE_KEY", "drop_base", "drop_thr"]
MAX_SPLITS = 64  # split-K decoding: at most this many key slices per query block
_ROW_STRIDE_LIMIT = 1 << 24  # row strides below this keep in-tile offsets within int32


# ---------------------------------------------------------------- shared device helpers

# Device functions called from the kernels.  Under the interpreter a nested @triton.jit call
# re-patches triton.language on every call (~10 ms each); plain Python functions see the
# same patched module, so they are left undecorated there.
_device_fn = (lambda f: f) if _INTERPRET else triton.jit


@_device_fn
def _dot(a, b, PREC: tl.constexpr):
    """tl.dot accumulating in fp32.  PREC "ieee" (fp32 inputs: true fp32, no tf32) or "tf32"
    (fp16/bf16: ignored); "interp" (every dtype under TRITON_INTERPRET): the product in fp64,
    rounded once to fp32.

    Why "interp": the backward recomputes the scores S and dP = dO Vᵀ in tiles of another
    shape and orientation than the forward and the dQ kernel (K Qᵀ in dK/dV), and at logits
    ~ 1e4 its P and dS = P (dP - delta) cancel only when those values match bit for bit
    (issue 24).  A GPU's dot sums each element over the head dim in a fixed order whatever
    the tile; numpy's BLAS (the interpreter's tl.dot) does not: it rounds a (64 x D)(D x 32)
    tile differently from a (32 x D)(D x 64) one, and rows differently by their place in
    the tile.  fp64 products of fp32 / 16-bit values are exact and their sum rounded once is
    the same whatever the shape.  (numpy also multiplies bf16 operands as raw uint16 bit
    patterns: the upcast fixes that too.)"""
    if PREC == "interp":
        r = tl.dot(a.to(tl.float64), b.to(tl.float64), out_dtype=tl.float64).to(tl.float32)
    else:
        r = tl.dot(a, b, input_precision=PREC)
    return r


@_device_fn
def _tanh(x):
    """tanh in fp32 from exp2 only (no libdevice: its name differs between Triton versions and
    the interpreter): 1 - 2 / (e^{2|x|} + 1) for |x| >= 1/4 (no cancellation there: the result
    is >= 0.24, a few ulp), the Taylor series to x^9 below (truncation < 1e-8 relative).
    +-inf -> +-1, NaN -> NaN."""
    ax = tl.abs(x)
    big = 1.0 - 2.0 / (tl.exp2(ax * _TWO_LOG2E) + 1.0)
    x2 = x * x
    small = ax * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * (
        -0.05396825396825397 + x2 * 0.021869488536155203))))
    t = tl.where(ax < 0.25, small, big)
    return tl.where(x < 0.0, -t, t)


@_device_fn
def _scores(raw, qk_scale, softcap2, HAS_SOFTCAP: tl.constexpr):
    """Scores in log2 units from a raw Q·Kᵀ tile -> (s, t).  Without softcap s = raw·qk_scale
    (qk_scale = scale·log2 e) and t is s (unused); with softcap c, qk_scale = scale / c,
    softcap2 = c·log2 e: t = tanh(raw·scale / c), s = c·t·log2 e (the backward needs
    1 - t² for dS_raw = dS_capped (1 - t²))."""
    if HAS_SOFTCAP:
        t = _tanh(raw * qk_scale)
        s = t * softcap2
    else:
        s = raw * qk_scale
        t = s
    return s, t


@_device_fn
def _mix32(x):
    """The 32-bit xorshift-multiply mixer of mmcore/ops/reference/dropout.py (_mix) on uint32:
    the products wrap mod 2^32 and the shifts are logical, as the reference's masked int64."""
    x = x ^ (x >> 15)
    x = x * 0x2C1B3C6D
    x = x ^ (x >> 12)
    x = x * 0x297A2D39
    return x ^ (x >> 15)


@_device_fn
def _drop_rows(drop_base, b, h, rows, DROPOUT: tl.constexpr):
    """Dropout, the row level of reference/dropout.py's keep: (R,) uint32 keys of query rows
    `rows` (indices into the call's tensors) of sample b, query head h; drop_base is the
    seed level (dropout_args, an int32 bit pattern).  Without DROPOUT: a dummy."""
    if DROPOUT:
        kh = _mix32((b.to(tl.uint32) * 65599 + h.to(tl.uint32))
                    ^ drop_base.to(tl.uint32, bitcast=True))
        kr = _mix32(kh ^ _mix32(rows.to(tl.uint32) + 0x632BE5AB))
    else:
        kr = rows
    return kr


@_device_fn
def _drop_cols(cols):
    """Dropout, the column level of keep: (N,) uint32 keys of key columns `cols`."""
    return _mix32(cols.to(tl.uint32) * 0x3C6EF372 + 0x5BD1E995)


@_device_fn
def _drop_tile(ka, kb, drop_thr, drop_rs):
    """(A, B) fp32 dropout factor of the pairs of row / column keys ka (A,), kb (B,) (either
    order: the key of a pair is their xor): drop_rs = 1 / (1 - p) where u >= threshold
    (drop_thr, an int32 bit pattern of round(p 2^32)), else 0."""
    u = _mix32(ka[:, None] ^ kb[None, :])
    return tl.where(u >= drop_thr.to(tl.uint32, bitcast=True), drop_rs, 0.0)


@_device_fn
def _allowed(i, j, off, Lq, Lk, left, right, G, lo_i, hi_i, km_j, CAUSAL: tl.constexpr,
             BOUNDS: tl.constexpr, KEY_MASK: tl.constexpr):
    """allowed(i, j) of docs/design.md for broadcastable row / column index tensors.
    BOUNDS: lo_i <= j < hi_i (key_bounds; the window arguments are unused); KEY_MASK: km_j (a
    bool per key) is AND-ed in."""
    if BOUNDS:
        ok = (i < Lq) & (j < Lk) & (j >= lo_i) & (j < hi_i)
    else:
        p = i + off
        glob = (j < G) | (p < G)
        if CAUSAL:
            glob = glob & (j <= p)
        inwin = (j >= p - left) & (j <= p + right)
        ok = (i < Lq) & (j < Lk) & (inwin | glob)
    if KEY_MASK:
        ok = ok & km_j
    return ok


@_device_fn
def _dot_masked(a, b, acc, all_ok, b_row0, b_stride, offs_d, d_ok, ri, c0, off, Lq, Lk,
                left, right, G, lo_r, hi_r, km_base, CAUSAL: tl.constexpr, BOUNDS: tl.constexpr,
                KEY_MASK: tl.constexpr, PREC: tl.constexpr):
    """acc + a @ b for a (R, C) fp32 that is 0 on every masked pair, b (C, N) the tile of
    rows c0 .. c0 + C - 1 (row c at b_row0 + c * b_stride in memory).

    Pair (r, c) is query ri[r] and key c0 + c.  A 0 there must not meet a non-finite
    b[c, :]: 0 * NaN = NaN would carry a key that the row never sees into its result.  In a
    wholly allowed block (all_ok), or when b is finite (checked per block), this is the plain
    dot of a in b's dtype; else the slow _dot_rows, which reads b's rows again from memory
    (keeping a second copy of the tile in registers spilled on sm_90)."""
    if all_ok:
        n_bad = all_ok.to(tl.int32) * 0  # an int32 scalar, as tl.sum gives below
    else:
        n_bad = tl.sum(tl.sum(tl.where(tl.abs(b.to(tl.float32)) < float("inf"), 0, 1), 1), 0)
    if n_bad > 0:
        acc = _dot_rows(a, acc, b_row0, b_stride, offs_d, d_ok, ri, c0, off, Lq, Lk, left,
                        right, G, lo_r, hi_r, km_base, CAUSAL, BOUNDS, KEY_MASK)
    else:
        acc = acc + _dot(a.to(b.dtype), b, PREC)
    return acc


@_device_fn
def _dot_rows(a, acc, b_row0, b_stride, offs_d, d_ok, ri, c0, off, Lq, Lk, left, right, G,
              lo_r, hi_r, km_base, CAUSAL: tl.constexpr, BOUNDS: tl.constexpr,
              KEY_MASK: tl.constexpr):
    """acc + sum over c of a[:, c] b[c, :] on the allowed pairs only, one c at a time in fp32
    with IEEE rules (x * NaN, 0 * inf -> NaN).  Slow: blocks holding a non-finite value."""
    kk = tl.arange(0, a.shape[1])
    for c in range(0, a.shape[1]):
        j = c0 + c
        if KEY_MASK:
            km_c = tl.load(km_base + j, mask=j < Lk, other=0) != 0
        else:
            km_c = j >= 0
        ok = _allowed(ri, j, off, Lq, Lk, left, right, G, lo_r, hi_r, km_c, CAUSAL, BOUNDS,
                      KEY_MASK)
        a_c = tl.sum(tl.where(kk[None, :] == c, a, 0.0), 1)  # (R,)
        b_c = tl.load(b_row0 + c * b_stride + offs_d, mask=d_ok & (offs_d * 0 + j < Lk),
                      other=0.0).to(tl.float32)  # (N,)
        acc += tl.where(ok[:, None], a_c[:, None] * b_c[None, :], 0.0)
    return acc


@_device_fn
def _block_full(start_m, start_n, Lq, Lk, off, left, right, G, lo_max, hi_min, km_all,
                CAUSAL: tl.constexpr, BOUNDS: tl.constexpr, KEY_MASK: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """True when every (i, j) of the block rows [start_m, +BLOCK_M) x keys [start_n, +BLOCK_N)
    is allowed: the per-element mask can be skipped (interior of the band).
    BOUNDS: lo_max / hi_min are the largest lo and smallest hi of the block's rows; KEY_MASK:
    km_all says that no key of the block is masked."""
    j_hi = start_n + BLOCK_N - 1
    full = (start_m + BLOCK_M <= Lq) & (j_hi < Lk)
    if BOUNDS:
        full = full & (start_n >= lo_max) & (j_hi < hi_min)
    else:
        p_lo = start_m + off
        p_hi = start_m + BLOCK_M - 1 + off
        in_win = (start_n >= p_hi - left) & (j_hi <= p_lo + right)
        glob_k = j_hi < G
        if CAUSAL:
            glob_all = glob_k & (j_hi <= p_lo)
        else:
            glob_all = glob_k | (p_hi < G)
        full = full & (in_win | glob_all)
    if KEY_MASK:
        full = full & km_all
    return full


@_device_fn
def _row_bounds(KLO, KHI, b, offs_m, Sq, Lq, Lk, BOUNDS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Bounds mode, the query rows offs_m of sample b: -> (lo_r, hi_r (BLOCK_M,) int32, lo_max,
    hi_min (for _block_full), lo (first key block, a multiple of BLOCK_N), n_win).  The key
    range is [max(0, min lo), min(Lk, max hi)) over the valid rows that see something.
    Without BOUNDS: zeros (unused)."""
    if BOUNDS:
        row_ok = offs_m < Lq
        base = b.to(tl.int64) * Sq
        lo_r = tl.load(KLO + base + offs_m, mask=row_ok, other=0)
        hi_r = tl.load(KHI + base + offs_m, mask=row_ok, other=0)
        sees = row_ok & (lo_r < hi_r)
        k_lo = tl.maximum(tl.min(tl.where(sees, lo_r, _BIG), 0), 0)
        k_hi = tl.minimum(tl.max(tl.where(sees, hi_r, 0), 0), Lk)
        lo = (k_lo // BLOCK_N) * BLOCK_N
        n_win = tl.where(k_hi > k_lo, (k_hi - lo + BLOCK_N - 1) // BLOCK_N, 0)
        lo_max = tl.max(lo_r, 0)
        hi_min = tl.min(hi_r, 0)
    else:
        lo_r = offs_m * 0
        hi_r = lo_r
        lo = Lk * 0
        n_win = lo
        lo_max = lo
        hi_min = lo
    return lo_r, hi_r, lo_max, hi_min, lo, n_win


@_device_fn
def _key_blocks(start_m, Lq, Lk, off, left, right, G, CAUSAL: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key blocks seen by query rows [start_m, start_m + BLOCK_M).

    Returns (lo, n_win, n_glob): window blocks start at lo (a multiple of BLOCK_N), n_win of
    them; global-prefix blocks are 0 .. n_glob - 1, all below lo."""
    row_end = tl.minimum(start_m + BLOCK_M, Lq)
    has_rows = row_end > start_m
    p_lo = start_m + off
    p_hi = row_end - 1 + off
    lo = tl.maximum(p_lo - left, 0)
    hi = tl.minimum(p_hi + right + 1, Lk)
    if CAUSAL:
        full_hi = tl.minimum(p_hi + 1, Lk)
    else:
        full_hi = Lk + 0 * p_hi
    gq = p_lo < G  # the block holds a global query: it sees every key
    lo = tl.where(gq, 0, lo)
    hi = tl.where(gq, full_hi, hi)
    lo = (lo // BLOCK_N) * BLOCK_N
    n_win = tl.where(has_rows & (hi > lo), (hi - lo + BLOCK_N - 1) // BLOCK_N, 0)
    g_end = tl.minimum(G, Lk) + 0 * p_hi
    g_end = tl.where(n_win > 0, tl.minimum(g_end, lo), g_end)
    n_glob = tl.where(has_rows & (g_end > 0), (g_end + BLOCK_N - 1) // BLOCK_N, 0)
    return lo, n_win, n_glob


@_device_fn
def _query_blocks(start_n, Lq, Lk, off, left, right, G, CAUSAL: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query blocks that see key columns [start_n, start_n + BLOCK_N) (mirror of _key_blocks).

    Returns (lo, n_win, n_glob) in query-row units of BLOCK_M."""
    col_end = tl.minimum(start_n + BLOCK_N, Lk)
    has_cols = col_end > start_n
    # in window:  j - right <= p <= j + left,  i = p - off
    lo = tl.maximum(start_n - right - off, 0)
    hi = tl.minimum(col_end + left - off, Lq)
    if CAUSAL:
        full_lo = tl.maximum(start_n - off, 0)
    else:
        full_lo = 0 * start_n
    gk = start_n < G  # the block holds global keys: every query sees it
    lo = tl.where(gk, full_lo, lo)
    hi = tl.where(gk, Lq + 0 * start_n, hi)
    lo = (lo // BLOCK_M) * BLOCK_M
    n_win = tl.where(has_cols & (hi > lo), (hi - lo + BLOCK_M - 1) // BLOCK_M, 0)
    g_end = tl.minimum(tl.maximum(G - off, 0), Lq) + 0 * start_n  # global query rows
    g_end = tl.where(n_win > 0, tl.minimum(g_end, lo), g_end)
    n_glob = tl.where(has_cols & (g_end > 0), (g_end + BLOCK_M - 1) // BLOCK_M, 0)
    return lo, n_win, n_glob


@_device_fn
def _lengths(SEQ_Q, SEQ_K, b, Sq, Sk, HAS_SQ: tl.constexpr, HAS_SK: tl.constexpr):
    if HAS_SQ:
        Lq = tl.load(SEQ_Q + b).to(tl.int32)
    else:
        Lq = Sq + 0 * b
    if HAS_SK:
        Lk = tl.load(SEQ_K + b).to(tl.int32)
    else:
        Lk = Sk + 0 * b
    return Lq, Lk


@_device_fn
def _key_mask_block(km_base, cols, Lk, KEY_MASK: tl.constexpr):
    """-> (km (BLOCK_N,) bool: key_mask of keys cols (False past Lk), km_all: all True)."""
    if KEY_MASK:
        km = tl.load(km_base + cols, mask=cols < Lk, other=0) != 0
        km_all = tl.min(km.to(tl.int32), 0) > 0
    else:
        km = cols >= 0
        km_all = Lk >= 0
    return km, km_all


@_device_fn
def _kv_mask(cols, Lk, d_ok, km, KEY_MASK: tl.constexpr):
    """Load mask of a (BLOCK_N, BLOCK_D) K / V tile: keys past Lk and, with KEY_MASK, hidden
    keys are never read (a NaN there cannot reach a row, in any path: split-K included)."""
    ok = (cols[:, None] < Lk) & d_ok[None, :]
    if KEY_MASK:
        ok = ok & km[:, None]
    return ok


@_device_fn
def _block_scores(q, k_base, k_tile, stride_kn, km_base, t, n_glob, lo, offs_m, offs_n, d_ok,
                  start_m, Lq, Lk, off, left, right, G, qk_scale, softcap2, lo_r, hi_r, lo_max,
                  hi_min, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  PREC: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BOUNDS: tl.constexpr,
                  KEY_MASK: tl.constexpr):
    """Virtual key block t of a query block (the forward, the row statistics and dQ walk the
    same blocks) -> (s (BLOCK_M, BLOCK_N) scores in log2 units, -inf where not allowed;
    tc: tanh(raw / c) with softcap (else s); k (BLOCK_N, BLOCK_D) tile; kv_mask (its load
    mask, for V too); n64: its first key (int64); start_n; full: no pair masked)."""
    start_n = tl.where(t < n_glob, t * BLOCK_N, lo + (t - n_glob) * BLOCK_N)
    cols = start_n + offs_n
    km, km_all = _key_mask_block(km_base, cols, Lk, KEY_MASK)
    kv_mask = _kv_mask(cols, Lk, d_ok, km, KEY_MASK)
    n64 = start_n.to(tl.int64)
    k = tl.load(k_base + n64 * stride_kn + k_tile, mask=kv_mask, other=0.0)
    # the scale right after the dot: triton 3.6's pipeliner fails to compile a wgmma whose
    # result is read only inside the branches of a runtime if (issue 11)
    s, tc = _scores(_dot(q, tl.trans(k), PREC), qk_scale, softcap2, HAS_SOFTCAP)
    full = _block_full(start_m, start_n, Lq, Lk, off, left, right, G, lo_max, hi_min,
                       km_all, CAUSAL, BOUNDS, KEY_MASK, BLOCK_M, BLOCK_N)
    if not full:
        ok = _allowed(offs_m[:, None], cols[None, :], off, Lq, Lk, left, right, G,
                      lo_r[:, None], hi_r[:, None], km[None, :], CAUSAL, BOUNDS, KEY_MASK)
        s = tl.where(ok, s, _NEG_INF)
    return s, tc, k, kv_mask, n64, start_n, full


@_device_fn
def _fwd_loop(q, k_base, v_base, k_tile, v_tile, stride_kn, stride_vn, offs_m, offs_n, offs_d,
              d_ok, start_m, lo, n_glob, t0, t1, Lq, Lk, off, left, right, G, qk_scale,
              softcap2, lo_r, hi_r, lo_max, hi_min, km_base, kr, drop_thr, drop_rs,
              CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_D: tl.constexpr, PREC: tl.constexpr, EXACT: tl.constexpr,
              HAS_SOFTCAP: tl.constexpr, BOUNDS: tl.constexpr, KEY_MASK: tl.constexpr,
              DROPOUT: tl.constexpr):
    """The online softmax over key blocks t0 .. t1 - 1 of one query block -> (m, l, acc).
    EXACT: masked pairs never meet a non-finite V row (_dot_masked; slower, more registers).
    DROPOUT: l sums the un-dropped weights (the lse is the un-dropped softmax's), acc the
    dropped ones times 1 / (1 - p) (kr: the rows' keys, _drop_rows)."""
    m_i = tl.full([BLOCK_M], _NEG_INF, tl.float32)  # running max, log2 units
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for t in range(t0, t1):
        s, tc, k, kv_mask, n64, start_n, full = _block_scores(
            q, k_base, k_tile, stride_kn, km_base, t, n_glob, lo, offs_m, offs_n, d_ok,
            start_m, Lq, Lk, off, left, right, G, qk_scale, softcap2, lo_r, hi_r, lo_max,
            hi_min, CAUSAL, BLOCK_M, BLOCK_N, PREC, HAS_SOFTCAP, BOUNDS, KEY_MASK)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == _NEG_INF, 0.0, m_new)  # a row with nothing seen yet
        p = tl.exp2(s - m_use[:, None])  # masked -> exactly 0
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            p = p * _drop_tile(kr, _drop_cols(start_n + offs_n), drop_thr, drop_rs)
        v = tl.load(v_base + n64 * stride_vn + v_tile, mask=kv_mask, other=0.0)
        if EXACT:
            acc = _dot_masked(p, v, acc * alpha[:, None], full, v_base + n64 * stride_vn,
                              stride_vn, offs_d, d_ok, offs_m, start_n, off, Lq, Lk, left, right,
                              G, lo_r, hi_r, km_base, CAUSAL, BOUNDS, KEY_MASK, PREC)
        else:
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PREC)
        m_i = m_new
    return m_i, l_i, acc


# ---------------------------------------------------------------- forward


# (the lse strides follow Sq: unspecialised too, they only place one (BLOCK_M,) row)
@triton.jit(do_not_specialize=_NO_SPEC + ["n_splits", "stride_lb", "stride_lh"])
def _fwd_kernel(Q, K, V, O, LSE, SEQ_Q, SEQ_K, FLAG, KLO, KHI, KM,
                stride_qb, stride_qh, stride_qm,
                stride_kb, stride_kh, stride_kn,
                stride_vb, stride_vh, stride_vn,
                stride_ob, stride_oh, stride_os, stride_om,
                stride_lb, stride_lh, stride_ls,
                H, GROUP, Sq, Sk, D, left, right, G, qk_scale, softcap2, TUNE_KEY, n_splits,
                drop_base, drop_thr, drop_rs,
                HAS_SQ: tl.constexpr, HAS_SK: tl.constexpr, CAUSAL: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                SPLIT_K: tl.constexpr, PREC: tl.constexpr, FLAGS: tl.constexpr,
                HAS_SOFTCAP: tl.constexpr, BOUNDS: tl.constexpr, KEY_MASK: tl.constexpr,
                DROPOUT: tl.constexpr):
    """FLAGS (the non-finite pass, module docstring): 0 none, 1 write FLAG (B*H, Sq) int8 = 1
    where a row's result is not finite, 2 the fix-up pass: only programs holding a flagged
    row run, with masked pairs kept out of the dots.

    HAS_SOFTCAP: qk_scale = scale / c, softcap2 = c·log2 e (_scores).  BOUNDS: KLO / KHI
    (B, Sq) int32 key bounds replace the window (left, right, G, CAUSAL unused); KEY_MASK:
    KM (B, Sk) uint8, 0 = key never seen.  Absent features: None pointers.  DROPOUT:
    attention dropout with the seed key drop_base, threshold drop_thr (int32 bit patterns of
    uint32 values) and drop_rs = 1 / (1 - p) (dropout_args); off, those are unused."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    if FLAGS == 2:
        rows_f = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        fl = tl.load(FLAG + pid_bh.to(tl.int64) * Sq + rows_f, mask=rows_f < Sq, other=0)
        if tl.max(fl, 0) == 0:
            return
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    Lq, Lk = _lengths(SEQ_Q, SEQ_K, b, Sq, Sk, HAS_SQ, HAS_SK)
    off = Lk - Lq
    b64 = b.to(tl.int64)

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D

    q_ptrs = (Q + b64 * stride_qb + h.to(tl.int64) * stride_qh
              + offs_m.to(tl.int64)[:, None] * stride_qm + offs_d[None, :])
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < Lq) & d_ok[None, :], other=0.0)
    k_base = K + b64 * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + hk.to(tl.int64) * stride_vh

    lo_r, hi_r, lo_max, hi_min, lo, n_win = _row_bounds(KLO, KHI, b, offs_m, Sq, Lq, Lk, BOUNDS,
                                                        BLOCK_N)
    if BOUNDS:
        n_glob = 0 * n_win
    else:
        lo, n_win, n_glob = _key_blocks(start_m, Lq, Lk, off, left, right, G, CAUSAL,
                                        BLOCK_M, BLOCK_N)
    if KEY_MASK:
        km_base = KM + b64 * Sk
    else:
        km_base = K
    n_tot = n_glob + n_win
    if SPLIT_K:
        per = (n_tot + n_splits - 1) // n_splits
        t0 = pid_s * per
        t1 = tl.minimum(t0 + per, n_tot)
    else:
        t0 = 0 * n_tot
        t1 = n_tot

    k_tile = offs_n.to(tl.int64)[:, None] * stride_kn + offs_d[None, :]  # (BLOCK_N, BLOCK_D)
    v_tile = offs_n.to(tl.int64)[:, None] * stride_vn + offs_d[None, :]
    kr = _drop_rows(drop_base, b, h, offs_m, DROPOUT)
    m_i, l_i, acc = _fwd_loop(q, k_base, v_base, k_tile, v_tile, stride_kn, stride_vn, offs_m,
                              offs_n, offs_d, d_ok, start_m, lo, n_glob, t0, t1, Lq, Lk, off,
                              left, right, G, qk_scale, softcap2, lo_r, hi_r, lo_max, hi_min,
                              km_base, kr, drop_thr, drop_rs, CAUSAL, BLOCK_M, BLOCK_N, BLOCK_D,
                              PREC, FLAGS == 2, HAS_SOFTCAP, BOUNDS, KEY_MASK, DROPOUT)
    if FLAGS == 1:
        bad = tl.sum(tl.where(acc * 0.0 == 0.0, 0, 1), 1)  # (BLOCK_M,)
        tl.store(FLAG + pid_bh.to(tl.int64) * Sq + offs_m, (bad > 0).to(tl.int8),
                 mask=offs_m < Sq)

    # l NaN: the row met a NaN or +inf score (exp(inf - inf)); out NaN, lse NaN or +inf
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, _NEG_INF, m_i * _LN2 + tl.log(l_safe))
    lse = tl.where(m_i == float("inf"), float("inf"), lse)
    o_ptrs = (O + b64 * stride_ob + h.to(tl.int64) * stride_oh + pid_s.to(tl.int64) * stride_os
              + offs_m.to(tl.int64)[:, None] * stride_om + offs_d[None, :])
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=(offs_m[:, None] < Sq) & d_ok[None, :])
    l_ptrs = (LSE + b64 * stride_lb + h.to(tl.int64) * stride_lh
              + pid_s.to(tl.int64) * stride_ls + offs_m)
    tl.store(l_ptrs, lse, mask=offs_m < Sq)


@triton.jit(do_not_specialize=["Sq", "n_splits"])
def _combine_kernel(OP, LP, O, LSE, Sq, D, n_splits,
                    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Merge split-K partials: OP (BH, S, Sq, D) fp32 normalised, LP (BH, S, Sq) -> O, LSE
    (S = n_splits <= BLOCK_S, a runtime value: one compile serves every split count)."""
    row = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < n_splits
    lp = tl.load(LP + bh * n_splits * Sq + offs_s * Sq + row, mask=s_ok, other=_NEG_INF)
    m = tl.max(lp, 0)
    m_use = tl.where(m == _NEG_INF, 0.0, m)
    w = tl.exp(lp - m_use)  # -inf -> 0
    tot = tl.sum(w, 0)
    op = tl.load(OP + (bh * n_splits * Sq + offs_s[:, None] * Sq + row) * D + offs_d[None, :],
                 mask=s_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    out = tl.sum(op * w[:, None], 0) / tl.where(tot == 0.0, 1.0, tot)
    lse = tl.where(tot == 0.0, _NEG_INF, m_use + tl.log(tl.where(tot == 0.0, 1.0, tot)))
    lse = tl.where(m == float("inf"), float("inf"), lse)  # a +inf score: exp(inf - inf) NaN
    tl.store(O + (bh * Sq + row) * D + offs_d, out.to(O.dtype.element_ty), mask=offs_d < D)
    tl.store(LSE + bh * Sq + row, lse)


# ---------------------------------------------------------------- backward


@_device_fn
def _row_stats(q, do, k_base, v_base, k_tile, v_tile, stride_kn, stride_vn, offs_m, offs_n,
               d_ok, start_m, lo, n_glob, n_win, Lq, Lk, off, left, right, G, qk_scale,
               softcap2, lo_r, hi_r, lo_max, hi_min, km_base, kr, drop_thr, drop_rs,
               CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               PREC: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BOUNDS: tl.constexpr,
               KEY_MASK: tl.constexpr, DROPOUT: tl.constexpr):
    """Pass 1 of the dQ kernel over the query block's key blocks, online: the row max m of S
    (log2 units), l = sum exp2(S - m) and d = sum exp2(S - m) dP -> (m, l, d) (BLOCK_M,).

    P = exp2(S - m) / l then sums to 1 to fp32 rounding at any logit size, and is exactly 1
    where the row is one-hot; exp2(S - lse) with the forward's fp32 lse is not (at |S| ~ 1e4
    the lse is an ulp of S, ~1e-3, off).  delta = d / l replaces rowsum(dO * O): it is built
    from the same dP values as dS = P (dP - delta), so the two cancel where P is one-hot
    (issue 24).  A masked pair has P = 0 and adds 0 even when its dP is not finite.
    DROPOUT (O = (P∘Z) V, Z = keep / (1 - p)): dP is the gradient of the un-dropped P,
    (dO Vᵀ)∘Z, so d = sum P dP = rowsum(dO∘O) still, and dS = P (dP - delta) below."""
    m_i = tl.full([BLOCK_M], _NEG_INF, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    d_i = tl.zeros([BLOCK_M], tl.float32)
    for t in range(0, n_glob + n_win):
        s, tc, k, kv_mask, n64, start_n, full = _block_scores(
            q, k_base, k_tile, stride_kn, km_base, t, n_glob, lo, offs_m, offs_n, d_ok,
            start_m, Lq, Lk, off, left, right, G, qk_scale, softcap2, lo_r, hi_r, lo_max,
            hi_min, CAUSAL, BLOCK_M, BLOCK_N, PREC, HAS_SOFTCAP, BOUNDS, KEY_MASK)
        v = tl.load(v_base + n64 * stride_vn + v_tile, mask=kv_mask, other=0.0)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == _NEG_INF, 0.0, m_new)  # a row with nothing seen yet
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])  # masked -> exactly 0
        dp = _dot(do, tl.trans(v), PREC)
        if DROPOUT:
            dp = dp * _drop_tile(kr, _drop_cols(start_n + offs_n), drop_thr, drop_rs)
        l_i = l_i * alpha + tl.sum(p, 1)
        d_i = d_i * alpha + tl.sum(tl.where(p == 0.0, 0.0, p * dp), 1)
        m_i = m_new
    return m_i, l_i, d_i


@_device_fn
def _dq_loop(q, do, m2, l_inv, delta, k_base, v_base, k_tile, v_tile, stride_kn, stride_vn,
             offs_m, offs_n, offs_d, d_ok, start_m, lo, n_glob, n_win, Lq, Lk, off, left,
             right, G, qk_scale, softcap2, lo_r, hi_r, lo_max, hi_min, km_base, kr, drop_thr,
             drop_rs, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_D: tl.constexpr, PREC: tl.constexpr, EXACT: tl.constexpr,
             HAS_SOFTCAP: tl.constexpr, BOUNDS: tl.constexpr, KEY_MASK: tl.constexpr,
             DROPOUT: tl.constexpr):
    """Pass 2: dQ / scale of one query block over its key blocks, P = exp2(S - m2) * l_inv
    (_row_stats).  EXACT: masked pairs never meet a non-finite K row (_dot_masked)."""
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for t in range(0, n_glob + n_win):
        s, tc, k, kv_mask, n64, start_n, full = _block_scores(
            q, k_base, k_tile, stride_kn, km_base, t, n_glob, lo, offs_m, offs_n, d_ok,
            start_m, Lq, Lk, off, left, right, G, qk_scale, softcap2, lo_r, hi_r, lo_max,
            hi_min, CAUSAL, BLOCK_M, BLOCK_N, PREC, HAS_SOFTCAP, BOUNDS, KEY_MASK)
        v = tl.load(v_base + n64 * stride_vn + v_tile, mask=kv_mask, other=0.0)
        # masked (-inf) pairs get P = 0 even when the row's l is NaN, and dS = 0 wherever
        # P = 0 even when dP (a masked non-finite V) or delta is not finite
        p = tl.where(s == _NEG_INF, 0.0, tl.exp2(s - m2[:, None]) * l_inv[:, None])
        if HAS_SOFTCAP:  # dS_raw = dS_capped (1 - t²): the factor folded into P here
            p = tl.where(p == 0.0, 0.0, p * (1.0 - tc * tc))
        dp = _dot(do, tl.trans(v), PREC)
        if DROPOUT:  # the gradient of the un-dropped P: (dO Vᵀ)∘Z
            dp = dp * _drop_tile(kr, _drop_cols(start_n + offs_n), drop_thr, drop_rs)
        ds = tl.where(p == 0.0, 0.0, p * (dp - delta[:, None]))
        if EXACT:
            dq = _dot_masked(ds, k, dq, full, k_base + n64 * stride_kn, stride_kn, offs_d, d_ok,
                             offs_m, start_n, off, Lq, Lk, left, right, G, lo_r, hi_r, km_base,
                             CAUSAL, BOUNDS, KEY_MASK, PREC)
        else:
            dq += _dot(ds.to(k.dtype), k, PREC)
    return dq


@triton.jit(do_not_specialize=_NO_SPEC)
def _bwd_dq_kernel(Q, K, V, DO, DELTA, MROW, LINV, DQ, SEQ_Q, SEQ_K, FLAG, KLO, KHI, KM,
                   stride_qb, stride_qh, stride_qm,
                   stride_kb, stride_kh, stride_kn,
                   stride_vb, stride_vh, stride_vn,
                   stride_db, stride_dh, stride_dm,
                   stride_dqb, stride_dqh, stride_dqm,
                   H, GROUP, Sq, Sk, D, left, right, G, qk_scale, softcap2, sm_scale, TUNE_KEY,
                   drop_base, drop_thr, drop_rs,
                   HAS_SQ: tl.constexpr, HAS_SK: tl.constexpr, CAUSAL: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   PREC: tl.constexpr, FLAGS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                   BOUNDS: tl.constexpr, KEY_MASK: tl.constexpr, DROPOUT: tl.constexpr):
    """dQ = scale · dS K over the key blocks of one query block, dS = P ∘ (dO Vᵀ − delta)
    (∘ (1 - t²) with softcap), in two passes over the key blocks: _row_stats (m, l, delta;
    stored per row in MROW, LINV = 1 / l, DELTA (B*H, Sq) fp32 for the dK/dV kernel; the
    forward's lse is not read), then _dq_loop.  FLAGS as in _fwd_kernel (1: flag non-finite
    dQ rows, 2: recompute the flagged blocks, the row statistics as they were);
    HAS_SOFTCAP, BOUNDS, KEY_MASK, DROPOUT as there (with dropout dP = (dO Vᵀ)∘Z)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    if FLAGS == 2:
        rows_f = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        fl = tl.load(FLAG + pid_bh.to(tl.int64) * Sq + rows_f, mask=rows_f < Sq, other=0)
        if tl.max(fl, 0) == 0:
            return
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    Lq, Lk = _lengths(SEQ_Q, SEQ_K, b, Sq, Sk, HAS_SQ, HAS_SK)
    off = Lk - Lq
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    rows = offs_m.to(tl.int64)[:, None]
    row_mask = (offs_m[:, None] < Lq) & d_ok[None, :]
    q = tl.load(Q + b64 * stride_qb + h64 * stride_qh + rows * stride_qm + offs_d[None, :],
                mask=row_mask, other=0.0)
    do = tl.load(DO + b64 * stride_db + h64 * stride_dh + rows * stride_dm + offs_d[None, :],
                 mask=row_mask, other=0.0)
    row_ok = offs_m < Lq
    k_base = K + b64 * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + hk.to(tl.int64) * stride_vh

    lo_r, hi_r, lo_max, hi_min, lo, n_win = _row_bounds(KLO, KHI, b, offs_m, Sq, Lq, Lk, BOUNDS,
                                                        BLOCK_N)
    if BOUNDS:
        n_glob = 0 * n_win
    else:
        lo, n_win, n_glob = _key_blocks(start_m, Lq, Lk, off, left, right, G, CAUSAL,
                                        BLOCK_M, BLOCK_N)
    if KEY_MASK:
        km_base = KM + b64 * Sk
    else:
        km_base = K
    k_tile = offs_n.to(tl.int64)[:, None] * stride_kn + offs_d[None, :]
    v_tile = offs_n.to(tl.int64)[:, None] * stride_vn + offs_d[None, :]
    rbase = pid_bh.to(tl.int64) * Sq
    kr = _drop_rows(drop_base, b, h, offs_m, DROPOUT)
    if FLAGS == 2:  # the statistics pass 1 stored (the same values: same tiles, same order)
        m2 = tl.load(MROW + rbase + offs_m, mask=row_ok, other=0.0)
        l_inv = tl.load(LINV + rbase + offs_m, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + rbase + offs_m, mask=row_ok, other=0.0)
    else:
        m_i, l_i, d_i = _row_stats(q, do, k_base, v_base, k_tile, v_tile, stride_kn,
                                   stride_vn, offs_m, offs_n, d_ok, start_m, lo, n_glob, n_win,
                                   Lq, Lk, off, left, right, G, qk_scale, softcap2, lo_r, hi_r,
                                   lo_max, hi_min, km_base, kr, drop_thr, drop_rs, CAUSAL,
                                   BLOCK_M, BLOCK_N, PREC, HAS_SOFTCAP, BOUNDS, KEY_MASK,
                                   DROPOUT)
        # a row that sees nothing (l = 0): P = 0; l NaN (a NaN / +inf score) propagates
        seen = row_ok & (l_i != 0.0)
        l_inv = tl.where(seen, 1.0 / tl.where(seen, l_i, 1.0), 0.0)
        m2 = tl.where(seen, m_i, 0.0)
        delta = d_i * l_inv
        tl.store(MROW + rbase + offs_m, m2, mask=offs_m < Sq)
        tl.store(LINV + rbase + offs_m, l_inv, mask=offs_m < Sq)
        tl.store(DELTA + rbase + offs_m, delta, mask=offs_m < Sq)
    dq = _dq_loop(q, do, m2, l_inv, delta, k_base, v_base, k_tile, v_tile, stride_kn,
                  stride_vn, offs_m, offs_n, offs_d, d_ok, start_m, lo, n_glob, n_win, Lq, Lk,
                  off, left, right, G, qk_scale, softcap2, lo_r, hi_r, lo_max, hi_min, km_base,
                  kr, drop_thr, drop_rs, CAUSAL, BLOCK_M, BLOCK_N, BLOCK_D, PREC, FLAGS == 2,
                  HAS_SOFTCAP, BOUNDS, KEY_MASK, DROPOUT)
    if FLAGS == 1:
        bad = tl.sum(tl.where(dq * 0.0 == 0.0, 0, 1), 1)  # (BLOCK_M,)
        tl.store(FLAG + pid_bh.to(tl.int64) * Sq + offs_m, (bad > 0).to(tl.int8),
                 mask=offs_m < Sq)
    dq = dq * sm_scale
    tl.store(DQ + b64 * stride_dqb + h64 * stride_dqh + rows * stride_dqm + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=(offs_m[:, None] < Sq) & d_ok[None, :])


@triton.jit(do_not_specialize=["Sq", "Sk"])
def _bounds_rows_kernel(KLO, KHI, SEQ_Q, SEQ_K, FIRST, LAST, Sq, Sk,
                        HAS_SQ: tl.constexpr, HAS_SK: tl.constexpr,
                        GRANS: tl.constexpr, ROWS: tl.constexpr):
    """Bounds mode, for the dK/dV kernel: which query rows see each granule of GRAN keys.

    FIRST / LAST (B, cdiv(Sk, GRAN)) int32 <- the first and last row i < Lq whose range
    [max(lo_i, g0), min(hi_i, g0 + GRAN, Lk)) is not empty (_BIG / -1: none).  One program per
    GRANS granules of a sample scans all the sample's rows, ROWS at a time: O(Sq·Sk / GRAN)
    integer work per sample, shared by every head (a dK/dV program reads BLOCK_N / GRAN
    entries instead of scanning lo / hi itself)."""
    pid = tl.program_id(0)
    b = tl.program_id(1)
    Lq, Lk = _lengths(SEQ_Q, SEQ_K, b, Sq, Sk, HAS_SQ, HAS_SK)
    NG = (Sk + _GRAN - 1) // _GRAN
    g = pid * GRANS + tl.arange(0, GRANS)
    g0 = g * _GRAN
    g1 = tl.minimum(g0 + _GRAN, Lk)
    first = tl.full([GRANS], _BIG, tl.int32)
    last = tl.full([GRANS], -1, tl.int32)
    base = b.to(tl.int64) * Sq
    for r0 in range(0, Lq, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        row_ok = rows < Lq
        lo = tl.load(KLO + base + rows, mask=row_ok, other=0)
        hi = tl.load(KHI + base + rows, mask=row_ok, other=0)
        sees = row_ok[None, :] & (tl.maximum(lo[None, :], g0[:, None])
                                  < tl.minimum(hi[None, :], g1[:, None]))  # (GRANS, ROWS)
        first = tl.minimum(first, tl.min(tl.where(sees, rows[None, :], _BIG), 1))
        last = tl.maximum(last, tl.max(tl.where(sees, rows[None, :], -1), 1))
    out = b.to(tl.int64) * NG + g
    tl.store(FIRST + out, first, mask=g < NG)
    tl.store(LAST + out, last, mask=g < NG)


@triton.jit(do_not_specialize=_NO_SPEC + ["HKV"])
def _bwd_dkdv_kernel(Q, K, V, DO, MROW, LINV, DELTA, DK, DV, SEQ_Q, SEQ_K, KLO, KHI, KM, FIRST,
                     LAST,
                     stride_qb, stride_qh, stride_qm,
                     stride_kb, stride_kh, stride_kn,
                     stride_vb, stride_vh, stride_vn,
                     stride_db, stride_dh, stride_dm,
                     stride_dkb, stride_dkh, stride_dkn,
                     stride_dvb, stride_dvh, stride_dvn,
                     H, HKV, GROUP, Sq, Sk, D, left, right, G, qk_scale, softcap2, sm_scale,
                     TUNE_KEY, drop_base, drop_thr, drop_rs,
                     HAS_SQ: tl.constexpr, HAS_SK: tl.constexpr, CAUSAL: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     PREC: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BOUNDS: tl.constexpr,
                     KEY_MASK: tl.constexpr, DROPOUT: tl.constexpr):
    """dV = Pᵀ dO, dK = scale · dSᵀ Q for one key block of kv head hk, summed over the GROUP
    query heads that read it and over their query blocks (in transposed form: Sᵀ = K Qᵀ).
    P = exp2(Sᵀ - m) / l and delta from the dQ kernel's row statistics (MROW, LINV, DELTA):
    where a row is one-hot, P is exactly 1 and dS exactly 0, as long as this kernel's Sᵀ and
    dPᵀ = V dOᵀ equal the dQ kernel's S and dP bit for bit (a dot that sums over the head dim
    in a fixed order whatever the tile shape and orientation; _dot).  HAS_SOFTCAP, BOUNDS,
    KEY_MASK as in _fwd_kernel; in bounds mode the query blocks are those holding the rows
    FIRST .. LAST of _bounds_rows_kernel (of the block's granules).  DROPOUT: dV = (P∘Z)ᵀ dO,
    dPᵀ = (V dOᵀ)∘Zᵀ (Zᵀ from the same keys as the dQ kernel's Z)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    Lq, Lk = _lengths(SEQ_Q, SEQ_K, b, Sq, Sk, HAS_SQ, HAS_SK)
    off = Lk - Lq
    b64 = b.to(tl.int64)
    hk64 = hk.to(tl.int64)

    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    cols = offs_n.to(tl.int64)[:, None]
    if KEY_MASK:
        km = tl.load(KM + b64 * Sk + offs_n, mask=offs_n < Lk, other=0) != 0  # (BLOCK_N,)
        km_all = tl.min(km.to(tl.int32), 0) > 0
    else:
        km = offs_n >= 0
        km_all = Lk >= 0
    kv_mask = _kv_mask(offs_n, Lk, d_ok, km, KEY_MASK)
    k = tl.load(K + b64 * stride_kb + hk64 * stride_kh + cols * stride_kn + offs_d[None, :],
                mask=kv_mask, other=0.0)
    v = tl.load(V + b64 * stride_vb + hk64 * stride_vh + cols * stride_vn + offs_d[None, :],
                mask=kv_mask, other=0.0)

    if BOUNDS:
        NG = (Sk + _GRAN - 1) // _GRAN
        gran = start_n // _GRAN + tl.arange(0, BLOCK_N // _GRAN)
        q_first = tl.min(tl.load(FIRST + b64 * NG + gran, mask=gran < NG, other=_BIG), 0)
        q_last = tl.max(tl.load(LAST + b64 * NG + gran, mask=gran < NG, other=-1), 0)
        lo = (q_first // BLOCK_M) * BLOCK_M
        n_win = tl.where(q_last >= q_first, (q_last + 1 - lo + BLOCK_M - 1) // BLOCK_M, 0)
        n_glob = 0 * n_win
    else:
        lo, n_win, n_glob = _query_blocks(start_n, Lq, Lk, off, left, right, G, CAUSAL,
                                          BLOCK_M, BLOCK_N)
    if KEY_MASK:  # every key of the block hidden: dK = dV = 0 at once
        none = tl.max(km.to(tl.int32), 0) == 0
        n_win = tl.where(none, 0, n_win)
        n_glob = tl.where(none, 0, n_glob)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    if DROPOUT:
        kc = _drop_cols(offs_n)
    else:
        kc = offs_n
    # in-tile offsets in int32 (the launcher guarantees BLOCK_M row strides fit): two int64
    # (BLOCK_M, BLOCK_D) tiles held across the loops cost 64 registers, and at D = 128 the
    # non-causal / global-token variant spilled; the tile bases below are int64
    qT_tile = offs_m[None, :] * stride_qm + offs_d[:, None]  # (BLOCK_D, BLOCK_M)
    do_tile = offs_m[:, None] * stride_dm + offs_d[None, :]  # (BLOCK_M, BLOCK_D)
    for gi in range(0, GROUP):
        h64 = hk64 * GROUP + gi
        bh = b64 * H + h64
        q_base = Q + b64 * stride_qb + h64 * stride_qh
        do_base = DO + b64 * stride_db + h64 * stride_dh
        for t in range(0, n_glob + n_win):
            start_m = tl.where(t < n_glob, t * BLOCK_M, lo + (t - n_glob) * BLOCK_M)
            rows = start_m + offs_m
            row_ok = rows < Lq
            m64 = start_m.to(tl.int64)
            # qT (BLOCK_D, BLOCK_M): loaded transposed
            qT = tl.load(q_base + m64 * stride_qm + qT_tile,
                         mask=row_ok[None, :] & d_ok[:, None], other=0.0)
            do = tl.load(do_base + m64 * stride_dm + do_tile,
                         mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            sT, tT = _scores(_dot(k, qT, PREC), qk_scale, softcap2, HAS_SOFTCAP)  # (BN, BM)
            lo_r, hi_r, lo_max, hi_min, _, _ = _row_bounds(KLO, KHI, b, rows, Sq, Lq, Lk,
                                                           BOUNDS, BLOCK_N)
            if not _block_full(start_m, start_n, Lq, Lk, off, left, right, G, lo_max, hi_min,
                               km_all, CAUSAL, BOUNDS, KEY_MASK, BLOCK_M, BLOCK_N):
                ok = _allowed(rows[None, :], offs_n[:, None], off, Lq, Lk, left, right, G,
                              lo_r[None, :], hi_r[None, :], km[:, None], CAUSAL, BOUNDS,
                              KEY_MASK)
                sT = tl.where(ok, sT, _NEG_INF)
            # as in the dq kernel: P = 0 on masked pairs, dS = 0 wherever P = 0.  Unlike there,
            # a non-finite Q / dO row is not kept out of the dots (0 * NaN reaches the other
            # keys of this block): at 255 registers on sm_90 any extra tile spills.  The row
            # statistics are loaded where they are used: three (BLOCK_M,) vectors live across
            # the Sᵀ dot cost 8 registers each and spilled at D = 128
            m2 = tl.load(MROW + bh * Sq + rows, mask=row_ok, other=0.0)
            l_inv = tl.load(LINV + bh * Sq + rows, mask=row_ok, other=0.0)
            pT = tl.where(sT == _NEG_INF, 0.0, tl.exp2(sT - m2[None, :]) * l_inv[None, :])
            if HAS_SOFTCAP:  # dS_raw = dS_capped (1 - t²); pT itself dies at the dV dot
                gT = tl.where(pT == 0.0, 0.0, pT * (1.0 - tT * tT))
            else:
                gT = pT
            if DROPOUT:
                zT = _drop_tile(kc, _drop_rows(drop_base, b, h64, rows, DROPOUT), drop_thr,
                                drop_rs)
                dv += _dot((pT * zT).to(do.dtype), do, PREC)
                dpT = _dot(v, tl.trans(do), PREC) * zT
            else:
                dv += _dot(pT.to(do.dtype), do, PREC)
                dpT = _dot(v, tl.trans(do), PREC)
            delta = tl.load(DELTA + bh * Sq + rows, mask=row_ok, other=0.0)
            dsT = tl.where(gT == 0.0, 0.0, gT * (dpT - delta[None, :]))
            dk += _dot(dsT.to(qT.dtype), tl.trans(qT), PREC)
    dk = dk * sm_scale
    out_mask = (offs_n[:, None] < Sk) & d_ok[None, :]
    tl.store(DK + b64 * stride_dkb + hk64 * stride_dkh + cols * stride_dkn + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=out_mask)
    tl.store(DV + b64 * stride_dvb + hk64 * stride_dvh + cols * stride_dvn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=out_mask)


# ---------------------------------------------------------------- autotuning


def _cfg(m, n, w, s):
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)


def _key_of(c):
    return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages


# (BLOCK_M, BLOCK_N, warps, stages) per config class (_autotune.config_class): the first of a
# class is its default (used without autotuning), chosen from sm_90 / sm_80 compiles at
# D = 128 (benchmarks/sm90_audit.py) as the largest tiles that keep every variant free of
# register spills; the small ones stay for D = 256, where big tiles do not fit.
if _INTERPRET:
    # the interpreter runs every config it is given: one small config
    # (asymmetric blocks, so that a BLOCK_M / BLOCK_N mix-up cannot pass the tests)
    _FWD = {"any": ((32, 64, 4, 1),)}
    _DQ = {"any": ((64, 32, 4, 1),)}
    _DKDV = {"any": ((32, 64, 4, 1),)}
else:
    _FWD = {
        "sm90": ((128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2), (64, 64, 4, 3),
                 (64, 32, 4, 2), (32, 32, 4, 1)),
        "sm80": ((128, 64, 8, 3), (64, 64, 4, 3), (64, 64, 4, 2), (64, 32, 4, 2),
                 (32, 32, 4, 1)),
        # fp32 (FMA): operands must stream through shared memory (>= 2 stages); one stage
        # spilled 450 bytes at D = 128, (64, 64, 4, 3) 900
        "fp32": ((64, 32, 8, 2), (32, 64, 8, 2), (32, 32, 4, 2), (16, 64, 4, 2), (16, 32, 4, 2)),
        # attention dropout on sm_80, D = 128: with softcap and key_mask as well, (128, 64, 8, 3)
        # spilled 16 bytes under triton 3.6 (none without them, none under 3.9); (64, 32, 4, 2)
        # spilled in neither (sm_90 keeps its default: no spill in any dropout variant)
        "sm80_dropout": ((64, 32, 4, 2), (128, 64, 8, 3), (64, 64, 4, 3), (32, 32, 4, 1)),
    }
    _DQ = {
        "sm90": ((128, 64, 8, 2), (64, 64, 4, 2), (128, 32, 4, 3), (64, 32, 4, 2),
                 (32, 32, 4, 1)),
        # (128, 64, 8, 2) spilled 1.7 KB on sm_80 (mma.sync keeps more in registers)
        "sm80": ((64, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2), (64, 128, 8, 2),
                 (32, 32, 4, 1)),
        # fp32: (64, 32, 8, 2) spilled 896 bytes at D = 128 once dQ made two passes (issue 24)
        "fp32": ((32, 32, 8, 2), (64, 32, 8, 2), (16, 64, 4, 2), (16, 32, 4, 2)),
        # attention dropout (the keep-mask tile in both passes), sm_90 compiles at D = 128
        # (triton 3.9), plain / with softcap and key_mask: (128, 64, 8, 2) spilled 16 / 40
        # bytes, (64, 64, 8, 2) 0 / 64, (64, 64, 4, 2) 0 / 16; (64, 32, 4, 2) none
        "sm90_dropout": ((64, 32, 4, 2), (64, 64, 8, 2), (64, 64, 4, 2), (32, 32, 4, 1)),
        # fp32 with dropout (D = 128, sm_90): with softcap and key_mask as well, (32, 32, 8, 2)
        # spilled 312 bytes under triton 3.6; (64, 32, 8, 2) 912 under 3.9 (dropout alone);
        # (16, 32, 8, 2) spilled in no dropout variant under either
        "fp32_dropout": ((16, 32, 8, 2), (32, 32, 8, 2), (16, 64, 4, 2), (16, 32, 4, 2)),
    }
    _DKDV = {
        # (32, 128, 8, 2) and (32, 64, 8, 2): the D = 128 configs that compile for sm_90
        # without spilling registers (the others spill 56-1168 bytes at D = 128)
        "sm90": ((32, 128, 8, 2), (64, 128, 8, 2), (32, 128, 4, 3), (64, 64, 4, 2),
                 (32, 64, 8, 2), (32, 64, 4, 2), (32, 32, 4, 1)),
        # bounds mode (key_bounds: lo / hi loaded per query block): under triton 3.6,
        # (32, 128, 8, 2) spilled 64 bytes at D = 128 (80 with softcap and key_mask as well),
        # (32, 64, 8, 2) 32; one stage did not (the other configs stay for autotuning)
        "sm90_bounds": ((32, 128, 8, 1), (32, 128, 8, 2), (64, 128, 8, 2), (32, 128, 4, 3),
                        (64, 64, 4, 2), (32, 64, 8, 2), (32, 64, 4, 2), (32, 32, 4, 1)),
        # sm_80: every 128-key config spilled 0.7-4.9 KB
        "sm80": ((64, 64, 8, 2), (32, 64, 8, 2), (32, 64, 4, 2), (32, 32, 4, 1)),
        # fp32: K and V stay in registers as FMA operands: 16 x 32 tiles (32 x 32 spilled)
        "fp32": ((16, 32, 8, 2), (32, 16, 8, 2), (16, 32, 4, 2)),
        # attention dropout, sm_90 at D = 128 (triton 3.9): (32, 128, 8, 2) spilled 48 bytes with
        # softcap and key_mask (none without), (32, 64, 8, 2) none in either
        "sm90_dropout": ((32, 64, 8, 2), (32, 128, 8, 2), (32, 64, 4, 2), (32, 32, 4, 1)),
        # sm_80: (64, 64, 8, 2) spilled 8 bytes with softcap and key_mask (triton 3.9);
        # (32, 64, 8, 2) none in any dropout variant under 3.9 or 3.6
        "sm80_dropout": ((32, 64, 8, 2), (64, 64, 8, 2), (32, 64, 4, 2), (32, 32, 4, 1)),
    }


_D256_DEFAULT = (32, 32, 4, 1)


def _prune(kind, table):
    """The configs of the problem's class (dtype, GPU generation) whose tiles fit the device's
    shared memory (count below), the class's default first.  MMCORE_TRITON_AUTOTUNE=0 takes
    the first kept."""

    def prune(configs, named_args, **kwargs):
        bd = kwargs["BLOCK_D"]
        q = named_args["Q"]
        es = q.element_size()
        budget = smem_budget(q.device)
        by_key = {_key_of(c): c for c in configs}
        cls = config_class(q.dtype, q.device)
        order = table.get(cls) or table["any"]
        if kwargs.get("BOUNDS") and cls + "_bounds" in table:
            order = table[cls + "_bounds"]
        if kwargs.get("DROPOUT") and cls + "_dropout" in table:
            order = table[cls + "_dropout"]
        if bd > 128 and cls in ("sm90", "sm80") and kind in ("fwd", "dq") \
                and _D256_DEFAULT in order:
            # D = 256: every larger 16-bit fwd / dQ tile spilled 136-496 bytes per thread
            # (full audit, sm_90 and sm_80, triton 3.9); 32 x 32, 4 warps, 1 stage did not
            order = (_D256_DEFAULT,) + tuple(k for k in order if k != _D256_DEFAULT)
        keep = []
        for key in order:
            c = by_key[key]
            # num_stages buffers of each streamed tile: this count matched the shared memory
            # of sm_90 compiles exactly (16-bit, D = 64..256); the (stages - 1) count used
            # before let D = 256 configs through that need 256-320 KB and cannot launch
            m, n, st = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], max(c.num_stages, 1)
            if kind == "fwd":  # q resident, k/v streamed
                smem = (m + 2 * n * st) * bd * es
            elif kind == "dq":  # q, do resident, k/v streamed
                smem = (2 * m + 2 * n * st) * bd * es
            else:  # k, v resident, q, do streamed
                smem = (2 * n + 2 * m * st) * bd * es
            if smem <= budget:
                keep.append(c)
        return keep or [by_key[order[-1]]]

    return prune


_FIXUP: dict = {}


def _fixup_config(table, kind, q, block_d):
    """(BLOCK_M, BLOCK_N, warps, stages) of the non-finite fix-up pass: the class's first
    config that fits shared memory (the pass is cold: it runs only for flagged row blocks).
    Cached per (kind, dtype, head-dim tile, class, budget): it runs on every launch."""
    key = (kind, q.dtype, block_d, config_class(q.dtype, q.device), smem_budget(q.device))
    hit = _FIXUP.get(key)
    if hit is None:
        configs = [_cfg(*k) for k in dict.fromkeys(k for ks in table.values() for k in ks)]
        hit = _FIXUP[key] = _key_of(_prune(kind, table)(configs, {"Q": q}, BLOCK_D=block_d)[0])
    return hit


def _all(table):
    """Every config of a table once, for the autotuner (the prune picks a class's list)."""
    keys = list(dict.fromkeys(k for ks in table.values() for k in ks))
    return [_cfg(*k) for k in keys]


# (+ the dtypes of the tensor arguments)
_KEY = ["BLOCK_D", "TUNE_KEY", "CAUSAL", "HAS_SOFTCAP", "BOUNDS", "KEY_MASK", "DROPOUT"]
_fwd_tuned = autotune(_all(_FWD), _KEY, _prune("fwd", _FWD))(_fwd_kernel)
_dq_tuned = autotune(_all(_DQ), _KEY, _prune("dq", _DQ))(_bwd_dq_kernel)
_dkdv_tuned = autotune(_all(_DKDV), _KEY, _prune("dkdv", _DKDV))(_bwd_dkdv_kernel)


# ---------------------------------------------------------------- launchers


def _norm_window(left, right, causal):
    left = _UNBOUNDED if left < 0 else left
    right = 0 if causal else (_UNBOUNDED if right < 0 else right)
    return left, right


def _tune_key(Sq, Sk, left, right, G):
    """Coarse autotune bucket: narrow band (< 512 keys per row) or wide."""
    return int(min(Sk, left + right + 1 + G) >= 512)


def _prec(dtype):
    if _INTERPRET:
        return "interp"
    return "ieee" if dtype == torch.float32 else "tf32"


def _block_d(D):
    return max(16, triton.next_power_of_2(D))


def _seq_args(seqlens_q, seqlens_k, q):
    dummy = torch.empty(1, dtype=torch.int64, device=q.device)
    sq = seqlens_q if seqlens_q is not None else dummy
    sk = seqlens_k if seqlens_k is not None else dummy
    return sq, sk


def _num_splits(B, H, Sq, Sk, left, right, G, device, block_n):
    """Split-K factor for decoding: enough programs to fill the GPU (>= 2 blocks each)."""
    span = min(Sk, left + right + Sq + G)
    n_blocks = triton.cdiv(max(span, 1), block_n)
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        want = triton.cdiv(2 * sms, max(B * H, 1))
    else:  # interpreter: a few splits, so the combine path is exercised
        want = 4
    return max(1, min(want, n_blocks // 2, MAX_SPLITS))


# _bounds_rows_kernel: granules per program, rows per step (a (GRANS, ROWS) compare per step)
_GRANS, _ROWS = 16, 64


def _store_dtype(dt):
    """The numpy interpreter (triton 3.9) casts fp32 -> bf16 by truncation where the GPU rounds
    to nearest: under TRITON_INTERPRET bf16 results are stored in fp32 and rounded by torch."""
    return torch.float32 if (_INTERPRET and dt == torch.bfloat16) else dt


def _as_i32(x: int) -> int:
    """A uint32 value as the int32 with the same bits (the kernels bitcast it back)."""
    return x - (1 << 32) if x >= (1 << 31) else x


def dropout_args(dropout_p, seed):
    """-> dict of the kernels' dropout arguments: drop_base (the seed level of
    mmcore/ops/reference/dropout.py's keep, from seed (2,) int64: mix(mix(s1) ^ s0 ^
    0x9E3779B9)), drop_thr (round(p 2^32): u below it is dropped), both int32 bit patterns,
    drop_rs = 1 / (1 - p), and the constexpr DROPOUT.  dropout_p 0: DROPOUT False (the kernels
    compile as without dropout; the scalars are unused)."""
    from mmcore.ops.reference import dropout as ref_dropout  # the mask's one definition

    p = float(dropout_p or 0.0)
    if p <= 0.0:
        return dict(drop_base=0, drop_thr=0, drop_rs=1.0, DROPOUT=False)
    # p in (0, 1) and the seed: validated by mmcore/ops (_validate.dropout_p, draw_seed)
    base = ref_dropout.seed_base(seed)
    thr = ref_dropout.threshold(p)
    rs = 1.0 / (1.0 - p)
    if thr > 0xFFFFFFFF:  # p within 2^-33 of 1: every weight dropped, as the reference's
        thr, rs = 0xFFFFFFFF, 0.0  # u >= 2^32
    return dict(drop_base=_as_i32(base), drop_thr=_as_i32(thr), drop_rs=rs, DROPOUT=True)


def _drop_launch(dropout_p, seed):
    """dropout_args split into the positional scalars and the constexpr."""
    d = dropout_args(dropout_p, seed)
    return (d["drop_base"], d["drop_thr"], d["drop_rs"]), d["DROPOUT"]


def _features(q, Sk, scale, softcap, key_lo, key_hi, key_mask):
    """The SPEC-26 extras as kernel arguments -> (qk_scale, softcap2, klo, khi, km, constexprs).

    softcap c > 0: qk_scale = scale / c and softcap2 = c·log2 e (the kernels' _scores), else
    qk_scale = scale·log2 e.  key_lo / key_hi (B, Sq) int32 (other integer dtypes are clamped
    to [0, Sk] first: the same rows, in range) or None; key_mask (B, Sk) bool -> uint8 or
    None.  Absent features are None pointers (constexpr: the kernels compile as before)."""
    c = float(softcap or 0.0)
    if c > 0.0:
        qk_scale, softcap2 = float(scale) / c, c * LOG2E
    else:
        qk_scale, softcap2 = float(scale) * LOG2E, 0.0
    if (key_lo is None) != (key_hi is None):
        raise ValueError("key_lo and key_hi: give both or neither")
    klo = khi = km = None
    if key_lo is not None:
        klo, khi = (t if t.dtype == torch.int32 else t.clamp(0, Sk).to(torch.int32)
                    for t in (key_lo, key_hi))
        klo, khi = klo.contiguous(), khi.contiguous()
    if key_mask is not None:
        km = key_mask.contiguous().view(torch.uint8) if key_mask.dtype == torch.bool \
            else (key_mask != 0).contiguous().view(torch.uint8)
    flags = dict(HAS_SOFTCAP=c > 0.0, BOUNDS=klo is not None, KEY_MASK=km is not None)
    return qk_scale, softcap2, klo, khi, km, flags


def window_attention_fwd(q, k, v, seqlens_q, seqlens_k, left, right, causal, global_tokens,
                         scale, softcap=0.0, key_lo=None, key_hi=None, key_mask=None,
                         dropout_p=0.0, seed=None):
    """Normalised forward (see mmcore/ops/window_attention.py).

    q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D) with stride(-1) == 1; left/right >= -1 (-1 =
    unbounded); seqlens int64 (B,) or None.  softcap: c > 0 caps the scores to c·tanh(s / c)
    (0 = off); key_lo / key_hi: int32 (B, Sq) key bounds (bounds mode: row i sees keys
    lo <= j < hi; left = right = -1, causal False, global_tokens 0) or None; key_mask: bool
    (B, Sk), False = key never seen, or None.  dropout_p in [0, 1), seed (2,) int64 (CPU)
    when dropout_p > 0: the weights dropped by mmcore/ops/reference/dropout.py's mask (element
    (b, h, i, j): indices into these tensors), kept ones scaled by 1 / (1 - p).  Returns out
    (B, Hq, Sq, D) in q.dtype (contiguous) and lse (B, Hq, Sq) float32 (natural log over the
    capped, un-dropped scores, -inf for rows that see nothing)."""
    B, H, Sq, D = q.shape
    HKV, Sk = k.shape[1], k.shape[2]
    out = torch.empty((B, H, Sq, D), dtype=_store_dtype(q.dtype), device=q.device)
    lse = torch.empty((B, H, Sq), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or lse.numel() == 0:
        return out.to(q.dtype), lse
    if Sk == 0:
        return out.zero_().to(q.dtype), lse.fill_(float("-inf"))
    left, right = _norm_window(left, right, causal)
    G = int(global_tokens)
    BLOCK_D = _block_d(D)
    sq, sk = _seq_args(seqlens_q, seqlens_k, q)
    qk_scale, softcap2, klo, khi, km, feats = _features(q, Sk, scale, softcap, key_lo, key_hi,
                                                        key_mask)
    drop, has_drop = _drop_launch(dropout_p, seed)
    common = dict(HAS_SQ=seqlens_q is not None, HAS_SK=seqlens_k is not None,
                  CAUSAL=bool(causal), BLOCK_D=BLOCK_D, PREC=_prec(q.dtype), DROPOUT=has_drop,
                  **feats)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2))

    if Sq <= DECODE_MAX_SQ:
        # decoding / tiny query blocks: one 16-row query block, split-K over the keys
        BM, BN = 16, (32 if _INTERPRET else (64 if BLOCK_D <= 128 else 32))
        ns = _num_splits(B, H, Sq, Sk, left, right, G, q.device, BN)
        warps = 4
        if ns == 1:
            _fwd_kernel[(1, B * H, 1)](
                q, k, v, out, lse, sq, sk, lse, klo, khi, km, *strides,
                out.stride(0), out.stride(1), 0, out.stride(2), lse.stride(0), lse.stride(1), 0,
                H, H // HKV, Sq, Sk, D, left, right, G, qk_scale, softcap2, 0, 1, *drop,
                BLOCK_M=BM, BLOCK_N=BN, SPLIT_K=False, FLAGS=0, num_warps=warps,
                num_stages=2, **common)
            return out.to(q.dtype), lse
        o_part = torch.empty((B, H, ns, Sq, D), dtype=torch.float32, device=q.device)
        l_part = torch.empty((B, H, ns, Sq), dtype=torch.float32, device=q.device)
        _fwd_kernel[(1, B * H, ns)](
            q, k, v, o_part, l_part, sq, sk, l_part, klo, khi, km, *strides,
            o_part.stride(0), o_part.stride(1), o_part.stride(2), o_part.stride(3),
            l_part.stride(0), l_part.stride(1), l_part.stride(2),
            H, H // HKV, Sq, Sk, D, left, right, G, qk_scale, softcap2, 0, ns, *drop,
            BLOCK_M=BM, BLOCK_N=BN, SPLIT_K=True, FLAGS=0, num_warps=warps, num_stages=2,
            **common)
        _combine_kernel[(Sq, B * H)](o_part, l_part, out, lse, Sq, D, ns,
                                     BLOCK_S=MAX_SPLITS, BLOCK_D=BLOCK_D)
        return out.to(q.dtype), lse

    grid = lambda meta: (triton.cdiv(Sq, meta["BLOCK_M"]), B * H, 1)  # noqa: E731
    flag = torch.empty((B * H, Sq), dtype=torch.int8, device=q.device)
    args = (q, k, v, out, lse, sq, sk, flag, klo, khi, km, *strides,
            out.stride(0), out.stride(1), 0, out.stride(2), lse.stride(0), lse.stride(1), 0,
            H, H // HKV, Sq, Sk, D, left, right, G, qk_scale, softcap2,
            _tune_key(Sq, Sk, left, right, G), 1, *drop)
    _fwd_tuned[grid](*args, SPLIT_K=False, FLAGS=1, **common)
    bm, bn, w, st = _fixup_config(_FWD, "fwd", q, BLOCK_D)
    _fwd_kernel[(triton.cdiv(Sq, bm), B * H, 1)](
        *args, SPLIT_K=False, FLAGS=2, BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st,
        **common)
    return out.to(q.dtype), lse


def window_attention_bwd(dout, q, k, v, out, lse, seqlens_q, seqlens_k, left, right, causal,
                         global_tokens, scale, softcap=0.0, key_lo=None, key_hi=None,
                         key_mask=None, dropout_p=0.0, seed=None):
    """Normalised backward: -> dq, dk, dv (contiguous, input dtypes).  Deterministic.
    softcap, key_lo, key_hi, key_mask, dropout_p, seed as in window_attention_fwd (the same
    seed regenerates the forward's mask).  out and lse (the
    forward's) are not read: the dQ kernel recomputes each row's max, sum and
    delta = rowsum(P dP) from the scores (exact gradients at large logits, issue 24)."""
    B, H, Sq, D = q.shape
    HKV, Sk = k.shape[1], k.shape[2]
    dq = torch.empty((B, H, Sq, D), dtype=_store_dtype(q.dtype), device=q.device)
    dk = torch.empty((B, HKV, Sk, D), dtype=_store_dtype(k.dtype), device=k.device)
    dv = torch.empty((B, HKV, Sk, D), dtype=_store_dtype(v.dtype), device=v.device)
    if Sq == 0 or Sk == 0 or B * H * D == 0:
        return dq.zero_().to(q.dtype), dk.zero_().to(k.dtype), dv.zero_().to(v.dtype)
    left, right = _norm_window(left, right, causal)
    G = int(global_tokens)
    BLOCK_D = _block_d(D)
    sq, sk = _seq_args(seqlens_q, seqlens_k, q)
    lse = lse.contiguous()
    # the dK/dV kernel computes offsets inside a query tile in int32 (row index < 128 times the
    # row stride): rows further apart than 2^24 elements are copied first
    if max(q.stride(2), dout.stride(2)) >= _ROW_STRIDE_LIMIT:
        q, dout = q.contiguous(), dout.contiguous()
    qk_scale, softcap2, klo, khi, km, feats = _features(q, Sk, scale, softcap, key_lo, key_hi,
                                                        key_mask)
    drop, has_drop = _drop_launch(dropout_p, seed)
    flags = dict(HAS_SQ=seqlens_q is not None, HAS_SK=seqlens_k is not None,
                 CAUSAL=bool(causal), BLOCK_D=BLOCK_D, PREC=_prec(q.dtype), DROPOUT=has_drop,
                 **feats)

    # per row, written by the dQ kernel's first pass for its second and the dK/dV kernel:
    # delta = rowsum(P dP), the row max of S (log2 units) and 1 / sum exp2(S - max)
    delta, mrow, linv = (torch.empty((B, H, Sq), dtype=torch.float32, device=q.device)
                         for _ in range(3))

    tk = _tune_key(Sq, Sk, left, right, G)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2),
               dout.stride(0), dout.stride(1), dout.stride(2))
    grid_q = lambda meta: (triton.cdiv(Sq, meta["BLOCK_M"]), B * H)  # noqa: E731
    flag = torch.empty((B * H, Sq), dtype=torch.int8, device=q.device)
    args = (q, k, v, dout, delta, mrow, linv, dq, sq, sk, flag, klo, khi, km, *strides,
            dq.stride(0), dq.stride(1), dq.stride(2),
            H, H // HKV, Sq, Sk, D, left, right, G, qk_scale, softcap2, float(scale), tk, *drop)
    _dq_tuned[grid_q](*args, FLAGS=1, **flags)
    bm, bn, w, st = _fixup_config(_DQ, "dq", q, BLOCK_D)
    _bwd_dq_kernel[(triton.cdiv(Sq, bm), B * H)](
        *args, FLAGS=2, BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st, **flags)
    first = last = None
    if klo is not None:  # bounds mode: the query rows that see each granule of GRAN keys
        ng = triton.cdiv(Sk, GRAN)
        first = torch.empty((B, ng), dtype=torch.int32, device=q.device)
        last = torch.empty((B, ng), dtype=torch.int32, device=q.device)
        _bounds_rows_kernel[(triton.cdiv(ng, _GRANS), B)](
            klo, khi, sq, sk, first, last, Sq, Sk, HAS_SQ=seqlens_q is not None,
            HAS_SK=seqlens_k is not None, GRANS=_GRANS, ROWS=_ROWS)
    grid_k = lambda meta: (triton.cdiv(Sk, meta["BLOCK_N"]), B * HKV)  # noqa: E731
    _dkdv_tuned[grid_k](
        q, k, v, dout, mrow, linv, delta, dk, dv, sq, sk, klo, khi, km, first, last, *strides,
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        H, HKV, H // HKV, Sq, Sk, D, left, right, G, qk_scale, softcap2, float(scale), tk,
        *drop, **flags)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
