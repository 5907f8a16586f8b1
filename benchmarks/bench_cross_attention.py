"""cross_attention and two-direction co-attention vs PyTorch SDPA (`mmcore bench --op cross_attention`).

GPU (bf16): mmcore triton, mmcore's `sdpa` backend and `auto` vs SDPA with each backend
forced (math / efficient / flash / cudnn), lengths given to SDPA as a (B, 1, Sq, Sk) bool mask.  The flash backend cannot take a mask,
so it is compared on an equal-lengths row (both sides without lengths), which is marked.
Co-attention: one launch for both directions with the residual fused, vs two SDPA calls
(best masked backend) plus the two residual adds.  Sweep Sq x Sk x D, fwd and fwd+bwd, peak
memory.  CPU (fp32): mmcore cpu backend vs SDPA (ATen's CPU flash kernel) with a bool mask.

Useful FLOPs only: fwd 4·Hq·D·sum_b(Lq_b·Lk_b), bwd 2.5x that.  Ratios: "mmcore x faster
than <baseline>" (baseline ms / mmcore ms, > 1: mmcore faster) on the mmcore rows.
Quick (CPU): Sq=1024, Sk=577, with per-sample lengths, fwd and fwd+bwd, the cpu backend.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import mmcore
from mmcore.benchmarks import harness as H
from mmcore.ops.co_attention import co_attention

OP = "cross_attention"


def _lengths(B, S, frac):
    """Mixed per-sample lengths: S, then shorter ones (never 0: SDPA gives NaN rows)."""
    return torch.tensor([max(1, S - (b * int(S * frac)) // max(1, B - 1)) for b in range(B)])


def _mask(Lq, Lk, Sq, Sk, device):
    i = torch.arange(Sq, device=device)[None, :, None]
    j = torch.arange(Sk, device=device)[None, None, :]
    return ((i < Lq.to(device)[:, None, None]) & (j < Lk.to(device)[:, None, None]))[:, None]


def _flops(Hq, D, Lq, Lk, bwd):
    f = 4 * Hq * D * int((Lq * Lk).sum())
    return f * 3.5 if bwd else f


def _inputs(B, Hq, Hkv, Sq, Sk, D, dtype, device, grad):
    g = torch.Generator(device="cpu").manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    q, k, v = mk(B, Hq, Sq, D), mk(B, Hkv, Sk, D), mk(B, Hkv, Sk, D)
    for t in (q, k, v):
        t.requires_grad_(grad)
    return q, k, v, mk(B, Hq, Sq, D)


def _call(fn, bwd, q, k, v, dout):
    if not bwd:
        return lambda: fn(q, k, v)
    return lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), dout)


def _sdpa(backend, mask):
    from torch.nn.attention import sdpa_kernel

    def fn(q, k, v):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                  enable_gqa=q.shape[1] != k.shape[1])
    return fn


def _measure(fn, device, mem):
    t = H.time_fn(fn, device)
    return t, (H.peak_memory(fn, device) if mem else None)


def _gpu_case(rows, B, Hq, Sq, Sk, D, bwd, dtype, device, mem):
    from torch.nn.attention import SDPBackend

    Lq, Lk = _lengths(B, Sq, 0.4), _lengths(B, Sk, 0.5)
    shape = dict(B=B, Hq=Hq, Hkv=Hq, Sq=Sq, Sk=Sk, D=D, Lq=Lq.tolist(), Lk=Lk.tolist())
    case = f"{'fwd+bwd' if bwd else 'fwd'} Sq={Sq} Sk={Sk} D={D}"
    if H.out_of_time():
        rows.append(H.skipped(OP, case, shape, dtype, device))
        return
    q, k, v, dout = _inputs(B, Hq, Hq, Sq, Sk, D, dtype, device, bwd)
    sq, sk = Lq.to(device), Lk.to(device)
    fl = _flops(Hq, D, Lq, Lk, bwd)
    fl_eq = _flops(Hq, D, torch.full((B,), Sq), torch.full((B,), Sk), bwd)
    mask = _mask(Lq, Lk, Sq, Sk, device)
    base, best = {}, None
    for name, be, m in (("math", SDPBackend.MATH, mask),
                        ("efficient", SDPBackend.EFFICIENT_ATTENTION, mask),
                        ("cudnn", SDPBackend.CUDNN_ATTENTION, mask),
                        ("flash", SDPBackend.FLASH_ATTENTION, None)):
        if name == "math" and Sq * Sk * B * Hq > (1 << 31):
            rows.append(H.row(OP, case, f"sdpa-{name}", shape, dtype, device, None,
                              note="skipped: (Sq, Sk) score matrix too large"))
            continue
        impl = f"sdpa-{name}" + ("" if m is not None else " (equal lengths, no mask)")
        try:
            fn = _call(_sdpa(be, m), bwd, q, k, v, dout)
            fn()
            t, pk = _measure(fn, device, mem)
        except Exception as e:  # backend refuses this shape / mask / dtype
            rows.append(H.row(OP, case, impl, shape, dtype, device, None,
                              note=f"unsupported: {type(e).__name__}: {str(e)[:120]}"))
            continue
        rows.append(H.row(OP, case, impl, shape, dtype, device, t,
                          flops=fl if m is not None else fl_eq, peak=pk))
        base[name] = t["median_ms"]
        if m is not None and (best is None or t["median_ms"] < base[best]):
            best = name
    ours = lambda q_, k_, v_: mmcore.cross_attention(q_, k_, v_, seqlens_q=sq,  # noqa: E731
                                                     seqlens_k=sk, backend="triton")
    fn = _call(ours, bwd, q, k, v, dout)
    t, pk = _measure(fn, device, mem)
    rows.append(H.row(OP, case, "mmcore:triton", shape, dtype, device, t, flops=fl, peak=pk,
                      baseline_ms=base.get(best), baseline=f"sdpa-{best}"))
    for be in ("sdpa", "auto"):  # PyTorch's kernels behind mmcore, and what auto picks
        f = (lambda q_, k_, v_, be=be: mmcore.cross_attention(
            q_, k_, v_, seqlens_q=sq, seqlens_k=sk, backend=be))
        try:
            t = H.time_fn(_call(f, bwd, q, k, v, dout), device)
        except Exception as e:
            rows.append(H.row(OP, case, f"mmcore:{be}", shape, dtype, device, None,
                              note=f"failed: {type(e).__name__}: {str(e)[:120]}"))
            continue
        rows.append(H.row(OP, case, f"mmcore:{be}", shape, dtype, device, t, flops=fl,
                          baseline_ms=base.get(best), baseline=f"sdpa-{best}"))
    eq = lambda q_, k_, v_: mmcore.cross_attention(q_, k_, v_, backend="triton")  # noqa: E731
    fn = _call(eq, bwd, q, k, v, dout)
    t = H.time_fn(fn, device)
    best_eq = min(base.values()) if base else None
    rows.append(H.row(OP, case, "mmcore:triton (equal lengths)", shape, dtype, device, t,
                      flops=fl_eq, baseline_ms=base.get("flash"),
                      baseline="sdpa-flash (equal lengths, no mask)",
                      note=None if "flash" in base else
                      f"flash unavailable; best other {best_eq}"))


def _co_case(rows, B, Hh, St, Sv, D, bwd, dtype, device, mem):
    from torch.nn.attention import SDPBackend

    Lt, Lv = _lengths(B, St, 0.4), _lengths(B, Sv, 0.5)
    shape = dict(B=B, H=Hh, St=St, Sv=Sv, D=D, Lt=Lt.tolist(), Lv=Lv.tolist())
    case = f"co-attention {'fwd+bwd' if bwd else 'fwd'} St={St} Sv={Sv} D={D}"
    if H.out_of_time():
        rows.append(H.skipped(OP, case, shape, dtype, device))
        return
    g = torch.Generator().manual_seed(1)
    mk = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype).requires_grad_(bwd)  # noqa
    qt, kt, vt, rt = (mk(B, Hh, St, D) for _ in range(4))
    qv, kv, vv, rv = (mk(B, Hh, Sv, D) for _ in range(4))
    dt_, dv_ = torch.randn_like(qt), torch.randn_like(qv)
    leaves = (qt, kt, vt, rt, qv, kv, vv, rv)
    lt, lv = Lt.to(device), Lv.to(device)
    fl = _flops(Hh, D, Lt, Lv, bwd) * 2
    m_tv, m_vt = _mask(Lt, Lv, St, Sv, device), _mask(Lv, Lt, Sv, St, device)

    def run(fwd):
        if not bwd:
            return fwd
        return lambda: torch.autograd.grad(fwd(), leaves, (dt_, dv_))

    def ours():
        return co_attention(qt, kt, vt, qv, kv, vv, text_lengths=lt, image_lengths=lv,
                            residual_t=rt, residual_v=rv, backend="triton")

    best = None
    for name, be in (("efficient", SDPBackend.EFFICIENT_ATTENTION),
                     ("cudnn", SDPBackend.CUDNN_ATTENTION), ("math", SDPBackend.MATH)):
        if name == "math" and St * Sv * B * Hh > (1 << 31):
            continue
        def two(be=be):
            from torch.nn.attention import sdpa_kernel
            with sdpa_kernel([be]):
                a = F.scaled_dot_product_attention(qt, kv, vv, attn_mask=m_tv)
                b = F.scaled_dot_product_attention(qv, kt, vt, attn_mask=m_vt)
            return rt + a, rv + b
        try:
            fn = run(two)
            fn()
            t, pk = _measure(fn, device, mem)
        except Exception as e:
            rows.append(H.row(OP, case, f"2x sdpa-{name} + residual adds", shape, dtype,
                              device, None, note=f"unsupported: {type(e).__name__}"))
            continue
        rows.append(H.row(OP, case, f"2x sdpa-{name} + residual adds", shape, dtype, device,
                          t, flops=fl, peak=pk))
        if best is None or t["median_ms"] < best[1]:
            best = (name, t["median_ms"])
    fn = run(ours)
    t, pk = _measure(fn, device, mem)
    rows.append(H.row(OP, case, "mmcore:co_attention (1 launch, fused residual)", shape, dtype,
                      device, t, flops=fl, peak=pk, baseline_ms=best[1] if best else None,
                      baseline=f"2x sdpa-{best[0]} + residual adds" if best else None))

    def auto():
        return co_attention(qt, kt, vt, qv, kv, vv, text_lengths=lt, image_lengths=lv,
                            residual_t=rt, residual_v=rv, backend="auto")
    t = H.time_fn(run(auto), device)
    rows.append(H.row(OP, case, "mmcore:co_attention auto", shape, dtype, device, t, flops=fl,
                      baseline_ms=best[1] if best else None,
                      baseline=f"2x sdpa-{best[0]} + residual adds" if best else None))


def _cpu(rows, quick):
    device = "cpu"
    dtype = torch.float32
    B, Hq, Sk, D = 2, 4, 577, 64
    Sq = 1024 if quick else 8192
    rep = 3 if quick else 5
    for lengths in (True,) if quick else (True, False):
        Lq = _lengths(B, Sq, 0.25) if lengths else torch.full((B,), Sq)
        Lk = _lengths(B, Sk, 0.3) if lengths else torch.full((B,), Sk)
        shape = dict(B=B, Hq=Hq, Hkv=Hq, Sq=Sq, Sk=Sk, D=D, Lq=Lq.tolist(), Lk=Lk.tolist())
        mask = _mask(Lq, Lk, Sq, Sk, device) if lengths else None
        for bwd in (False, True):
            case = f"{'fwd+bwd' if bwd else 'fwd'} Sq={Sq} Sk={Sk} D={D}" + \
                ("" if lengths else " equal lengths")
            if H.out_of_time():  # --budget spent
                rows.append(H.skipped(OP, case, shape, dtype, device))
                continue
            q, k, v, dout = _inputs(B, Hq, Hq, Sq, Sk, D, dtype, device, bwd)
            fl = _flops(Hq, D, Lq, Lk, bwd)
            sd = _call(lambda q_, k_, v_: F.scaled_dot_product_attention(q_, k_, v_,
                                                                         attn_mask=mask),
                       bwd, q, k, v, dout)
            t_sd = H.time_fn(sd, device, warmup=1, rep=rep)
            sd_name = "sdpa (bool mask)" if lengths else "sdpa"
            rows.append(H.row(OP, case, sd_name, shape, dtype, device, t_sd, flops=fl))
            sq, sk = (Lq, Lk) if lengths else (None, None)
            for be in ("cpu",) if quick else ("cpu", "sdpa"):
                ours = _call(lambda q_, k_, v_, be=be: mmcore.cross_attention(
                    q_, k_, v_, seqlens_q=sq, seqlens_k=sk, backend=be), bwd, q, k, v, dout)
                t = H.time_fn(ours, device, warmup=1, rep=rep)
                rows.append(H.row(OP, case, f"mmcore:{be}", shape, dtype, device, t, flops=fl,
                                  baseline_ms=t_sd["median_ms"], baseline=sd_name))
    return rows


def run(quick: bool, device: str) -> list:
    rows: list = []
    if not str(device).startswith("cuda"):
        return _cpu(rows, quick)
    dtype = torch.bfloat16
    import os

    if quick:
        shapes = [(2048, 197, 64), (8192, 577, 64), (8192, 50, 128)]
    elif os.environ.get("MMCORE_BENCH_SWEEP") == "1":
        shapes = [(sq, sk, d) for d in (64, 128) for sq in (512, 2048, 8192, 32768)
                  for sk in (50, 197, 257, 577, 1025)]
    else:  # the grid of `mmcore bench --device cuda` (8 minutes for every op)
        shapes = [(2048, 197, 64), (8192, 577, 64), (8192, 50, 128), (8192, 1025, 64),
                  (32768, 257, 128)]
    for sq, sk, d in shapes:
        B = max(1, 16384 // sq) if sq < 32768 else 1
        Hq = 8 if d == 64 else 4
        mem = sq == 8192
        for bwd in (False, True):
            _gpu_case(rows, B, Hq, sq, sk, d, bwd, dtype, device, mem)
    co = [(8192, 577, 64)] if quick else [(8192, 577, 64), (2048, 197, 64), (32768, 257, 128)]
    for st, sv, d in co:
        for bwd in (False, True):
            _co_case(rows, 2 if st <= 8192 else 1, 8 if d == 64 else 4, st, sv, d, bwd, dtype,
                     device, st == 8192)
    return rows
