"""window_attention: mmcore against the baselines a user would pick instead.

CUDA (bf16, B=1, H=16): mmcore `triton` vs SDPA with a dense bool mask (skipped when the mask
would pass ~8 GB), FlexAttention with a sliding-window(+global) block mask (compiled), and
flash-attn's window_size where importable (no global tokens there).  N sweep 4k..128k
(quick: 4k, 16k); window (4096, 0) causal and (256, 256) bidirectional, plus one Longformer
case (±256 with 64 global tokens); D 64 / 128; fwd and fwd+bwd.

CPU (fp32, B=1, H=12): mmcore `cpu` (`torch` when the extension is not built) against
  * sdpa-dense-mask: F.scaled_dot_product_attention with the (N, N) bool mask; N <= 8k, plus
    the one fwd point at 16k (~16 s a call); a "skipped" row above;
  * sdpa-chunked: a query-chunk loop calling SDPA on each chunk's key range (the best a user
    can hand-write; windows without global tokens);
  * flex-attention: torch.compile'd flex_attention with the block mask, fwd only, no_grad;
    an "unavailable: ..." / "failed: ..." row with the reason where it does not run;
  * mmcore:torch (the pure-PyTorch reference backend): the N sweep up to 8k only (slow);
  * hf-longformer: HF's LongformerSelfAttention (one layer, eval, attention_window = 2w) on
    hidden states (1, N, H·D), against the same module after mmcore.patch (rows
    "longformer-layer"): both include the q/k/v (and *_global) projections, so the ratio is
    the attention difference only; needs N % 2w == 0, else a "skipped" row.
Sweeps: fwd bidir ±256 D=64 over N 1k..32k; windows ±128/±1024/±4096 at N=8k; D=128 at 8k;
causal (4096, 0) and (256, 0) at 8k; fwd+bwd (autograd; mmcore, chunked, dense at 4k) at
N=4k, 16k; longformer-layer ±256 with G=0 and G=64 at N=4k, 16k.  Quick: fwd bidir ±256
D=64 at N=512, 1k, 2k (mmcore cpu, dense, chunked; no peak memory).  Every baseline's output (fwd+bwd: its
gradients) is checked against mmcore's once per case, at the warm-up call, and a mismatch
raises (no row for a wrong comparison).  Peak memory: growth of peak RSS during one call.
`python benchmarks/report.py rows.jsonl --plot t_vs_n.png` draws time vs N (log-log).

Useful FLOPs only: fwd 4·B·H·pairs·D with `pairs` the exact number of allowed (query, key)
pairs (counted per row in closed form, see `allowed_pairs`); fwd+bwd = 3.5x fwd; the
longformer-layer rows add the projections, 2·N·E² each (3 regular, and with G > 0 key/value
_global over N rows and query_global over G rows), E = H·D.
Ratios (harness.compare): each baseline row carries "mmcore x faster than this row"
(its time / mmcore's), mmcore's row the ratio against the fastest baseline; > 1 means mmcore
is faster.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import mmcore
from mmcore.benchmarks import harness
from mmcore.ops import registry

OP = "window_attention"
_DENSE_LIMIT = 8e9  # bytes: skip the dense-mask baseline above this


def allowed_pairs(N, left, right, causal, G):
    """Exact count of allowed (i, j) for Sq = Sk = N, no padding (docs/design.md's allowed()).

    Per row i: the window [max(0, i-left), min(N-1, i+right)] plus the global keys [0, G)
    outside it; a global row (i < G) sees every key (causal: keys j <= i)."""
    if causal:
        right = 0
    i = torch.arange(N, dtype=torch.int64)
    lo = torch.clamp(i - left, min=0) if left >= 0 else torch.zeros_like(i)
    hi = torch.clamp(i + right, max=N - 1) if right >= 0 else torch.full_like(i, N - 1)
    win = hi - lo + 1
    row = win + torch.clamp(lo, max=G)  # + the global keys below the window
    full = (i + 1) if causal else torch.full_like(i, N)
    row = torch.where(i < G, full, row)
    return int(row.sum())


def _dense_mask(N, left, right, causal, G, device):
    i = torch.arange(N, device=device)[:, None]
    j = torch.arange(N, device=device)[None, :]
    r = 0 if causal else right
    m = torch.ones(N, N, dtype=torch.bool, device=device)
    if left >= 0:
        m &= j >= i - left
    if r >= 0:
        m &= j <= i + r
    glob = (j < G) | (i < G)
    if causal:
        glob &= j <= i
    return m | glob


def _chunked_sdpa(q, k, v, left, right, C=256):
    """Query chunks of C rows against their key range (bidirectional window, no globals)."""
    N = q.shape[2]
    out = torch.empty_like(q)
    for i0 in range(0, N, C):
        i1 = min(N, i0 + C)
        k0, k1 = max(0, i0 - left), min(N, i1 + right)
        i = torch.arange(i0, i1)[:, None]
        j = torch.arange(k0, k1)[None, :]
        m = (j >= i - left) & (j <= i + right)
        out[:, :, i0:i1] = F.scaled_dot_product_attention(q[:, :, i0:i1], k[:, :, k0:k1],
                                                          v[:, :, k0:k1], attn_mask=m)
    return out


def _flex(left, right, causal, G, N, device):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    r = 0 if causal else right
    left = left if left >= 0 else N  # -1: unbounded
    # Every call compiles afresh (new mask_mod closure / N): reset dynamo first, or after 8
    # compiles (its recompile_limit per function) flex_attention would silently run eagerly.
    torch._dynamo.reset()

    def mask_mod(b, h, qi, kv):
        inwin = (kv >= qi - left) & (kv <= qi + r)
        glob = (kv < G) | (qi < G)
        if causal:
            glob = glob & (kv <= qi)
        return inwin | glob

    bm = create_block_mask(mask_mod, B=None, H=None, Q_LEN=N, KV_LEN=N, device=device,
                           _compile=True)
    fn = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: fn(q, k, v, block_mask=bm)


def _flash_attn():
    try:
        from flash_attn import flash_attn_func  # noqa: F401
        return flash_attn_func
    except Exception:
        return None


def _mk(B, H, N, D, dtype, device, grad):
    g = torch.Generator(device="cpu").manual_seed(0)
    ts = [torch.randn(B, H, N, D, generator=g, dtype=torch.float32).to(device, dtype)
          for _ in range(4)]
    for t in ts[:3]:
        t.requires_grad_(grad)
    return ts


def _measure(fn, device, big=False, quick=False):
    if str(device).startswith("cuda"):
        return harness.time_fn(fn, device)
    # CPU: _case_rows has made one warm-up call already; big and quick cases take no second
    return harness.time_fn(fn, device, warmup=0 if big or quick else 1, rep=3)


class _Mismatch(AssertionError):
    """A baseline disagrees with mmcore: raised out of _case_rows, never made a row."""


def _tensors(out):
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in _tensors(o)] if isinstance(out, (tuple, list)) else []


def _check_close(name, out, ref, tol=1e-3):
    """Raise _Mismatch unless out's tensors match ref's (allclose, rtol = atol = tol)."""
    a, b = _tensors(out), _tensors(ref)
    same = [x.shape == y.shape for x, y in zip(a, b)]
    if len(a) == len(b) and all(same) and all(
            torch.allclose(x.float(), y.float(), rtol=tol, atol=tol) for x, y in zip(a, b)):
        return
    err = max([(x.float() - y.float()).abs().max().item()
               for x, y, ok in zip(a, b, same) if ok], default=float("nan"))
    raise _Mismatch(f"{name} disagrees with mmcore: {len(a)} vs {len(b)} tensors, "
                    f"shapes equal {same}, max abs err {err:.3g} (tol {tol:g})")


def _case_rows(label, shape, dtype, device, impls, flops, ours="mmcore:triton", check=False,
               quick=False):
    """Run each (name, fn_or_note) and make rows; ratios against `ours`.

    check: compare each baseline's warm-up output with ours' (`ours` must come first in
    `impls`) and raise _Mismatch if they differ.  quick: no second warm-up, no peak-memory
    call (`mmcore bench --quick` must finish in a minute on 2 cores)."""
    res = {}
    ref = None
    for name, fn in impls:
        if isinstance(fn, str):
            res[name] = (None, None, fn)
            continue
        try:
            out = fn()  # warm-up / compile
            if check and name == ours:
                ref = out
            elif check and ref is not None:
                _check_close(f"{label}: {name}", out, ref)
            del out
            t = _measure(fn, device, big=shape["N"] >= 8192, quick=quick)
            peak = None if quick else harness.peak_memory(fn, device)
            res[name] = (t, peak, None)
        except _Mismatch:
            raise
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            res[name] = (None, None, "OOM")
        except Exception as e:  # a baseline that cannot run this case is a row, not a crash
            res[name] = (None, None, f"failed: {type(e).__name__}: {str(e)[:120]}")
    rows = [harness.row(OP, label, name, shape, dtype, device, t, flops=flops, peak=peak,
                        note=note) for name, (t, peak, note) in res.items()]
    return harness.compare(rows, ours)


def gpu_grid(quick, sweep=False):
    """(case name, left, right, causal, G, D, N, modes) of each GPU case.

    Default: the 8-minute grid of `mmcore bench --device cuda` (D = 128, N 4k / 16k / 32k,
    fwd+bwd up to 16k); sweep (MMCORE_BENCH_SWEEP=1): N 4k..128k at D 64 and 128."""
    both, fwd = ("fwd", "fwd+bwd"), ("fwd",)
    if sweep:
        return [(c, l, r, ca, G, D, N, both) for D in (64, 128)
                for c, l, r, ca, G in (("causal w=(4096,0)", 4096, 0, True, 0),
                                       ("bidir w=±256", 256, 256, False, 0),
                                       ("longformer w=±256 G=64", 256, 256, False, 64))
                for N in (4096, 8192, 16384, 32768, 65536, 131072)]
    if quick:
        return [(c, l, r, ca, 0, 64, N, both) for N in (4096, 16384)
                for c, l, r, ca in (("causal w=(4096,0)", 4096, 0, True),
                                    ("bidir w=±256", 256, 256, False))]
    g = []
    for N in (4096, 16384, 32768):
        modes = both if N <= 16384 else fwd
        g += [("causal w=(4096,0)", 4096, 0, True, 0, 128, N, modes),
              ("bidir w=±256", 256, 256, False, 0, 128, N, modes),
              ("causal full", -1, 0, True, 0, 128, N, modes)]
    g.append(("longformer w=±256 G=64", 256, 256, False, 64, 128, 16384, both))
    return g


def _gpu(quick, device):
    """Per case: mmcore auto and each backend that serves it (triton, flex, sdpa) against
    SDPA with a dense mask, FlexAttention as a user writes it, and flash-attn; every row's
    ratio is against auto (the rule: auto >= 0.95x the fastest row)."""
    import os

    rows = []
    B, H, dtype = 1, 16, torch.bfloat16
    flash = _flash_attn()
    for cname, left, right, causal, G, D, N, modes in gpu_grid(
            quick, os.environ.get("MMCORE_BENCH_SWEEP") == "1"):
        pairs = allowed_pairs(N, left, right, causal, G)
        shape = dict(B=B, H=H, N=N, D=D, left=left, right=right, G=G, pairs=pairs)
        for mode in modes:
            label = f"{mode} {cname} D={D} N={N}"
            if harness.out_of_time():
                rows.append(harness.skipped(OP, label, shape, dtype, device))
                continue
            grad = mode == "fwd+bwd"
            q, k, v, do = _mk(B, H, N, D, dtype, device, grad)
            flops = 4 * B * H * pairs * D * (3.5 if grad else 1.0)

            def wrap(f, grad=grad, q=q, k=k, v=v, do=do):
                return _runner(f, grad, q, k, v, do)

            def ours(be):
                return wrap(lambda q, k, v: mmcore.window_attention(
                    q, k, v, window=(left, right), causal=causal, global_tokens=G,
                    backend=be))
            p = registry.Problem(OP, "cuda", dtype, head_dim=D, needs_grad=grad,
                                 global_tokens=G, extra={
                                     "Sq": N, "Sk": N, "window": (left, right),
                                     "causal": causal, "aligned": True})
            impls = [("mmcore:auto", ours("auto"))]
            for be in ("triton", "flex", "sdpa"):
                why = registry.get(OP, be).refuse(p)
                impls.append((f"mmcore:{be}", f"refused: {why[0]}" if why else
                              ours(be)))
            if N * N * 3 > _DENSE_LIMIT:
                impls.append(("sdpa-dense-mask",
                              f"OOM/skipped: dense mask {N * N * 3 / 1e9:.0f} GB"))
            else:
                mask = _dense_mask(N, left, right, causal, G, device)
                impls.append(("sdpa-dense-mask", wrap(
                    lambda q, k, v, m=mask: F.scaled_dot_product_attention(
                        q, k, v, attn_mask=m))))
            try:
                fl = _flex(left, right, causal, G, N, device)
                impls.append(("flex-attention", wrap(fl)))
            except Exception as e:
                impls.append(("flex-attention", f"unavailable: {type(e).__name__}"))
            if flash is not None and G == 0:
                impls.append(("flash-attn", wrap(
                    lambda q, k, v: flash(q.transpose(1, 2), k.transpose(1, 2),
                                          v.transpose(1, 2), causal=causal,
                                          window_size=(left, 0 if causal else right)
                                          ).transpose(1, 2))))
            rows += _case_rows(label, shape, dtype, device, impls, flops,
                               ours="mmcore:auto")
            del q, k, v, do, impls
            torch.cuda.empty_cache()
    return rows


def _runner(f, grad, q, k, v, do):
    """-> fn() for _case_rows: f(q, k, v) under no_grad (fwd), or f then autograd.grad of
    (q, k, v) with upstream gradient do (fwd+bwd; returns (dq, dk, dv))."""
    if not grad:
        def run():
            with torch.no_grad():
                return f(q, k, v)
    else:
        def run():
            return torch.autograd.grad(f(q, k, v), (q, k, v), do)
    return run


def _longformer_layer(H, D, w, G, N, backend):
    """One HF LongformerSelfAttention (fp32, eval, attention_window 2w) and the same module
    patched by mmcore -> (ours_fn, hf_fn, projection FLOPs); each fn() -> (1, N, H*D)."""
    from transformers import LongformerConfig
    from transformers.models.longformer.modeling_longformer import LongformerSelfAttention
    from mmcore.patch import hf_interface as hfi

    E = H * D
    cfg = LongformerConfig(hidden_size=E, num_attention_heads=H, attention_window=[2 * w],
                           num_hidden_layers=1, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    mod = LongformerSelfAttention(cfg, layer_id=0).eval()
    hf = mod.forward  # HF's own forward, bound before mmcore.patch replaces mod.forward
    rep = mmcore.patch(mod, lora=False, backend=backend)
    if len(rep.replaced) != 1:
        raise RuntimeError(f"mmcore.patch did not take the Longformer layer: {rep.left}")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, N, E, generator=g)  # hidden states (B, N, E)
    am = torch.zeros(1, N)  # (B, N) as LongformerModel passes it: 0 local, +10000 global
    am[:, :G] = 10000.0
    kw = dict(attention_mask=am, is_index_masked=am < 0, is_index_global_attn=am > 0,
              is_global_attn=G > 0)

    def ours():
        n = hfi.STATS.op_calls
        out = mod(x, **kw)[0]
        if hfi.STATS.op_calls == n:  # the adapter fell back to HF: nothing to compare
            raise _Mismatch(f"mmcore's Longformer adapter fell back to HF's forward: "
                            f"{hfi.STATS.fallback_reasons}")
        return out

    proj = 2 * N * E * E * (3 + (2 + G / N if G else 0))
    return ours, (lambda: hf(x, **kw)[0]), proj


def _cpu_cases(quick):
    """(mode, left, right, causal, G, D, N) of each CPU case; mode fwd | fwd+bwd | layer."""
    if quick:
        return [("fwd", 256, 256, False, 0, 64, N) for N in (512, 1024, 2048)]
    cs = [("fwd", 256, 256, False, 0, 64, 1024 << i) for i in range(6)]  # N 1k..32k
    cs += [("fwd", w, w, False, 0, 64, 8192) for w in (128, 1024, 4096)]  # ±256: above
    cs += [("fwd", 256, 256, False, 0, 128, 8192)]
    cs += [("fwd", w, 0, True, 0, 64, 8192) for w in (4096, 256)]
    cs += [("fwd+bwd", 256, 256, False, 0, 64, N) for N in (4096, 16384)]
    cs += [("layer", 256, 256, False, G, 64, N) for G in (0, 64) for N in (4096, 16384)]
    return cs


def _cpu(quick, device, cases=None):
    rows = []
    B, H, dtype = 1, 12, torch.float32
    for mode, left, right, causal, G, D, N in cases or _cpu_cases(quick):
        grad = mode == "fwd+bwd"
        have_cpu = any(i.backend == "cpu" and not i.refuse(registry.Problem(
            OP, "cpu", dtype, head_dim=D, needs_grad=grad, global_tokens=G))
            for i in registry.implementations(OP))
        ours = "mmcore:cpu" if have_cpu else "mmcore:torch"
        backend = ours.split(":")[1]
        right = 0 if causal else right
        pairs = allowed_pairs(N, left, right, causal, G)
        shape = dict(B=B, H=H, N=N, D=D, left=left, right=right, G=G, pairs=pairs)
        flops = 4 * B * H * pairs * D * (3.5 if grad else 1.0)
        cname = (f"causal w=({left},0)" if causal else
                 f"bidir w=±{left}" if left == right else f"bidir w=({left},{right})")
        if harness.out_of_time():  # --budget spent: the rest are "skipped" rows
            rows.append(harness.skipped(OP, f"{mode} {cname} D={D} N={N}", shape, dtype,
                                        device))
            continue
        if mode == "layer":  # HF's module vs the same module patched: both project q/k/v
            ours_fn, hf_fn, proj = _longformer_layer(H, D, left, G, N, backend)
            hf_ok = left == right and N % (2 * left) == 0
            impls = [(ours, ours_fn), ("hf-longformer", hf_fn if hf_ok else
                                       f"skipped: HF needs N % {2 * left} == 0")]
            with torch.no_grad():
                rows += _case_rows(f"fwd longformer-layer w=±{left} G={G} D={D} N={N}",
                                   shape, dtype, device, impls, flops + proj, ours=ours,
                                   check=True)
            continue
        q, k, v, do = _mk(B, H, N, D, dtype, device, grad)  # (B, H, N, D) each

        def run(f):
            return _runner(f, grad, q, k, v, do)

        impls = [(ours, run(lambda q, k, v: mmcore.window_attention(
            q, k, v, window=(left, right), causal=causal, global_tokens=G, backend=backend)))]
        ref_sweep = mode == "fwd" and N <= 8192 and (left, right, D) == (256, 256, 64)
        if ours != "mmcore:torch" and ref_sweep and not quick:
            impls.append(("mmcore:torch", run(lambda q, k, v: mmcore.window_attention(
                q, k, v, window=(left, right), causal=causal, global_tokens=G,
                backend="torch"))))
        if (N <= 8192 or (N == 16384 and mode == "fwd")) and N * N * 5 <= _DENSE_LIMIT:
            mask = _dense_mask(N, left, right, causal, G, device)  # (N, N) bool
            impls.append(("sdpa-dense-mask", run(
                lambda q, k, v, m=mask: F.scaled_dot_product_attention(q, k, v, attn_mask=m))))
        else:
            impls.append(("sdpa-dense-mask", f"skipped: (N, N) mask at N={N} (time)"))
        if G == 0:
            impls.append(("sdpa-chunked", run(
                lambda q, k, v: _chunked_sdpa(q, k, v, left, right))))
        if mode == "fwd" and not quick:
            try:
                impls.append(("flex-attention", run(_flex(left, right, causal, G, N, device))))
            except Exception as e:
                impls.append(("flex-attention",
                              f"unavailable: {type(e).__name__}: {str(e)[:120]}"))
        rows += _case_rows(f"{mode} {cname} D={D} N={N}", shape, dtype, device, impls, flops,
                           ours=ours, check=True, quick=quick)
        del q, k, v, do, impls
    return rows


def _dropout_cases(quick):
    """(label, B, H, N, D, window) of the attention-dropout comparison (fp32, fwd+bwd)."""
    if quick:
        return [("bert S=128", 2, 12, 128, 64, None)]
    return [("bert S=128", 8, 12, 128, 64, None), ("bert S=512", 8, 12, 512, 64, None),
            ("window N=4096 w=±256", 1, 12, 4096, 64, (256, 256))]


def dropout_cpu(quick=False, repeats=7, p=0.1):
    """Attention dropout on the CPU, fwd+bwd (autograd), fp32, interleaved: every repeat runs
    each implementation once, in turn, and the rows report the median over repeats.

      * mmcore:cpu dropout: the C++ kernels with dropout_p = p (the row the ratios are about);
      * mmcore:cpu (no dropout): the same call without dropout (the floor: the mask's cost);
      * dense-eager+dropout: HF's eager attention, softmax(QKᵀ·scale + mask) then
        F.dropout(p) then @V (mmcore/patch/hf_interface.py `_dense_attention`, the path that
        mmcore.patch falls back to); windowed cases add the (N, N) additive mask;
      * mmcore:torch dropout: the pure-PyTorch reference backend with dropout_p = p.
    BERT-base shapes (B = 8, H = 12, D = 64, S = 128 and 512) and one window case.  Ratios:
    each baseline row's "mmcore x faster" is its time / mmcore:cpu dropout's."""
    import time as _time

    from mmcore.patch import hf_interface as hfi
    rows = []
    dtype = torch.float32
    for label, B, H, N, D, win in _dropout_cases(quick):
        left, right = win or (-1, -1)
        pairs = allowed_pairs(N, left, right, False, 0) if win else N * N
        flops = 4 * B * H * pairs * D * 3.5
        shape = dict(B=B, H=H, N=N, D=D, left=left, right=right, G=0, pairs=pairs, p=p)
        q, k, v, do = _mk(B, H, N, D, dtype, "cpu", True)
        scale = D ** -0.5
        add = None
        if win:
            m = _dense_mask(N, left, right, False, 0, "cpu")
            add = torch.zeros(N, N).masked_fill(~m, torch.finfo(torch.float32).min)[None, None]
        w = None if not win else (left, right)

        def op(backend, dp):
            return lambda q, k, v: mmcore.window_attention(q, k, v, window=w, dropout_p=dp,
                                                           backend=backend)
        impls = [("mmcore:cpu dropout", op("cpu", p)), ("mmcore:cpu (no dropout)", op("cpu", 0.0)),
                 ("dense-eager+dropout", lambda q, k, v: hfi._dense_attention(
                     q, k, v, add, scale, p, None, True)),
                 ("mmcore:torch dropout", op("torch", p))]
        fns = [(n, _runner(f, True, q, k, v, do)) for n, f in impls]
        for _, fn in fns:  # warm-up
            fn()
        times = {n: [] for n, _ in fns}
        for _ in range(2 if quick else repeats):
            for n, fn in fns:
                t0 = _time.perf_counter()
                fn()
                times[n].append((_time.perf_counter() - t0) * 1e3)
        res = []
        for n, _ in fns:
            ts = sorted(times[n])
            t = {"median_ms": ts[len(ts) // 2], "p20_ms": ts[int(0.2 * (len(ts) - 1))],
                 "p80_ms": ts[int(round(0.8 * (len(ts) - 1)))]}
            res.append(harness.row(OP, f"fwd+bwd dropout p={p} {label} D={D}", n, shape, dtype,
                                   "cpu", t, flops=flops,
                                   note="floor: no dropout" if "no dropout" in n else None))
        rows += harness.compare(res, "mmcore:cpu dropout", exclude=("mmcore:cpu (no dropout)",))
        del q, k, v, do, fns
    return rows


def smoke(device: str) -> list:
    """Two tiny CPU cases (fwd ±64, D=32, N=256 / 512): the runner's self-test in CI (about
    a second), not a measurement."""
    return _cpu(True, "cpu", cases=[("fwd", 64, 64, False, 0, 32, N) for N in (256, 512)])


def run(quick: bool, device: str) -> list:
    """Benchmark rows (harness.row dicts) for window_attention on `device`."""
    if str(device).startswith("cuda"):
        return _gpu(quick, device)
    return _cpu(quick, device)


if __name__ == "__main__":  # python benchmarks/bench_window_attention.py [--quick]
    import sys

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if "--dropout" in sys.argv:  # attention dropout on the CPU (interleaved, fwd+bwd)
        rs = dropout_cpu("--quick" in sys.argv)
    else:
        rs = run("--quick" in sys.argv, dev)
    print(harness.markdown_table(rs))
