"""window_attention: mmcore against the baselines a user would pick instead.

CUDA (bf16, B=1, H=16): mmcore `triton` vs SDPA with a dense bool mask (skipped when the mask
would pass ~8 GB), FlexAttention with a sliding-window(+global) block mask (compiled), and
flash-attn's window_size where importable (no global tokens there).  N sweep 4k..128k
(quick: 4k, 16k); window (4096, 0) causal and (256, 256) bidirectional, plus one Longformer
case (±256 with 64 global tokens); D 64 / 128; fwd and fwd+bwd.

CPU (fp32, B=1, H=12, D=64, window ±256): mmcore `torch` and (when built) `cpu` backends vs
dense-mask SDPA and chunked SDPA (a query-chunk loop calling F.scaled_dot_product_attention
on the key range); N 1k..16k (quick: 1k, 4k), fwd.

Useful FLOPs only: fwd 4·B·H·pairs·D with `pairs` the exact number of allowed (query, key)
pairs (counted per row in closed form, see `allowed_pairs`); fwd+bwd = 3.5x fwd.
Every row of a case carries the ratio baseline_ms / ours_ms against mmcore's time
(`speedup_vs_baseline` on the baseline rows is ours-relative: > 1 means mmcore is faster).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import harness
import mmcore
from mmcore.ops import registry

OP = "window_attention"
_DENSE_LIMIT = 8e9  # bytes: skip the dense-mask baseline above this


def allowed_pairs(N, left, right, causal, G):
    """Exact count of allowed (i, j) for Sq = Sk = N, no padding (DESIGN.md's allowed()).

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


def _measure(fn, device, big=False):
    if str(device).startswith("cuda"):
        return harness.time_fn(fn, device)
    return harness.time_fn(fn, device, warmup=1, rep=3)


def _case_rows(label, shape, dtype, device, impls, flops, ours="mmcore:triton"):
    """Run each (name, fn_or_note) and make rows; ratios against `ours`."""
    res = {}
    for name, fn in impls:
        if isinstance(fn, str):
            res[name] = (None, None, fn)
            continue
        try:
            fn()  # warm-up / compile
            t = _measure(fn, device, big=shape["N"] >= 8192)
            peak = harness.peak_memory(fn, device)
            res[name] = (t, peak, None)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            res[name] = (None, None, "OOM")
        except Exception as e:  # a baseline that cannot run this case is a row, not a crash
            res[name] = (None, None, f"failed: {type(e).__name__}: {str(e)[:120]}")
    ours_ms = res.get(ours, (None,))[0]
    ours_ms = ours_ms["median_ms"] if ours_ms else None
    rows = []
    for name, (t, peak, note) in res.items():
        base = None
        if t is not None and ours_ms and name != ours:
            # ratio on the baseline row: its time / ours (> 1: mmcore faster)
            base = ours_ms
        r = harness.row(OP, label, name, shape, dtype, device, t, flops=flops, peak=peak,
                        baseline_ms=None, note=note)
        if base is not None:
            r["speedup_vs_baseline"] = t["median_ms"] / base
            r["note"] = "time / mmcore's time"
        rows.append(r)
    # ours: ratio against the fastest baseline that ran
    done = [(res[n][0]["median_ms"], n) for n in res if n != ours and res[n][0] is not None]
    for r in rows:
        if r["impl"] == ours and done and ours_ms:
            best_ms, best = min(done)
            r["speedup_vs_baseline"] = best_ms / ours_ms
            r["note"] = f"vs fastest baseline {best}"
    return rows


def _gpu(quick, device):
    rows = []
    B, H, dtype = 1, 16, torch.bfloat16
    Ns = (4096, 16384) if quick else (4096, 8192, 16384, 32768, 65536, 131072)
    Ds = (64,) if quick else (64, 128)
    cases = [("causal w=(4096,0)", 4096, 0, True, 0), ("bidir w=±256", 256, 256, False, 0)]
    if not quick:
        cases.append(("longformer w=±256 G=64", 256, 256, False, 64))
    flash = _flash_attn()
    for D in Ds:
        for cname, left, right, causal, G in cases:
            for N in Ns:
                pairs = allowed_pairs(N, left, right, causal, G)
                shape = dict(B=B, H=H, N=N, D=D, left=left, right=right, G=G, pairs=pairs)
                for mode in ("fwd", "fwd+bwd"):
                    grad = mode == "fwd+bwd"
                    q, k, v, do = _mk(B, H, N, D, dtype, device, grad)
                    flops = 4 * B * H * pairs * D * (3.5 if grad else 1.0)

                    def wrap(f, grad=grad, q=q, k=k, v=v, do=do):
                        if not grad:
                            def run():
                                with torch.no_grad():
                                    return f(q, k, v)
                        else:
                            def run():
                                out = f(q, k, v)
                                return torch.autograd.grad(out, (q, k, v), do)
                        return run

                    impls = [("mmcore:triton", wrap(lambda q, k, v: mmcore.window_attention(
                        q, k, v, window=(left, right), causal=causal, global_tokens=G,
                        backend="triton")))]
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
                    label = f"{mode} {cname} D={D} N={N}"
                    rows += _case_rows(label, shape, dtype, device, impls, flops)
                    del q, k, v, do, impls
                    torch.cuda.empty_cache()
    return rows


def _cpu(quick, device):
    rows = []
    B, H, D, left, right, dtype = 1, 12, 64, 256, 256, torch.float32
    Ns = (1024, 4096) if quick else (1024, 2048, 4096, 8192, 16384)
    have_cpu = any(i.backend == "cpu" and not i.refuse(registry.Problem(
        OP, "cpu", dtype, head_dim=D)) for i in registry.implementations(OP))
    for N in Ns:
        pairs = allowed_pairs(N, left, right, False, 0)
        shape = dict(B=B, H=H, N=N, D=D, left=left, right=right, G=0, pairs=pairs)
        q, k, v, _ = _mk(B, H, N, D, dtype, device, False)
        flops = 4 * B * H * pairs * D
        impls = []
        if have_cpu:
            impls.append(("mmcore:cpu", lambda: mmcore.window_attention(
                q, k, v, window=(left, right), backend="cpu")))
        impls.append(("mmcore:torch", lambda: mmcore.window_attention(
            q, k, v, window=(left, right), backend="torch")))
        if N * N * 5 > _DENSE_LIMIT:
            impls.append(("sdpa-dense-mask", "OOM/skipped"))
        else:
            mask = _dense_mask(N, left, right, False, 0, device)
            impls.append(("sdpa-dense-mask", lambda m=mask: F.scaled_dot_product_attention(
                q, k, v, attn_mask=m)))
        impls.append(("sdpa-chunked", lambda: _chunked_sdpa(q, k, v, left, right)))
        ours = "mmcore:cpu" if have_cpu else "mmcore:torch"
        with torch.no_grad():
            rows += _case_rows(f"fwd bidir w=±256 N={N}", shape, dtype, device, impls, flops,
                               ours=ours)
    return rows


def run(quick: bool, device: str) -> list:
    """Benchmark rows (harness.row dicts) for window_attention on `device`."""
    if str(device).startswith("cuda"):
        return _gpu(quick, device)
    return _cpu(quick, device)


if __name__ == "__main__":  # python benchmarks/bench_window_attention.py [--quick]
    import sys

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    rs = run("--quick" in sys.argv, dev)
    print(harness.markdown_table(rs))
