"""Triton kernels for cross_attention (text <-> image tokens) and the two-direction co-attention.

Layout as SDPA: q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D); query head h reads kv head h // G
(G = Hq // Hkv).  Per-sample valid lengths Lq_b / Lk_b (right padding); allowed(i, j) =
i < Lq_b and j < Lk_b, with no positional mask.  A row that sees no key (i >= Lq_b or
Lk_b = 0) gets out 0, lse -inf and zero gradients; padding is masked at load (other=0) so a
NaN there can never reach a result.

Short-K design (Sk is 49..1025 image tokens, Sq up to 10^5 text tokens):
  * forward: one program owns M_BLOCKS query blocks of one (sample, head).  When the whole K/V
    of a sample fits one tile (BLOCK_N >= Sk, ``SINGLE``), K and V are loaded once per program
    and reused by all its query blocks, and the softmax is a single pass (no rescaling);
    otherwise a short online-softmax loop over BLOCK_N key blocks.
  * backward: (1) a dQ kernel over query blocks that also computes each row's statistics from
    the scores (max, sum, delta = rowsum(P dP)), for exact gradients at large logits;
    (2) a dK/dV kernel over key blocks that loops over the G query heads of its kv head and
    over the query blocks of one query split.  With few key blocks (short K) the query dim is
    split into S chunks for parallelism; each chunk writes its own fp32 partial and the
    partials are summed in a fixed order, so dK/dV are deterministic (no atomics).
  * co-attention: both directions (text->image and image->text) in one launch: the program ids
    of one 1-D grid are split between the two problem sets; an optional residual is added in
    the epilogue (out = residual + attn).

All base offsets are int64.  fp32 inputs use ``input_precision="ieee"`` (true fp32, no tf32).
Under TRITON_INTERPRET=1 one small fixed config is used (no autotuning); on a GPU the kernels
are autotuned for Hopper-class parts.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._autotune import autotune, config_class, smem_budget
# the capped scores (and their tanh), and the dropout mask's keys, shared
from .window_attention import _drop_cols, _drop_rows, _drop_tile, _scores, dropout_args

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------- jit helpers


@triton.jit
def _dot(a, b, PREC: tl.constexpr):
    """tl.dot with fp32 accumulation; PREC "ieee" (fp32 inputs), None (16-bit inputs) or
    "upcast" (every dtype under TRITON_INTERPRET=1): the product in fp64, rounded once to
    fp32.  numpy's BLAS rounds a tile by its shape and orientation, which a GPU's dot does
    not, and the dK/dV kernel's Kᵀ-side scores must equal the dQ kernel's bit for bit
    (window_attention._dot explains); numpy also mis-multiplies bf16 (stored as uint16)."""
    if PREC == "upcast":
        return tl.dot(a.to(tl.float64), b.to(tl.float64), out_dtype=tl.float64).to(tl.float32)
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _length(ptr, b, S, HAS: tl.constexpr):
    if HAS:
        return tl.load(ptr + b).to(tl.int32)
    else:
        return S


@triton.jit
def _kv_block(k_base, v_base, kn, offs_d, dmask, Lk, skn, svn):
    """K and V rows kn (padding past Lk loaded as 0) and which of them are valid."""
    kvalid = kn < Lk
    kvm = kvalid[:, None] & dmask[None, :]
    k = tl.load(k_base + kn[:, None].to(tl.int64) * skn + offs_d[None, :], mask=kvm, other=0.0)
    v = tl.load(v_base + kn[:, None].to(tl.int64) * svn + offs_d[None, :], mask=kvm, other=0.0)
    return k, v, kvalid


@triton.jit
def _softmax_step(q, k, v, kvalid, m_i, l_i, acc, qk_scale, softcap2, kr, kc, drop_thr, drop_rs,
                  PREC: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr):
    """One key block of the online softmax (scores in log2 units).  DROPOUT: l sums the
    un-dropped weights, acc the dropped ones times 1 / (1 - p) (kr / kc: the keys of the
    block's rows and columns, window_attention._drop_rows / _drop_cols)."""
    s, _ = _scores(_dot(q, tl.trans(k), PREC), qk_scale, softcap2, HAS_SOFTCAP)
    s = tl.where(kvalid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:
        p = p * _drop_tile(kr, kc, drop_thr, drop_rs)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PREC)
    return m_new, l_i, acc


@triton.jit
def _fwd_epilogue(acc, m_i, l_i, offs_m, offs_d, dmask, Lq, Sq, o_base, som, or_base, sorm,
                  r_base, srm, lse_base, HAS_RES: tl.constexpr, STORE_ATTN: tl.constexpr):
    # l NaN (a NaN or +inf score) is valid: the row's out is NaN, its lse NaN or +inf
    valid = (offs_m < Lq) & (l_i != 0.0)
    l_safe = tl.where(valid, l_i, 1.0)
    out = tl.where(valid[:, None], acc / l_safe[:, None], 0.0)
    lse = tl.where(valid, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    lse = tl.where(m_i == float("inf"), float("inf"), lse)
    rows = offs_m < Sq
    smask = rows[:, None] & dmask[None, :]
    offs_m64 = offs_m.to(tl.int64)
    tl.store(lse_base + offs_m64, lse, mask=rows)
    if HAS_RES:
        r = tl.load(r_base + offs_m64[:, None] * srm + offs_d[None, :], mask=smask, other=0.0)
        tl.store(or_base + offs_m64[:, None] * sorm + offs_d[None, :],
                 (r.to(tl.float32) + out).to(or_base.dtype.element_ty), mask=smask)
        if STORE_ATTN:
            tl.store(o_base + offs_m64[:, None] * som + offs_d[None, :],
                     out.to(o_base.dtype.element_ty), mask=smask)
    else:
        tl.store(o_base + offs_m64[:, None] * som + offs_d[None, :],
                 out.to(o_base.dtype.element_ty), mask=smask)


@triton.jit
def _fwd_program(pid_m, bh, Q, K, V, O, OR, R, LSE, SQL, SKL,
                 sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
                 sorb, sorh, sorm, srb, srh, srm,
                 H, G, Sq, Sk, qk_scale, softcap2, drop_base, drop_thr, drop_rs,
                 D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr, M_BLOCKS: tl.constexpr, SINGLE: tl.constexpr,
                 HAS_SQ: tl.constexpr, HAS_SK: tl.constexpr, HAS_RES: tl.constexpr,
                 STORE_ATTN: tl.constexpr, PREC: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                 DROPOUT: tl.constexpr):
    """All work of one program: M_BLOCKS query blocks of (sample b, query head h).
    DROPOUT: window_attention's _fwd_kernel explains drop_base, drop_thr, drop_rs."""
    b = bh // H
    h = bh % H
    hk = h // G
    Lq = _length(SQL, b, Sq, HAS_SQ)
    Lk = _length(SKL, b, Sk, HAS_SK)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    hk64 = hk.to(tl.int64)
    q_base = Q + b64 * sqb + h64 * sqh
    k_base = K + b64 * skb + hk64 * skh
    v_base = V + b64 * svb + hk64 * svh
    o_base = O + b64 * sob + h64 * soh
    or_base = OR + b64 * sorb + h64 * sorh
    r_base = R + b64 * srb + h64 * srh
    lse_base = LSE + (b64 * H + h64) * Sq
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    offs_n = tl.arange(0, BLOCK_N)
    if SINGLE:
        # the whole K/V of the sample in one tile, loaded once for all M_BLOCKS query blocks
        kvalid = offs_n < Lk
        kvm = kvalid[:, None] & dmask[None, :]
        k = tl.load(k_base + offs_n[:, None].to(tl.int64) * skn + offs_d[None, :], mask=kvm,
                    other=0.0)
        v = tl.load(v_base + offs_n[:, None].to(tl.int64) * svn + offs_d[None, :], mask=kvm,
                    other=0.0)
        if DROPOUT:
            kc = _drop_cols(offs_n)
        else:
            kc = offs_n
        for i in range(M_BLOCKS):
            offs_m = (pid_m * M_BLOCKS + i) * BLOCK_M + tl.arange(0, BLOCK_M)
            qm = (offs_m < Lq)[:, None] & dmask[None, :]
            q = tl.load(q_base + offs_m[:, None].to(tl.int64) * sqm + offs_d[None, :], mask=qm,
                        other=0.0)
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
            if Lk > 0:
                kr = _drop_rows(drop_base, b, h, offs_m, DROPOUT)
                m_i, l_i, acc = _softmax_step(q, k, v, kvalid, m_i, l_i, acc, qk_scale,
                                              softcap2, kr, kc, drop_thr, drop_rs, PREC,
                                              HAS_SOFTCAP, DROPOUT)
            _fwd_epilogue(acc, m_i, l_i, offs_m, offs_d, dmask, Lq, Sq, o_base, som, or_base,
                          sorm, r_base, srm, lse_base, HAS_RES, STORE_ATTN)
    else:
        for i in range(M_BLOCKS):
            start_m = (pid_m * M_BLOCKS + i) * BLOCK_M
            offs_m = start_m + tl.arange(0, BLOCK_M)
            qm = (offs_m < Lq)[:, None] & dmask[None, :]
            q = tl.load(q_base + offs_m[:, None].to(tl.int64) * sqm + offs_d[None, :], mask=qm,
                        other=0.0)
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
            hi = tl.where(start_m < Lq, Lk, 0)  # a block of padded queries reads no key
            kr = _drop_rows(drop_base, b, h, offs_m, DROPOUT)
            for start_n in range(0, hi, BLOCK_N):
                kn = start_n + offs_n
                kvalid = kn < Lk
                kvm = kvalid[:, None] & dmask[None, :]
                k = tl.load(k_base + kn[:, None].to(tl.int64) * skn + offs_d[None, :], mask=kvm,
                            other=0.0)
                v = tl.load(v_base + kn[:, None].to(tl.int64) * svn + offs_d[None, :], mask=kvm,
                            other=0.0)
                if DROPOUT:
                    kc = _drop_cols(kn)
                else:
                    kc = kn
                m_i, l_i, acc = _softmax_step(q, k, v, kvalid, m_i, l_i, acc, qk_scale,
                                              softcap2, kr, kc, drop_thr, drop_rs, PREC,
                                              HAS_SOFTCAP, DROPOUT)
            _fwd_epilogue(acc, m_i, l_i, offs_m, offs_d, dmask, Lq, Sq, o_base, som, or_base,
                          sorm, r_base, srm, lse_base, HAS_RES, STORE_ATTN)


# ----------------------------------------------------------------------------- forward kernels


# lengths, head counts and autotune buckets are runtime values: one compile per dtype and
# head dim serves every sequence length (they bound loops and row masks only).  The GQA group
# G stays specialised: G == 1 (no GQA, the common case) drops the loop over the group's heads
# in dK/dV (223 registers instead of 242 at D = 128, sm_90)
_NO_SPEC = ["H", "Sq", "Sk", "SQ_KEY", "SK_KEY", "drop_base", "drop_thr"]


@triton.jit(do_not_specialize=_NO_SPEC)
def _cross_fwd_kernel(Q, K, V, O, OR, R, LSE, SQL, SKL,
                      sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
                      sorb, sorh, sorm, srb, srh, srm,
                      H, G, Sq, Sk, qk_scale, softcap2, SQ_KEY, SK_KEY,
                      drop_base, drop_thr, drop_rs,
                      D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_D: tl.constexpr, M_BLOCKS: tl.constexpr, SINGLE: tl.constexpr,
                      HAS_SQ: tl.constexpr, HAS_SK: tl.constexpr, HAS_RES: tl.constexpr,
                      STORE_ATTN: tl.constexpr, PREC: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                      DROPOUT: tl.constexpr):
    """HAS_SOFTCAP: qk_scale = scale / c, softcap2 = c·log2 e (_scores).  DROPOUT: attention
    dropout (window_attention.dropout_args)."""
    _fwd_program(tl.program_id(0), tl.program_id(1), Q, K, V, O, OR, R, LSE, SQL, SKL,
                 sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
                 sorb, sorh, sorm, srb, srh, srm, H, G, Sq, Sk, qk_scale, softcap2,
                 drop_base, drop_thr, drop_rs,
                 D, BLOCK_M, BLOCK_N, BLOCK_D, M_BLOCKS, SINGLE, HAS_SQ, HAS_SK, HAS_RES,
                 STORE_ATTN, PREC, HAS_SOFTCAP, DROPOUT)


@triton.jit(do_not_specialize=["BHA", "HA", "SqA", "SkA", "BHB", "HB", "SqB", "SkB", "SQ_KEY",
                               "SK_KEY"])
def _co_fwd_kernel(
        # direction A (e.g. text queries over image keys)
        QA, KA, VA, OA, ORA, RA, LSEA, SQLA, SKLA,
        a_sqb, a_sqh, a_sqm, a_skb, a_skh, a_skn, a_svb, a_svh, a_svn, a_sob, a_soh, a_som,
        a_sorb, a_sorh, a_sorm, a_srb, a_srh, a_srm, BHA, HA, GA, SqA, SkA,
        # direction B (image queries over text keys)
        QB, KB, VB, OB, ORB, RB, LSEB, SQLB, SKLB,
        b_sqb, b_sqh, b_sqm, b_skb, b_skh, b_skn, b_svb, b_svh, b_svn, b_sob, b_soh, b_som,
        b_sorb, b_sorh, b_sorm, b_srb, b_srh, b_srm, BHB, HB, GB, SqB, SkB,
        qk_scale, SQ_KEY, SK_KEY,
        D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, M_BLOCKS: tl.constexpr,
        BLOCK_N_A: tl.constexpr, SINGLE_A: tl.constexpr,
        BLOCK_N_B: tl.constexpr, SINGLE_B: tl.constexpr,
        HAS_SQ_A: tl.constexpr, HAS_SK_A: tl.constexpr, HAS_SQ_B: tl.constexpr,
        HAS_SK_B: tl.constexpr, HAS_RES: tl.constexpr, STORE_ATTN: tl.constexpr,
        PREC: tl.constexpr):
    """Both co-attention directions in one grid: programs [0, nA) serve A, the rest B."""
    pid = tl.program_id(0)
    nma = tl.cdiv(SqA, BLOCK_M * M_BLOCKS)
    na = nma * BHA
    if pid < na:
        _fwd_program(pid % nma, pid // nma, QA, KA, VA, OA, ORA, RA, LSEA, SQLA, SKLA,
                     a_sqb, a_sqh, a_sqm, a_skb, a_skh, a_skn, a_svb, a_svh, a_svn,
                     a_sob, a_soh, a_som, a_sorb, a_sorh, a_sorm, a_srb, a_srh, a_srm,
                     HA, GA, SqA, SkA, qk_scale, 0.0, 0, 0, 1.0,
                     D, BLOCK_M, BLOCK_N_A, BLOCK_D, M_BLOCKS, SINGLE_A, HAS_SQ_A, HAS_SK_A,
                     HAS_RES, STORE_ATTN, PREC, False, False)
    else:
        pb = pid - na
        nmb = tl.cdiv(SqB, BLOCK_M * M_BLOCKS)
        _fwd_program(pb % nmb, pb // nmb, QB, KB, VB, OB, ORB, RB, LSEB, SQLB, SKLB,
                     b_sqb, b_sqh, b_sqm, b_skb, b_skh, b_skn, b_svb, b_svh, b_svn,
                     b_sob, b_soh, b_som, b_sorb, b_sorh, b_sorm, b_srb, b_srh, b_srm,
                     HB, GB, SqB, SkB, qk_scale, 0.0, 0, 0, 1.0,
                     D, BLOCK_M, BLOCK_N_B, BLOCK_D, M_BLOCKS, SINGLE_B, HAS_SQ_B, HAS_SK_B,
                     HAS_RES, STORE_ATTN, PREC, False, False)


# ----------------------------------------------------------------------------- backward kernels


@triton.jit(do_not_specialize=_NO_SPEC)
def _bwd_dq_kernel(Q, K, V, O, DO, MROW, LINV, DELTA, DQ, SQL, SKL,
                   sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
                   sdob, sdoh, sdom,
                   H, G, Sq, Sk, qk_scale, softcap2, scale, SQ_KEY, SK_KEY,
                   drop_base, drop_thr, drop_rs,
                   D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, HAS_SQ: tl.constexpr, HAS_SK: tl.constexpr,
                   PREC: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr):
    """dQ for one query block, and the row statistics m, 1 / l and delta = rowsum(P * dP)
    (stored in MROW, LINV, DELTA (B*H, Sq) fp32 for the dK/dV kernel).
    With softcap (_scores) P and dP are those of the capped scores and dS = P (dP - delta)
    (1 - t²).

    P is renormalised here rather than taken as exp(S - lse): at large logits (|S| ~ 1e4) an
    fp32 lse is off by an ulp of S, P misses summing to 1 by that much, and dS = P (dP - delta)
    then fails to cancel where P is one-hot: dQ was off by 2.1 for a true max of 0.017 (bf16,
    q, k ~ 100 randn; issue 16).  Pass 1 takes the row max m, l = sum exp(S - m) and
    delta = sum P dP (not rowsum(dO * O): O is rounded to the input dtype); pass 2 uses
    P = exp(S - m) / l, which sums to 1 to fp32 rounding.  The saved lse is unused (O too).
    The dK/dV kernel takes P and delta from these statistics: exact where a row is one-hot
    as long as its scores equal these bit for bit (window_attention's _dot, issue 24).
    DROPOUT (O = (P∘Z) V, Z = keep / (1 - p)): dP is the gradient of the un-dropped P,
    (dO Vᵀ)∘Z, in both passes; delta = sum P dP is then rowsum(dO∘O) as without."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // G
    Lq = _length(SQL, b, Sq, HAS_SQ)
    Lk = _length(SKL, b, Sk, HAS_SK)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    hk64 = hk.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_m64 = offs_m.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    dmask = offs_d < D
    rvalid = offs_m < Lq
    qm = rvalid[:, None] & dmask[None, :]
    q = tl.load(Q + b64 * sqb + h64 * sqh + offs_m64[:, None] * sqm + offs_d[None, :], mask=qm,
                other=0.0)
    do = tl.load(DO + b64 * sdob + h64 * sdoh + offs_m64[:, None] * sdom + offs_d[None, :],
                 mask=qm, other=0.0)
    row_base = (b64 * H + h64) * Sq
    k_base = K + b64 * skb + hk64 * skh
    v_base = V + b64 * svb + hk64 * svh
    hi = tl.where(pid_m * BLOCK_M < Lq, Lk, 0)
    kr = _drop_rows(drop_base, b, h, offs_m, DROPOUT)
    # pass 1: m, l and delta (online over the key blocks, log2 units)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    d_i = tl.zeros([BLOCK_M], tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        k, v, kvalid = _kv_block(k_base, v_base, start_n + offs_n, offs_d, dmask, Lk, skn, svn)
        s, _ = _scores(_dot(q, tl.trans(k), PREC), qk_scale, softcap2, HAS_SOFTCAP)
        s = tl.where(kvalid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        dp = tl.where(kvalid[None, :], _dot(do, tl.trans(v), PREC), 0.0)
        if DROPOUT:
            dp = dp * _drop_tile(kr, _drop_cols(start_n + offs_n), drop_thr, drop_rs)
        l_i = l_i * alpha + tl.sum(p, 1)
        d_i = d_i * alpha + tl.sum(p * dp, 1)
        m_i = m_new
    rvalid = rvalid & (l_i != 0.0)  # NaN l (a NaN / +inf score) stays valid: NaN propagates
    l_inv = tl.where(rvalid, 1.0 / tl.where(rvalid, l_i, 1.0), 0.0)
    m_use = tl.where(rvalid, m_i, 0.0)
    delta = d_i * l_inv
    tl.store(DELTA + row_base + offs_m64, delta, mask=offs_m < Sq)
    tl.store(MROW + row_base + offs_m64, m_use, mask=offs_m < Sq)
    tl.store(LINV + row_base + offs_m64, l_inv, mask=offs_m < Sq)
    # pass 2: dS = P (dP - delta), dQ = scale dS K
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        k, v, kvalid = _kv_block(k_base, v_base, start_n + offs_n, offs_d, dmask, Lk, skn, svn)
        s, tc = _scores(_dot(q, tl.trans(k), PREC), qk_scale, softcap2, HAS_SOFTCAP)
        p = tl.exp2(s - m_use[:, None]) * l_inv[:, None]
        if HAS_SOFTCAP:  # dS_raw = dS (1 - t²): the factor folded into P
            p = p * (1.0 - tc * tc)
        p = tl.where(rvalid[:, None] & kvalid[None, :], p, 0.0)
        dp = _dot(do, tl.trans(v), PREC)
        if DROPOUT:
            dp = dp * _drop_tile(kr, _drop_cols(start_n + offs_n), drop_thr, drop_rs)
        ds = p * (dp - delta[:, None])
        ds = tl.where(Lk > 1, ds, 0.0)  # one key: softmax == 1, dQ is exactly 0
        dq += _dot(ds.to(k.dtype), k, PREC)
    dq = dq * scale
    tl.store(DQ + (b64 * H + h64) * Sq * D + offs_m64[:, None] * D + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=(offs_m < Sq)[:, None] & dmask[None, :])


@triton.jit(do_not_specialize=["Hkv", "Sq", "Sk", "Q_PER_SPLIT", "SQ_KEY", "SK_KEY",
                               "drop_base", "drop_thr"])
def _bwd_dkdv_kernel(Q, K, V, DO, MROW, LINV, DELTA, DK, DV, SQL, SKL,
                     sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom,
                     sd_split, Hkv, G, Sq, Sk, qk_scale, softcap2, scale, Q_PER_SPLIT, SQ_KEY,
                     SK_KEY, drop_base, drop_thr, drop_rs,
                     D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr, HAS_SQ: tl.constexpr, HAS_SK: tl.constexpr,
                     PREC: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr):
    """dK, dV of one key block of (sample b, kv head hk), summed over the G query heads of the
    group and over the query rows of split pid_s (rows [pid_s*Q_PER_SPLIT, +Q_PER_SPLIT)).

    DK/DV are (S, B, Hkv, Sk, D) with split stride sd_split (0 when unsplit).  DROPOUT:
    dV = (P∘Z)ᵀ dO and dPᵀ = (V dOᵀ)∘Zᵀ (the dQ kernel's mask, from the same keys)."""
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = bhk // Hkv
    hk = bhk % Hkv
    Lq = _length(SQL, b, Sq, HAS_SQ)
    Lk = _length(SKL, b, Sk, HAS_SK)
    b64 = b.to(tl.int64)
    hk64 = hk.to(tl.int64)
    H = Hkv * G
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_n64 = offs_n.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    kvalid = offs_n < Lk
    kvm = kvalid[:, None] & dmask[None, :]
    k = tl.load(K + b64 * skb + hk64 * skh + offs_n64[:, None] * skn + offs_d[None, :], mask=kvm,
                other=0.0)
    v = tl.load(V + b64 * svb + hk64 * svh + offs_n64[:, None] * svn + offs_d[None, :], mask=kvm,
                other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    if DROPOUT:
        kc = _drop_cols(offs_n)
    else:
        kc = offs_n
    q_lo = pid_s * Q_PER_SPLIT
    q_hi = tl.minimum(Lq, q_lo + Q_PER_SPLIT)
    q_hi = tl.where(pid_n * BLOCK_N < Lk, q_hi, q_lo)  # a block of padded keys reads nothing
    for g in range(0, G):
        h64 = hk64 * G + g
        q_base = Q + b64 * sqb + h64 * sqh
        do_base = DO + b64 * sdob + h64 * sdoh
        row_base = (b64 * H + h64) * Sq
        for start_m in range(q_lo, q_hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            offs_m64 = offs_m.to(tl.int64)
            rvalid = offs_m < q_hi
            qm = rvalid[:, None] & dmask[None, :]
            q = tl.load(q_base + offs_m64[:, None] * sqm + offs_d[None, :], mask=qm, other=0.0)
            do = tl.load(do_base + offs_m64[:, None] * sdom + offs_d[None, :], mask=qm,
                         other=0.0)
            st, tt = _scores(_dot(k, tl.trans(q), PREC), qk_scale, softcap2,
                             HAS_SOFTCAP)  # (BLOCK_N, BLOCK_M)
            # the row statistics loaded where they are used (fewer registers across the dots)
            m2 = tl.load(MROW + row_base + offs_m64, mask=rvalid, other=0.0)
            l_inv = tl.load(LINV + row_base + offs_m64, mask=rvalid, other=0.0)
            pt = tl.exp2(st - m2[None, :]) * l_inv[None, :]
            pt = tl.where(kvalid[:, None] & rvalid[None, :], pt, 0.0)
            if HAS_SOFTCAP:  # dS_raw = dS (1 - t²); pt itself dies at the dV dot
                gt = pt * (1.0 - tt * tt)
            else:
                gt = pt
            if DROPOUT:
                zt = _drop_tile(kc, _drop_rows(drop_base, b, h64, offs_m, DROPOUT), drop_thr,
                                drop_rs)
                dv += _dot((pt * zt).to(do.dtype), do, PREC)
                dpt = _dot(v, tl.trans(do), PREC) * zt
            else:
                dv += _dot(pt.to(do.dtype), do, PREC)
                dpt = _dot(v, tl.trans(do), PREC)
            delta = tl.load(DELTA + row_base + offs_m64, mask=rvalid, other=0.0)
            dst = gt * (dpt - delta[None, :])
            # padding and one-key rows: exactly 0 (a NaN delta must not reach padded keys)
            dst = tl.where((Lk > 1) & kvalid[:, None] & rvalid[None, :], dst, 0.0)
            dk += _dot(dst.to(q.dtype), q, PREC)
    dk = dk * scale
    out_off = pid_s.to(tl.int64) * sd_split + (b64 * Hkv + hk64) * Sk * D
    sm = (offs_n < Sk)[:, None] & dmask[None, :]
    tl.store(DK + out_off + offs_n64[:, None] * D + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=sm)
    tl.store(DV + out_off + offs_n64[:, None] * D + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=sm)


# ----------------------------------------------------------------------------- configs


def _pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _block_d(D: int) -> int:
    return max(16, _pow2(D))


def _key(S: int) -> int:
    """Autotune bucket of a length: powers of 2 from 64 to 16384 (one tuning per bucket)."""
    return min(max(_pow2(max(S, 1)), 64), 1 << 14)


def _prec(dtype):
    if _interpret():  # every dtype: see _dot
        return "upcast"
    return "ieee" if dtype == torch.float32 else None


def _single_limit(block_d: int, fp32: bool = False) -> int:
    """Largest key tile kept whole on chip for one program (K and V both resident)."""
    if fp32:  # no tensor cores: the score tile and both operands sit in registers
        return 64 if block_d <= 64 else 32
    return 128 if block_d <= 64 else (64 if block_d <= 128 else 32)


def _fwd_heur_n(nargs_sk, block_d, fp32=False):
    """(BLOCK_N, SINGLE) for a problem with Sk keys: the whole K/V when it fits, else a loop."""
    if _interpret():
        bn = max(16, _pow2(nargs_sk))
        return (bn, True) if bn <= 32 else (32, False)
    lim = _single_limit(block_d, fp32)
    bn = max(16, _pow2(nargs_sk))
    if bn <= lim:
        return bn, True
    if fp32:
        return 32, False
    return (128 if block_d <= 64 else 64 if block_d <= 128 else 32), False


# Config lists per class (_autotune.config_class); the first of a class is its default (used
# without autotuning), chosen from sm_90 / sm_80 compiles at D = 128 (benchmarks/sm90_audit.py)
# as large tiles that do not spill registers.
# forward: (BLOCK_M, M_BLOCKS, warps, stages).  16-bit: (128, 1, 4, 2) spilled registers in
# an sm_90 compile (24 bytes at D = 64, 136 at D = 128), (128, 1, 8, 2) did not.  fp32 (FMA,
# operands in registers): (32, 1, 4, 2) spilled 600 bytes at D = 128, (64, 1, 8, 2) 424,
# (16, 2, 4, 2) none.
_FWD_16 = ((128, 1, 8, 2), (128, 1, 4, 2), (128, 1, 8, 3), (64, 1, 4, 3), (64, 2, 4, 2),
           (128, 2, 8, 2), (64, 1, 4, 2))
_FWD = {"sm90": _FWD_16, "sm80": _FWD_16, "fp32": ((16, 2, 4, 2), (16, 1, 4, 2))}
# backward: (BLOCK_M, BLOCK_N, warps, stages).  dK/dV: accumulators (BLOCK_N, D) x 2 next to
# K and V: at D = 128 every 16-bit config but the 32-row ones spilled registers on sm_90, so
# 8 warps over 32 query rows come first; on sm_80, (32, 128, 8, 2) spilled 56 bytes.
_BWD_16 = ((64, 64, 4, 2), (64, 128, 8, 2), (128, 64, 8, 2), (64, 64, 4, 3), (32, 64, 4, 2),
           (32, 32, 4, 1))
_DQ = {"sm90": _BWD_16, "sm80": ((64, 64, 8, 2),) + _BWD_16,
       "fp32": ((16, 32, 8, 2), (32, 32, 8, 2), (32, 16, 8, 2))}
# fp32 dK/dV: K and V resident as FMA operands; (32, 32, 8, 2) spilled 128 bytes at D = 128
# under triton 3.6 (none under 3.9), (32, 32, 4, 2) 464-672 bytes under both
_DKDV = {"sm90": ((32, 128, 8, 2), (32, 64, 8, 2)) + _BWD_16,
         "sm80": ((64, 64, 8, 2), (32, 64, 8, 2)) + _BWD_16,
         "fp32": ((16, 32, 8, 2), (32, 16, 8, 2), (16, 32, 4, 2))}


def _fwd_cfg(c):
    return triton.Config({"BLOCK_M": c[0], "M_BLOCKS": c[1]}, num_warps=c[2], num_stages=c[3])


def _bwd_cfg(c):
    return triton.Config({"BLOCK_M": c[0], "BLOCK_N": c[1]}, num_warps=c[2], num_stages=c[3])


def _cfg_tuple(c):
    kw = c.kwargs
    return (kw["BLOCK_M"], kw.get("M_BLOCKS", kw.get("BLOCK_N")), c.num_warps, c.num_stages)


def _prune(kind, table):
    """The configs of the problem's class (dtype, GPU generation) that fit the head dim and
    the device's shared memory, the class's default first."""

    def prune(configs, named_args, **kwargs):
        q = named_args["Q"] if "Q" in named_args else named_args["QA"]
        bd, es = kwargs["BLOCK_D"], q.element_size()
        budget = smem_budget(q.device)
        by_key = {_cfg_tuple(c): c for c in configs}
        order = table[config_class(q.dtype, q.device)]
        out = []
        for key in order:
            c = by_key[key]
            bm, st = c.kwargs["BLOCK_M"], max(c.num_stages, 1)
            if kind == "fwd":
                bn = max(kwargs.get("BLOCK_N", 0), kwargs.get("BLOCK_N_A", 0),
                         kwargs.get("BLOCK_N_B", 0))
                if bd > 128 and bm > 64:
                    continue
                smem = (bm * st + 2 * bn * st) * bd * es  # q blocks, K and V tiles
            else:
                bn = c.kwargs["BLOCK_N"]
                if bm * bn > (2048 if bd > 128 else 8192 if bd > 64 else 1 << 30):
                    continue
                smem = (2 * bn + 2 * bm * st) * bd * es if kind == "dkdv" else \
                    (2 * bm + 2 * bn * st) * bd * es
            if smem <= budget:
                out.append(c)
        return out or [by_key[order[-1]]]

    return prune


_KEY = ["SQ_KEY", "SK_KEY", "D", "HAS_SOFTCAP", "DROPOUT"]


def _tuned(kernel, kind, table, make):
    if _interpret():
        return kernel
    keys = list(dict.fromkeys(k for ks in table.values() for k in ks))
    tune_key = [a for a in _KEY if a in kernel.arg_names]  # co-attention: no HAS_SOFTCAP,
    # no DROPOUT
    return autotune([make(c) for c in keys], tune_key, _prune(kind, table))(kernel)


_fwd = _tuned(_cross_fwd_kernel, "fwd", _FWD, _fwd_cfg)
_co_fwd = _tuned(_co_fwd_kernel, "fwd", _FWD, _fwd_cfg)
_dq = _tuned(_bwd_dq_kernel, "dq", _DQ, _bwd_cfg)
_dkdv = _tuned(_bwd_dkdv_kernel, "dkdv", _DKDV, _bwd_cfg)

_INTERP_FWD = {"BLOCK_M": 32, "M_BLOCKS": 2}
_INTERP_BWD = {"BLOCK_M": 32, "BLOCK_N": 32}


def _fixed(cfg):
    return cfg if _interpret() else {}


# ----------------------------------------------------------------------------- launchers


def _lens(s, ref):
    return (s, True) if s is not None else (ref, False)


def _direction_args(q, k, v, o, orr, r, lse, sq, sk):
    """Pointers and strides of one attention problem, in _fwd_program's order."""
    B, H, Sq, D = q.shape
    G = H // k.shape[1]
    orr = o if orr is None else orr
    r = o if r is None else r
    sql, has_sq = _lens(sq, lse)
    skl, has_sk = _lens(sk, lse)
    args = [q, k, v, o, orr, r, lse, sql, skl,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
            orr.stride(0), orr.stride(1), orr.stride(2), r.stride(0), r.stride(1), r.stride(2)]
    return args, dict(B=B, H=H, G=G, Sq=Sq, Sk=k.shape[2], has_sq=has_sq, has_sk=has_sk)


def _softcap_args(scale, softcap):
    """-> (qk_scale, softcap2, HAS_SOFTCAP): c > 0 gives qk_scale = scale / c and softcap2 =
    c·log2 e (the kernels' _scores), else qk_scale = scale·log2 e."""
    c = float(softcap or 0.0)
    if c > 0.0:
        return float(scale) / c, c * LOG2E, True
    return float(scale) * LOG2E, 0.0, False


def cross_attention_fwd(q, k, v, seqlens_q, seqlens_k, scale, softcap=0.0, residual=None,
                        store_attn=True, dropout_p=0.0, seed=None):
    """-> out (B, Hq, Sq, D) in q.dtype, lse (B, Hq, Sq) fp32 [, out_res = residual + out].

    seqlens_*: int64 (B,) or None.  softcap: c > 0 caps the scores to c·tanh(s / c) before
    the softmax (lse over the capped scores); 0 = off.  residual: (B, Hq, Sq, D) any strides
    (last contiguous); when given, returns (out or None, lse, out_res) — out only when
    store_attn.  dropout_p in [0, 1), seed (2,) int64 when dropout_p > 0: attention dropout
    with mmcore/ops/reference/dropout.py's mask (lse stays the un-dropped softmax's)."""
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    bd = _block_d(D)
    bn, single = _fwd_heur_n(Sk, bd, q.dtype == torch.float32)
    has_res = residual is not None
    o = torch.empty(B, H, Sq, D, dtype=q.dtype, device=q.device) \
        if (store_attn or not has_res) else None
    orr = torch.empty(B, H, Sq, D, dtype=q.dtype, device=q.device) if has_res else None
    lse = torch.empty(B, H, Sq, dtype=torch.float32, device=q.device)
    o_ptr = o if o is not None else orr
    args, m = _direction_args(q, k, v, o_ptr, orr, residual, lse, seqlens_q, seqlens_k)

    def grid(meta):
        return (triton.cdiv(Sq, meta["BLOCK_M"] * meta["M_BLOCKS"]), B * H)

    qk_scale, softcap2, has_cap = _softcap_args(scale, softcap)
    drop = dropout_args(dropout_p, seed)
    _fwd[grid](*args, H, m["G"], Sq, Sk, qk_scale, softcap2, _key(Sq), _key(Sk),
               drop["drop_base"], drop["drop_thr"], drop["drop_rs"],
               D=D, BLOCK_N=bn, BLOCK_D=bd, SINGLE=single, HAS_SQ=m["has_sq"],
               HAS_SK=m["has_sk"], HAS_RES=has_res, STORE_ATTN=store_attn and has_res,
               PREC=_prec(q.dtype), HAS_SOFTCAP=has_cap, DROPOUT=drop["DROPOUT"],
               **_fixed(_INTERP_FWD))
    if has_res:
        return o, lse, orr
    return o, lse


def co_attention_fwd(qa, ka, va, sqa, ska, qb, kb, vb, sqb, skb, scale, res_a=None, res_b=None,
                     store_attn=True):
    """Both directions of co-attention in one launch.

    Direction A: qa (B, H, SA, D) over ka/va (B, Hkv, SB, D) with lengths (sqa, ska);
    direction B: qb (B, H, SB, D) over kb/vb (B, Hkv, SA, D) with lengths (sqb, skb).
    Returns (oa, lse_a, ob, lse_b) and, with residuals (both or none), also
    (oa_res, ob_res) = (res_a + oa, res_b + ob); oa / ob are None unless store_attn."""
    assert qa.shape[-1] == qb.shape[-1], "both directions must share the head dim"
    assert qa.dtype == qb.dtype
    D = qa.shape[-1]
    bd = _block_d(D)
    has_res = res_a is not None
    assert (res_b is not None) == has_res, "give both residuals or neither"
    outs = []
    packs = []
    for q, k, v, sq, sk, r in ((qa, ka, va, sqa, ska, res_a), (qb, kb, vb, sqb, skb, res_b)):
        B, H, Sq, _ = q.shape
        o = torch.empty(B, H, Sq, D, dtype=q.dtype, device=q.device) \
            if (store_attn or not has_res) else None
        orr = torch.empty(B, H, Sq, D, dtype=q.dtype, device=q.device) if has_res else None
        lse = torch.empty(B, H, Sq, dtype=torch.float32, device=q.device)
        args, m = _direction_args(q, k, v, o if o is not None else orr, orr, r, lse, sq, sk)
        bn, single = _fwd_heur_n(k.shape[2], bd, q.dtype == torch.float32)
        packs.append((args, m, bn, single))
        outs.append((o, lse, orr))
    (a_args, ma, bna, sa), (b_args, mb, bnb, sb) = packs
    SqA, SqB = ma["Sq"], mb["Sq"]
    BHA, BHB = ma["B"] * ma["H"], mb["B"] * mb["H"]

    def grid(meta):
        step = meta["BLOCK_M"] * meta["M_BLOCKS"]
        return (triton.cdiv(SqA, step) * BHA + triton.cdiv(SqB, step) * BHB,)

    _co_fwd[grid](*a_args, BHA, ma["H"], ma["G"], SqA, ma["Sk"],
                  *b_args, BHB, mb["H"], mb["G"], SqB, mb["Sk"],
                  scale * LOG2E, _key(max(SqA, SqB)), _key(min(SqA, SqB)),
                  D=D, BLOCK_D=bd, BLOCK_N_A=bna, SINGLE_A=sa, BLOCK_N_B=bnb, SINGLE_B=sb,
                  HAS_SQ_A=ma["has_sq"], HAS_SK_A=ma["has_sk"], HAS_SQ_B=mb["has_sq"],
                  HAS_SK_B=mb["has_sk"], HAS_RES=has_res, STORE_ATTN=store_attn and has_res,
                  PREC=_prec(qa.dtype), **_fixed(_INTERP_FWD))
    (oa, la, ora), (ob, lb, orb) = outs
    if has_res:
        return oa, la, ob, lb, ora, orb
    return oa, la, ob, lb


def _n_sms(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def cross_attention_bwd(dout, q, k, v, out, lse, seqlens_q, seqlens_k, scale, softcap=0.0,
                        dropout_p=0.0, seed=None):
    """-> dq (B, Hq, Sq, D), dk, dv (B, Hkv, Sk, D) in the input dtypes (out: the attention
    output of the forward, without residual; softcap, dropout_p, seed: the forward's, 0 =
    off)."""
    B, H, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    G = H // Hkv
    bd = _block_d(D)
    prec = _prec(q.dtype)
    dev = q.device
    # per row, from the dQ kernel for the dK/dV kernel: delta = rowsum(P dP), the row max of
    # the scores (log2 units), 1 / sum exp2(S - max)
    delta, mrow, linv = (torch.empty(B, H, Sq, dtype=torch.float32, device=dev)
                         for _ in range(3))
    dq = torch.empty(B, H, Sq, D, dtype=q.dtype, device=dev)
    sql, has_sq = _lens(seqlens_q, lse)
    skl, has_sk = _lens(seqlens_k, lse)
    lse = lse.contiguous()
    qk_scale, softcap2, has_cap = _softcap_args(scale, softcap)
    drop = dropout_args(dropout_p, seed)
    dscal = (drop["drop_base"], drop["drop_thr"], drop["drop_rs"])

    def grid_q(meta):
        return (triton.cdiv(Sq, meta["BLOCK_M"]), B * H)

    _dq[grid_q](q, k, v, out, dout, mrow, linv, delta, dq, sql, skl,
                q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1),
                out.stride(2),
                dout.stride(0), dout.stride(1), dout.stride(2),
                H, G, Sq, Sk, qk_scale, softcap2, scale, _key(Sq), _key(Sk), *dscal,
                D=D, BLOCK_D=bd, HAS_SQ=has_sq, HAS_SK=has_sk, PREC=prec, HAS_SOFTCAP=has_cap,
                DROPOUT=drop["DROPOUT"], **_fixed(_INTERP_BWD))

    # split the query dim so that short-K problems still fill the device; each split owns an
    # fp32 partial of dK/dV, summed afterwards in a fixed order (deterministic)
    unit = 128  # a multiple of every BLOCK_M
    n_kb = triton.cdiv(Sk, 64)
    want = 2 * _n_sms(dev)
    split = max(1, min(triton.cdiv(want, max(1, n_kb * B * Hkv)), triton.cdiv(Sq, 4 * unit)))
    if _interpret():
        split = 2 if Sq > 64 else 1
        unit = 32
    q_per = triton.cdiv(triton.cdiv(Sq, split), unit) * unit
    split = triton.cdiv(Sq, q_per) if Sq > 0 else 1
    if split > 1:
        dk_buf = torch.empty(split, B, Hkv, Sk, D, dtype=torch.float32, device=dev)
        dv_buf = torch.empty_like(dk_buf)
        sd = B * Hkv * Sk * D
    else:
        dk_buf = torch.empty(B, Hkv, Sk, D, dtype=k.dtype, device=dev)
        dv_buf = torch.empty(B, Hkv, Sk, D, dtype=v.dtype, device=dev)
        sd = 0

    def grid_k(meta):
        return (triton.cdiv(Sk, meta["BLOCK_N"]), B * Hkv, split)

    _dkdv[grid_k](q, k, v, dout, mrow, linv, delta, dk_buf, dv_buf, sql, skl,
                  q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                  v.stride(0), v.stride(1), v.stride(2),
                  dout.stride(0), dout.stride(1), dout.stride(2),
                  sd, Hkv, G, Sq, Sk, qk_scale, softcap2, scale, q_per, _key(Sq), _key(Sk),
                  *dscal, D=D, BLOCK_D=bd, HAS_SQ=has_sq, HAS_SK=has_sk, PREC=prec,
                  HAS_SOFTCAP=has_cap, DROPOUT=drop["DROPOUT"], **_fixed(_INTERP_BWD))
    if split > 1:
        dk = dk_buf.sum(0).to(k.dtype)
        dv = dv_buf.sum(0).to(v.dtype)
    else:
        dk, dv = dk_buf, dv_buf
    return dq, dk, dv
