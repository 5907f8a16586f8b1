"""Triton kernels of lora_linear: fused base GEMM + low-rank term, SGMV-style multi-adapter.

Normalised operands (mmcore/ops/lora_linear.py):
    x (M, K), weight (N, K), bias (N,) | None, lora_a (A, r, K), lora_b (A, N, r),
    scaling (A,) fp32, adapter_ids (M,) int64 in [-1, A) | None (None: all rows adapter 0).

One kernel, ``_lora_mm_kernel``, computes for a tile of rows that all use one adapter ``a``

    out[m, j] = sum_i X[m, i] Wop[i, j] (+ bias[j]) + s_a * sum_r T[m, r] Lop_a[r, j],
    T[m, r]   = sum_i X[m, i] Aop_a[i, r]     (accumulated in the same i loop: FUSE_T)

which is the forward (X = x, Wop = Wᵀ, Aop = Aᵀ, Lop = Bᵀ) and also dx of the backward
(X = dy, Wop = W, Aop = B, Lop = A) -- one read of X and W, no (M, N) intermediate.  With a
large rank T does not fit in registers next to the base accumulator: it is then computed
first by ``_rows_lowrank_kernel`` (an (M, r) fp32 buffer) and read back in the epilogue.

Multi-adapter (SGMV): rows are sorted by adapter id once per call (stable torch.sort), every
adapter's rows form a segment, and segments are cut into BLOCK_M tiles, so a tile holds one
adapter's rows (the last tile of a segment is padded with masked rows).  The tile table
(adapter, first, end) is built on the device with torch ops -- no host sync -- for an upper
bound of tiles; tiles past the end are empty and return at once.  Kernels gather x rows and
scatter output rows through the permutation (pointer indirection), no copies.  Tiles of
adapter -1 (base only) skip the low-rank term.

Backward for a frozen base (never dW):
    dx = dy W + s (dy B) A      -> ``_lora_mm_kernel`` (T = dy B written once for dA)
    dA = s (dy B)ᵀ x            -> ``_seg_outer_kernel`` per adapter segment
    dBᵀ = s (x Aᵀ)ᵀ dy          -> ``_rows_lowrank_kernel`` (x Aᵀ) + ``_seg_outer_kernel``
The segment reductions are split over rows (SPLIT programs per output tile, fp32 partials
summed afterwards: deterministic, no atomics).

An optional per-output-column scale c (col_scale, DoRA's magnitude over the weight norm) is
applied in the epilogue: out = c ⊙ acc + bias, the bracket acc optionally stored too (it is
what d c needs).  The backward needs nothing new: dy ⊙ c (made by the op) feeds it.  W's
strides are free: a Conv1D weight (K, N) is read through its transposed view, no copy.

fp16 / bf16 accumulate in fp32; fp32 inputs use ``input_precision="ieee"`` (true fp32, no tf32).
All row / column offsets are int64.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._autotune import autotune, config_class, smem_budget

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
INTERPRET_UPCAST = tl.constexpr(_INTERPRET)


# ------------------------------------------------------------------ jit helpers


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if INTERPRET_UPCAST:
        # the numpy interpreter (triton 3.9) multiplies bf16 tiles as raw bits: upcast
        # (bf16 / fp16 products are exact in fp32, as on the tensor cores)
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _dot_acc(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b, accumulated in place (wgmma / mma write into acc: no second (M, N)
    fp32 tile, which at 128x256 would not fit the registers next to acc)."""
    if INTERPRET_UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _hi_lo(t, dtype: tl.constexpr):
    """fp32 t = hi + lo, both in `dtype` (bf16 x bf16 products are exact in fp32, so two
    tensor-core products with hi and lo keep t at ~fp32 accuracy)."""
    hi = t.to(dtype)
    return hi, (t - hi.to(tl.float32)).to(dtype)


@triton.jit
def _dot_hi_lo_acc(a, b, acc, IEEE: tl.constexpr):
    """acc + a (fp32) @ b (any dtype) at ~fp32 accuracy, both products straight into acc."""
    if IEEE:
        return _dot_acc(a, b, acc, IEEE)
    else:
        hi, lo = _hi_lo(a, b.dtype)
        return _dot_acc(lo, b, _dot_acc(hi, b, acc, IEEE), IEEE)


@triton.jit
def _tile_rows(TILES, PERM, pid_m, M, BLOCK_M: tl.constexpr, HAS_MAP: tl.constexpr):
    """-> (adapter, rows (BLOCK_M,) int64, row mask, empty) of row tile pid_m."""
    offs = tl.arange(0, BLOCK_M).to(tl.int64)
    if HAS_MAP:
        adapter = tl.load(TILES + pid_m * 3)
        lo = tl.load(TILES + pid_m * 3 + 1)
        hi = tl.load(TILES + pid_m * 3 + 2)
        p = lo + offs
        rmask = p < hi
        rows = tl.load(PERM + p, mask=rmask, other=0)
    else:
        adapter = tl.zeros((), dtype=tl.int64)
        lo = pid_m.to(tl.int64) * BLOCK_M
        hi = M
        rows = lo + offs
        rmask = rows < M
    return adapter, rows, rmask, lo >= hi


# sizes are runtime values: one compile serves every M and rank (the row count and rank only
# bound loops and row masks).  N and K keep Triton's divisibility-by-16 hint: they bound the
# masks along the contiguous dims, and without the hint masked loads / stores are not
# vectorised; a model whose widths are multiples of 16 compiles once per flag set.
@triton.jit(do_not_specialize=["M", "R", "NUM_TILES", "sln", "stm", "N_KEY", "K_KEY",
                               "M_BUCKET"])
def _lora_mm_kernel(
    X, W, BIAS, AOP, LOP, S, OUT, T_BUF, PERM, TILES, IDS, CS, PRE,
    M, N, K, R, NUM_TILES,
    sxm, sxk, swk, swn, saa, sak, sar, sla, slr, sln, som, son, stm,
    N_KEY, K_KEY, M_BUCKET,
    HAS_BIAS: tl.constexpr, HAS_CS: tl.constexpr, WRITE_PRE: tl.constexpr,
    HAS_MAP: tl.constexpr, FUSE_T: tl.constexpr,
    WRITE_T: tl.constexpr, PER_ROW: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    # grouped launch order: GROUP_M row tiles share the W column tiles they read (L2)
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    group_m = tl.minimum(NUM_TILES - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_m
    pid_n = (pid % in_group) // group_m

    adapter, rows, rmask, empty = _tile_rows(TILES, PERM, pid_m, M, BLOCK_M, HAS_MAP)
    if empty:
        return
    lora = adapter >= 0
    a64 = tl.maximum(adapter, 0).to(tl.int64)
    r_eff = tl.where(lora, R, 0)  # rank 0 for base-only tiles: A loads are masked off

    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    offs_k64 = offs_k.to(tl.int64)  # times a row stride (dx: W's), which may be large
    offs_r = tl.arange(0, BLOCK_R)
    x_ptrs = X + rows[:, None] * sxm + offs_k64[None, :] * sxk
    w_ptrs = W + offs_k64[:, None] * swk + offs_n[None, :] * swn
    a_ptrs = AOP + a64 * saa + offs_k64[:, None] * sak + offs_r.to(tl.int64)[None, :] * sar
    x_step = tl.cast(sxk, tl.int64) * BLOCK_K
    w_step = tl.cast(swk, tl.int64) * BLOCK_K
    a_step = tl.cast(sak, tl.int64) * BLOCK_K

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kmask = (k0 + offs_k) < K
        xt = tl.load(x_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
        wt = tl.load(w_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)
        acc += _dot(xt, wt, IEEE)
        if FUSE_T:
            at = tl.load(a_ptrs, mask=kmask[:, None] & (offs_r[None, :] < r_eff), other=0.0)
            t += _dot(xt, at, IEEE)
            a_ptrs += a_step
        x_ptrs += x_step
        w_ptrs += w_step

    if PER_ROW:
        # few rows, many adapters: rows in natural order, each row's own B gathered in the
        # epilogue (T = x Aᵀ per row precomputed by _rows_gather_kernel)
        rid = tl.load(IDS + rows, mask=rmask, other=-1)
        ok = rmask & (rid >= 0)
        ridc = tl.maximum(rid, 0).to(tl.int64)
        srow = tl.load(S + ridc, mask=ok, other=0.0)
        for r in range(0, R):
            tt = tl.load(T_BUF + rows * stm + r, mask=ok, other=0.0) * srow
            bt = tl.load(LOP + ridc[:, None] * sla + r * slr + offs_n[None, :] * sln,
                         mask=ok[:, None] & nmask[None, :], other=0.0)
            acc += tt[:, None] * bt.to(tl.float32)
    elif lora:
        s = tl.load(S + a64)
        if FUSE_T:
            if WRITE_T:
                if pid_n == 0:
                    tl.store(T_BUF + rows[:, None] * stm + offs_r[None, :], t,
                             mask=rmask[:, None] & (offs_r[None, :] < R))
            lt = tl.load(LOP + a64 * sla + offs_r[:, None] * slr + offs_n[None, :] * sln,
                         mask=(offs_r[:, None] < R) & nmask[None, :], other=0.0)
            # (s T) Lop accumulated straight into acc: a separate (BLOCK_M, BLOCK_N) fp32
            # product tile spilled registers at 128x256 / 128x128 (sm_90 compile: 255 regs,
            # 400-680 bytes of stack); with the product into acc: no stack
            acc = _dot_hi_lo_acc(t * s, lt, acc, IEEE)
        else:
            # T precomputed (M, R) fp32: the epilogue walks the rank in BLOCK_R chunks
            for r0 in range(0, R, BLOCK_R):
                rr = r0 + offs_r
                tt = tl.load(T_BUF + rows[:, None] * stm + rr[None, :],
                             mask=rmask[:, None] & (rr[None, :] < R), other=0.0)
                lt = tl.load(LOP + a64 * sla + rr[:, None] * slr + offs_n[None, :] * sln,
                             mask=(rr[:, None] < R) & nmask[None, :], other=0.0)
                acc = _dot_hi_lo_acc(tt * s, lt, acc, IEEE)
    omask = rmask[:, None] & nmask[None, :]
    if WRITE_PRE:  # the bracket of c ⊙ (x Wᵀ + LoRA) + b, for d col_scale (same strides)
        tl.store(PRE + rows[:, None] * som + offs_n[None, :] * son,
                 acc.to(PRE.dtype.element_ty), mask=omask)
    if HAS_CS:  # per-output-column scale (DoRA's magnitude / weight norm), fp32
        acc = acc * tl.load(CS + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(OUT + rows[:, None] * som + offs_n[None, :] * son,
             acc.to(OUT.dtype.element_ty), mask=omask)


@triton.jit(do_not_specialize=["M", "R", "stm"])
def _rows_lowrank_kernel(
    X, AOP, T_BUF, PERM, TILES, M, K, R,
    sxm, sxk, saa, sak, sar, stm,
    HAS_MAP: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """T[m, r] = sum_k X[m, k] Aop_a[k, r] (fp32) for the rows of tile pid 0, rank chunk pid 1.
    Base-only tiles (adapter -1) are skipped: nothing reads their rows of T."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    adapter, rows, rmask, empty = _tile_rows(TILES, PERM, pid_m, M, BLOCK_M, HAS_MAP)
    if empty:
        return
    if adapter < 0:
        return
    a64 = adapter.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_k64 = offs_k.to(tl.int64)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    x_ptrs = X + rows[:, None] * sxm + offs_k64[None, :] * sxk
    a_ptrs = AOP + a64 * saa + offs_k64[:, None] * sak + offs_r.to(tl.int64)[None, :] * sar
    x_step = tl.cast(sxk, tl.int64) * BLOCK_K
    a_step = tl.cast(sak, tl.int64) * BLOCK_K
    t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kmask = (k0 + offs_k) < K
        xt = tl.load(x_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
        at = tl.load(a_ptrs, mask=kmask[:, None] & (offs_r[None, :] < R), other=0.0)
        t += _dot(xt, at, IEEE)
        x_ptrs += x_step
        a_ptrs += a_step
    tl.store(T_BUF + rows[:, None] * stm + offs_r[None, :], t,
             mask=rmask[:, None] & (offs_r[None, :] < R))


@triton.jit(do_not_specialize=["R", "stm"])
def _rows_gather_kernel(
    X, AOP, IDS, T_BUF, K, R, sxm, sxk, saa, sak, sar, stm,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """T[m, r] = sum_k X[m, k] Aop_{ids[m]}[k, r] (fp32), one row per program (few rows)."""
    m = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1)
    a = tl.load(IDS + m)
    if a < 0:
        return
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k.to(tl.int64)
        xt = tl.load(X + m * sxm + kk * sxk, mask=kk < K, other=0.0).to(tl.float32)
        at = tl.load(AOP + a.to(tl.int64) * saa + kk[None, :] * sak
                     + offs_r.to(tl.int64)[:, None] * sar,
                     mask=(kk[None, :] < K) & (offs_r[:, None] < R), other=0.0)
        acc += at.to(tl.float32) * xt[None, :]
    tl.store(T_BUF + m * stm + offs_r, tl.sum(acc, 1), mask=offs_r < R)


# I is the rank (P is an (M, r) low-rank buffer): it and P's row stride are runtime values,
# so every rank up to BLOCK_I shares a compile; J (K or N, the contiguous dim of Q and OUT)
# keeps the divisibility hint
@triton.jit(do_not_specialize=["M", "I", "NA", "spm", "SPLIT"])
def _seg_outer_kernel(
    P, Q, OUT, PERM, SEG_START, SEG_COUNT, S,
    M, I, J, NA,
    spm, spi, sqm, sqj, SPLIT,
    HAS_MAP: tl.constexpr, CAST_P: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """OUT[split, a, i, j] = s_a * sum over rows m of adapter a (this split's share)
    of P[m, i] Q[m, j].  Grid: (NA * tiles_i * tiles_j, SPLIT)."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n_i = tl.cdiv(I, BLOCK_I)
    n_j = tl.cdiv(J, BLOCK_J)
    a = pid // (n_i * n_j)
    rest = pid % (n_i * n_j)
    pid_i = rest // n_j
    pid_j = rest % n_j
    if HAS_MAP:  # segment a + 1 holds adapter a's rows (segment 0: id -1)
        lo = tl.load(SEG_START + a + 1)
        hi = lo + tl.load(SEG_COUNT + a + 1)
    else:
        lo = 0
        hi = M
    offs_i = pid_i.to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_j = pid_j.to(tl.int64) * BLOCK_J + tl.arange(0, BLOCK_J)
    imask = offs_i < I
    jmask = offs_j < J
    offs_m = tl.arange(0, BLOCK_M).to(tl.int64)
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    for p0 in range(lo + split * BLOCK_M, hi, BLOCK_M * SPLIT):
        p = p0 + offs_m
        pm = p < hi
        if HAS_MAP:
            rows = tl.load(PERM + p, mask=pm, other=0)
        else:
            rows = p
        pt = tl.load(P + rows[:, None] * spm + offs_i[None, :] * spi,
                     mask=pm[:, None] & imask[None, :], other=0.0)
        qt = tl.load(Q + rows[:, None] * sqm + offs_j[None, :] * sqj,
                     mask=pm[:, None] & jmask[None, :], other=0.0)
        if CAST_P:  # P is the fp32 low-rank buffer, Q the 16-bit input
            acc = _dot_hi_lo_acc(tl.trans(pt), qt, acc, IEEE)
        else:
            acc = _dot_acc(tl.trans(pt), qt, acc, IEEE)
    s = tl.load(S + a)
    base = (split * NA + a).to(tl.int64) * I * J
    tl.store(OUT + base + offs_i[:, None] * J + offs_j[None, :], acc * s,
             mask=imask[:, None] & jmask[None, :])


# ------------------------------------------------------------------ autotuning


def _cfg(bn, bk, w, st, gm=8):
    return triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": gm}, num_warps=w,
                         num_stages=st)


def _mm_configs():
    if _INTERPRET:
        return [_cfg(64, 64, 4, 1, gm=4)]
    return [_cfg(*c) for c in ((128, 64, 4, 4), (128, 64, 8, 3), (256, 64, 8, 3), (64, 64, 4, 4),
                               (128, 128, 8, 3), (64, 128, 4, 4), (256, 32, 8, 4),
                               (128, 32, 4, 5), (64, 32, 4, 3), (128, 64, 4, 3),
                               (64, 64, 8, 3))]


def _default_config(bm, cls, br=16, has_map=False, write_t=False, write_pre=False):
    """(BLOCK_N, BLOCK_K, num_warps, num_stages) used without autotuning (first after prune),
    for config class `cls` (_autotune.config_class); each compiles without spills for sm_90 /
    sm_80 (benchmarks/sm90_audit.py)."""
    if cls == "fp32":
        return 64, 32, 4, 3
    if write_pre and bm >= 128:
        # the col_scale epilogue storing the bracket too (DoRA training): a second converted
        # (BLOCK_M, BLOCK_N) tile; (256, 32, 8, 4) spilled 40 bytes on sm_90
        return 128, 64, 8, 3
    if cls == "sm80" and bm >= 128:
        # mma.sync keeps more in registers: (256, 32, 8, 4) spilled 3.5 KB on sm_80; the
        # multi-adapter dx (ids + T written) 16 bytes at 128 x 128
        return (64, 64, 8, 3) if (has_map and write_t) else (128, 64, 8, 3)
    if bm >= 128 and br <= 32:  # what the autotuner picked on an H100 at M=8192 (4096², 768x3072)
        # (the multi-adapter dx spilled 24 bytes with it on sm_90)
        return (128, 64, 8, 3) if (has_map and write_t) else (256, 32, 8, 4)
    if bm >= 128:  # unfused rank chunks of 64 in the epilogue: 8 warps (4 spilled, sm_90)
        return 128, 64, 8, 3
    return 128, 64, 4, 3


def _acc_regs(bm, c, br, per_row, fused):
    """fp32 registers per thread that the (BLOCK_M, BLOCK_N) accumulator and the epilogue's
    low-rank operands take (rough: the tile elements over the threads)."""
    threads = 32 * c.num_warps
    regs = bm * c.kwargs["BLOCK_N"]
    if per_row:
        regs *= 3  # a gathered (BLOCK_M, BLOCK_N) tile of B per rank step and its product
    else:
        regs += bm * (br if fused else 2 * br)  # T (+ its hi / lo halves unfused)
    return regs // threads


def _smem(bm, c, br, fused, es):
    """Shared memory of the K loop's pipeline: every stage holds an x, a W (and an A) tile."""
    bn, bk = c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
    return max(c.num_stages, 1) * (bm * bk + bk * bn + (bk * br if fused else 0)) * es


def _prune(configs, named_args, **kwargs):
    """Keep configs whose tiles fit: 16-bit tensor-core tiles up to ~160 accumulator
    registers per thread (sm_90 compiles of the ones above spilled), fp32 (no tensor cores,
    operands in registers too) up to 64x64 tiles with BLOCK_K <= 32, and the pipeline within
    the device's shared memory.  The default config comes first."""
    N = named_args["N"]
    x = named_args["X"]
    bm = kwargs.get("BLOCK_M", 128)
    br = kwargs.get("BLOCK_R", 16)
    per_row, fused = kwargs.get("PER_ROW", False), kwargs.get("FUSE_T", True)
    budget = smem_budget(x.device)
    keep = [c for c in configs if c.kwargs["BLOCK_N"] <= max(64, triton.next_power_of_2(N))
            and _smem(bm, c, br, fused and not per_row, x.element_size()) <= budget]
    if x.dtype == torch.float32:
        keep = [c for c in keep if c.kwargs["BLOCK_N"] * bm <= 64 * 64
                and c.kwargs["BLOCK_K"] <= 32]
    else:
        keep = [c for c in keep if _acc_regs(bm, c, br, per_row, fused) <= 160]
    default = _default_config(bm, config_class(x.dtype, x.device), br,
                              kwargs.get("HAS_MAP", False), kwargs.get("WRITE_T", False),
                              kwargs.get("WRITE_PRE", False))
    keep.sort(key=lambda c: (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps,
                             c.num_stages) != default)  # stable: the default first
    return keep or configs[-1:]


def _bucket(n):
    """Autotune bucket of a width: the next power of two (one tuning per bucket)."""
    return triton.next_power_of_2(max(int(n), 16))


_lora_mm = autotune(
    _mm_configs(),
    ["N_KEY", "K_KEY", "M_BUCKET", "BLOCK_M", "BLOCK_R", "FUSE_T", "HAS_MAP", "WRITE_T",
     "PER_ROW", "HAS_CS", "WRITE_PRE"],
    None if _INTERPRET else _prune,
)(_lora_mm_kernel)


# ------------------------------------------------------------------ launchers

MAX_FUSED_RANK = 64  # above this, T = x Aᵀ is precomputed instead of riding in the K loop


def _block_r(r):
    return max(16, triton.next_power_of_2(r))


def _block_m(M, dtype=torch.bfloat16):
    if _INTERPRET or dtype == torch.float32:  # fp32: no tensor cores, 64-row tiles at most
        return 16 if M <= 16 else 32 if M <= 32 else 64
    return 16 if M <= 16 else 32 if M <= 32 else 64 if M <= 64 else 128


def _ieee(dtype):
    return dtype == torch.float32


class Segments:
    """Rows grouped by adapter, once per call (SGMV): perm (M,) sorted position -> row,
    seg_start / seg_count (A + 1,) per segment (segment 0: id -1, segment a + 1: adapter a),
    tiles (T, 3) int64 [adapter, first, end) in sorted positions for row tile size block_m.
    With adapter_ids None all of it is None (rows map to themselves, adapter 0)."""

    def __init__(self, ids, A, M, block_m, device):
        self.block_m = block_m
        self.n_tiles = triton.cdiv(M, block_m)
        self.has_map = ids is not None
        self.perm = self.tiles = self.seg_start = self.seg_count = None
        if ids is None:
            return
        _, perm = torch.sort(ids, stable=True)
        counts = torch.zeros(A + 1, dtype=torch.int64, device=device).scatter_add_(
            0, ids + 1, torch.ones_like(ids))  # (A + 1,) (bincount would sync on CUDA)
        start = torch.cumsum(counts, 0) - counts
        ntile = (counts + block_m - 1) // block_m
        tile_end = torch.cumsum(ntile, 0)
        # upper bound of tiles without reading counts on the host: one partial tile per
        # non-empty segment beyond the full ones
        T = triton.cdiv(M, block_m) + min(A + 1, M)
        t = torch.arange(T, device=device)
        seg = torch.searchsorted(tile_end, t, right=True)
        valid = seg <= A
        segc = seg.clamp(max=A)
        lo = start[segc] + (t - (tile_end[segc] - ntile[segc])) * block_m
        hi = torch.where(valid, start[segc] + counts[segc], lo)
        self.tiles = torch.stack([segc - 1, lo, hi], 1).contiguous()
        self.perm = perm.contiguous()
        self.seg_start, self.seg_count = start.contiguous(), counts.contiguous()
        self.n_tiles = T


def _lowrank_rows(X, aop, a_strides, R, seg, M, Kdim):
    """T (M, R) fp32: T[m] = X[m] @ Aop_{adapter(m)} (rows of adapter -1 left unset)."""
    T = torch.empty(M, R, device=X.device, dtype=torch.float32)
    br = min(_block_r(R), 64)
    bk = 64 if _INTERPRET else (64 if br <= 32 else 32)
    grid = (seg.n_tiles, triton.cdiv(R, br))
    _rows_lowrank_kernel[grid](
        X, aop, T, seg.perm, seg.tiles, M, Kdim, R,
        X.stride(0), X.stride(1), *a_strides, T.stride(0),
        HAS_MAP=seg.has_map, IEEE=_ieee(X.dtype),
        BLOCK_M=seg.block_m, BLOCK_K=bk, BLOCK_R=br,
        num_warps=4, num_stages=1 if _INTERPRET else 3,
    )
    return T


def _fused_mm(X, Wop, w_strides, bias, aop, a_strides, lop, l_strides, scaling, seg,
              M, Nout, Kdim, R, want_t=False, per_row_ids=None, col_scale=None,
              want_pre=False):
    """out (M, Nout) = c ⊙ (X @ Wop + s_a (X @ Aop_a) @ Lop_a) (+ bias) per row (c: the
    optional col_scale (Nout,) fp32, else 1); also returns T = X @ Aop (fp32, (M, R)) when
    want_t (for the backward's dA), and with want_pre the bracket pre (M, Nout) (else None)."""
    # the numpy interpreter (triton 3.9) casts fp32 -> bf16 by truncation, the GPU rounds to
    # nearest: under the interpreter bf16 results are stored in fp32 and rounded by torch
    trunc = _INTERPRET and X.dtype == torch.bfloat16
    out = torch.empty(M, Nout, device=X.device, dtype=torch.float32 if trunc else X.dtype)
    pre = torch.empty_like(out) if want_pre else None
    br = _block_r(R)
    fuse = br <= MAX_FUSED_RANK
    force = os.environ.get("MMCORE_LORA_FUSE")  # "0" / "1": force a path (measurements)
    if force in ("0", "1"):
        fuse = force == "1" and br <= 128
    T = None
    if per_row_ids is not None:
        fuse = False
        T = torch.empty(M, R, device=X.device, dtype=torch.float32)
        brr = min(_block_r(R), 64)
        _rows_gather_kernel[(M, triton.cdiv(R, brr))](
            X, aop, per_row_ids, T, Kdim, R, X.stride(0), X.stride(1), *a_strides,
            T.stride(0), BLOCK_K=64 if brr <= 32 else 32, BLOCK_R=brr, num_warps=4)
        br = 16
    elif not fuse:
        T = _lowrank_rows(X, aop, a_strides, R, seg, M, Kdim)
        br = 64
    elif want_t:
        T = torch.empty(M, R, device=X.device, dtype=torch.float32)
    bm = seg.block_m
    grid = lambda meta: (seg.n_tiles * triton.cdiv(Nout, meta["BLOCK_N"]),)  # noqa: E731
    dummy = out
    _lora_mm[grid](
        X, Wop, bias if bias is not None else dummy, aop, lop, scaling, out,
        T if T is not None else dummy, seg.perm if seg.has_map else dummy,
        seg.tiles if seg.has_map else dummy,
        per_row_ids if per_row_ids is not None else dummy,
        col_scale if col_scale is not None else dummy, pre if pre is not None else dummy,
        M, Nout, Kdim, R, seg.n_tiles,
        X.stride(0), X.stride(1), *w_strides, *a_strides, *l_strides,
        out.stride(0), out.stride(1), T.stride(0) if T is not None else 0,
        _bucket(Nout), _bucket(Kdim), min(_bucket(M), 4096),
        HAS_BIAS=bias is not None, HAS_CS=col_scale is not None, WRITE_PRE=want_pre,
        HAS_MAP=seg.has_map, FUSE_T=fuse,
        WRITE_T=bool(fuse and want_t), PER_ROW=per_row_ids is not None,
        IEEE=_ieee(X.dtype),
        BLOCK_M=bm, BLOCK_R=br,
    )
    if trunc:
        out, pre = out.to(X.dtype), (pre.to(X.dtype) if pre is not None else None)
    return (out, T, pre) if want_pre else (out, T)


def _num_sms(device):
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _seg_outer(P, Q, scaling, seg, M, I, J, NA):
    """(NA, I, J) in Q's dtype: out[a] = s_a * P[rows of a]ᵀ @ Q[rows of a], for P (M, I) the
    fp32 low-rank buffer (I = the rank) and Q (M, J) an input (x or dy)."""
    out_dtype = Q.dtype
    ieee = _ieee(out_dtype)
    cast_p = not ieee
    bm = 64
    bi = max(16, min(triton.next_power_of_2(I), 64 if _INTERPRET else 128))
    bj = max(16, min(triton.next_power_of_2(J), 64 if _INTERPRET else 128))
    if not _INTERPRET:
        # fp32 tiles (operands or the hi / lo halves of the fp32 low-rank buffer): 64 wide at
        # most, the 128x128 tiles spilled registers in an sm_90 compile at r = 128
        bi, bj = min(bi, 64), min(bj, 64)
    tiles = NA * triton.cdiv(I, bi) * triton.cdiv(J, bj)
    split = max(1, min(triton.cdiv(2 * _num_sms(P.device), tiles), triton.cdiv(M, 4 * bm), 64))
    if _INTERPRET:  # few programs, but still two splits when there are rows for them
        split = 2 if M > bm else 1
    part = torch.empty(split, NA, I, J, device=P.device, dtype=torch.float32)
    dummy = part
    _seg_outer_kernel[(tiles, split)](
        P, Q, part, seg.perm if seg.has_map else dummy,
        seg.seg_start if seg.has_map else dummy, seg.seg_count if seg.has_map else dummy,
        scaling, M, I, J, NA,
        P.stride(0), P.stride(1), Q.stride(0), Q.stride(1), split,
        HAS_MAP=seg.has_map, CAST_P=cast_p, IEEE=ieee,
        BLOCK_M=bm, BLOCK_I=bi, BLOCK_J=bj,
        num_warps=4, num_stages=1 if _INTERPRET else 3,
    )
    out = part[0] if split == 1 else part.sum(0)
    return out.to(out_dtype)


def _per_row_max_m():
    """Forward with ids and at most this many rows: per-row adapters (decoding batches of
    many adapters), else SGMV segments.  MMCORE_LORA_PER_ROW_M overrides (measurements)."""
    return int(os.environ.get("MMCORE_LORA_PER_ROW_M", "64"))


def _pad_adapters(g, A):
    """Gradients of adapters past the first are 0 when every row uses adapter 0."""
    if g.shape[0] == A:
        return g
    return torch.cat([g, g.new_zeros(A - g.shape[0], *g.shape[1:])])


def _segments(ids, A, M, device, dtype):
    return Segments(ids, A, M, _block_m(M, dtype), device)


def lora_forward(x, weight, bias, lora_a, lora_b, scaling, adapter_ids, col_scale=None,
                 want_pre=False):
    """-> y (M, N) in x.dtype (see the module docstring for the operands); with col_scale
    (N,) fp32, y = col_scale ⊙ (x Wᵀ + LoRA) + b in the epilogue, and with want_pre
    (y, pre) where pre (M, N) is the bracket (stored by the same epilogue)."""
    M, K = x.shape
    N = weight.shape[0]
    A, R = lora_a.shape[0], lora_a.shape[1]
    if M == 0 or N == 0 or K == 0:
        pre = torch.zeros(M, N, device=x.device, dtype=x.dtype)
        y = pre.clone() if bias is None else pre + bias
        return (y, pre) if want_pre else y
    per_row = None
    if adapter_ids is not None and A > 1 and M <= _per_row_max_m():
        per_row, adapter_ids = adapter_ids, None  # natural row tiles, ids read per row
    seg = _segments(adapter_ids, A, M, x.device, x.dtype)
    res = _fused_mm(
        x, weight, (weight.stride(1), weight.stride(0)), bias,
        lora_a, (lora_a.stride(0), lora_a.stride(2), lora_a.stride(1)),
        lora_b, (lora_b.stride(0), lora_b.stride(2), lora_b.stride(1)),
        scaling, seg, M, N, K, R, per_row_ids=per_row, col_scale=col_scale,
        want_pre=want_pre)
    return (res[0], res[2]) if want_pre else res[0]


def lora_backward(dy, x, weight, lora_a, lora_b, scaling, adapter_ids,
                  need_dx, need_da, need_db):
    """-> (dx (M, K) | None, d lora_a (A, r, K) | None, d lora_b (A, N, r) | None)."""
    M, K = x.shape
    N = weight.shape[0]
    A, R = lora_a.shape[0], lora_a.shape[1]
    dx = da = db = None
    if M == 0 or N == 0 or K == 0:
        return (torch.zeros_like(x) if need_dx else None,
                torch.zeros_like(lora_a) if need_da else None,
                torch.zeros_like(lora_b) if need_db else None)
    seg = _segments(adapter_ids, A, M, x.device, x.dtype)
    # Aop[n, r] = B[n, r], read from a (A, r, N) copy of B (small): the n-contiguous layout
    # of the forward's A operand.  Reading B (A, N, r) in place (rows of r elements) hit an
    # illegal address on an H100 (triton 3.6) for r = 2, bf16, 128-row tiles.
    lora_bt = lora_b.transpose(1, 2).contiguous()
    b_as_aop = (lora_bt.stride(0), lora_bt.stride(2), lora_bt.stride(1))
    T = None  # dy @ B (M, r) fp32
    if need_dx:
        dx, T = _fused_mm(
            dy, weight, (weight.stride(0), weight.stride(1)), None,
            lora_bt, b_as_aop,
            lora_a, (lora_a.stride(0), lora_a.stride(1), lora_a.stride(2)),
            scaling, seg, M, K, N, R, want_t=need_da)
    NA = A if seg.has_map else 1  # without ids only adapter 0 has rows
    # the (M, r) low-rank products are memory bound: 32-row tiles give the GPU 4x the
    # programs of the GEMM's 128-row tiles (not re-measured; see README, "LoRA kernels")
    seg_lr = seg if seg.block_m <= 32 else Segments(adapter_ids, A, M, 32, x.device)
    if need_da:
        if T is None:
            T = _lowrank_rows(dy, lora_bt, b_as_aop, R, seg_lr, M, N)
        da = _pad_adapters(_seg_outer(T, x, scaling, seg, M, R, K, NA), A)
    if need_db:
        XA = _lowrank_rows(x, lora_a, (lora_a.stride(0), lora_a.stride(2), lora_a.stride(1)),
                           R, seg_lr, M, K)
        # dB (N, r) = s dyᵀ XA, computed as its transpose (r, N) = s XAᵀ dy: the same kernel
        # variant as dA (the fp32 low-rank buffer on the left)
        db = _pad_adapters(_seg_outer(XA, dy, scaling, seg, M, R, N, NA).transpose(1, 2), A)
    return dx, da, db
