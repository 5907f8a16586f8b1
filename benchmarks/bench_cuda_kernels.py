"""The `cuda` backend's kernels (csrc/cuda) against what a user would run instead. GPU only.

Decode (window_decode.cu): one query token per sequence attending to its whole cached
context (causal, Sq = 1), context 4k ... 1M, GQA 32/8 and 32/4, B = 1 ... 64, D = 128, bf16:
mmcore:cuda vs mmcore:triton (the Triton split-K decode path), SDPA (enable_gqa) and
FlexAttention (compiled; the target shape only: each shape compiles afresh).  Bytes moved =
the K and V read (B·Hkv·S·D·2 tensors·2 bytes); GB/s and % of the copy bandwidth measured in
the same run.  Ratios: "mmcore:cuda x faster than <row>" (> 1: the CUDA kernel is faster).

Multi-adapter LoRA (lora_sgmv.cu): 4096x4096, r = 16, bf16, adapters 1 / 8 / 64 / 512 by row
id, M = 16 ... 8192: mmcore:cuda (SGMV) vs mmcore:triton (fused), the `composed` backend where
registered, and a loop over adapters with boolean indexing (peft's mixed batch): ratio
"mmcore:cuda x faster than the loop", and every row's note gives its time over mmcore:cuda
with a single adapter and no ids at the same M (the issue's targets: 64 adapters <= 1.3x at
M = 8192, <= 1.5x at M = 64).

The grid is sized to finish in about two minutes on an H100.

    python benchmarks/bench_cuda_kernels.py [--quick]      (or: mmcore bench --op cuda_kernels)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import mmcore
import mmcore.ops
from mmcore.benchmarks import harness
from mmcore.benchmarks.harness import roofline, row, time_fn

# (context, batches) per GQA: K/V of one sample at 1M tokens, 8 kv heads, D = 128 is 4 GiB
DECODE_GRID = [(4096, (1, 8, 64)), (32768, (1, 8, 64)), (131072, (1, 8, 16)), (1 << 20, (1, 2))]
GQAS = [(32, 8), (32, 4)]
FLEX_CASES = {(131072, 1, 8), (131072, 8, 8)}  # (context, B, Hkv): compiled per shape
LORA_MS = (16, 64, 512, 8192)
LORA_ADAPTERS = (1, 8, 64, 512)


def _flex_decode(device):
    from torch.nn.attention.flex_attention import flex_attention

    torch._dynamo.reset()
    fn = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: fn(q, k, v, enable_gqa=True)


def _decode_rows(quick, device):
    rows = []
    dtype, D = torch.bfloat16, 128
    copy = roofline(device)["copy_gbs"]
    grid = DECODE_GRID[:3] if quick else DECODE_GRID
    for Hq, Hkv in GQAS[:1] if quick else GQAS:
        for S, Bs in grid:
            for B in Bs[:2] if quick else Bs:
                try:
                    q = torch.randn(B, Hq, 1, D, device=device, dtype=dtype)
                    k = torch.randn(B, Hkv, S, D, device=device, dtype=dtype)
                    v = torch.randn(B, Hkv, S, D, device=device, dtype=dtype)
                except torch.cuda.OutOfMemoryError:
                    rows.append(row("window_attention", f"decode S={S} B={B} GQA {Hq}/{Hkv}",
                                    "mmcore:cuda", {}, dtype, device, None,
                                    note="out of memory"))
                    continue
                shape = {"B": B, "Hq": Hq, "Hkv": Hkv, "S": S, "D": D, "Sq": 1}
                nbytes = 2 * B * Hkv * S * D * q.element_size()
                impls = {
                    "mmcore:cuda": lambda: mmcore.window_attention(q, k, v, causal=True,
                                                                   backend="cuda"),
                    "mmcore:triton": lambda: mmcore.window_attention(q, k, v, causal=True,
                                                                     backend="triton"),
                    "sdpa (enable_gqa)": lambda: F.scaled_dot_product_attention(
                        q, k, v, enable_gqa=True),
                }
                if (S, B, Hkv) in FLEX_CASES and not quick:
                    try:
                        fl = _flex_decode(device)
                        impls["flex-attention decoding"] = lambda fl=fl: fl(q, k, v)
                    except Exception as e:  # noqa: BLE001 - report, keep benchmarking
                        impls["flex-attention decoding"] = f"unavailable: {type(e).__name__}"
                rows += _ratio_rows("window_attention", f"decode S={S} B={B} GQA {Hq}/{Hkv}",
                                    shape, dtype, device, impls, "mmcore:cuda", nbytes, copy)
                del q, k, v
                torch.cuda.empty_cache()
    return rows


def _ratio_rows(op, case, shape, dtype, device, impls, ref, nbytes=None, copy=None, ref_ms=None):
    """Time every impl; ratios "mmcore:cuda x faster than <row>" (harness.compare); with
    ref_ms, each row's note also gives its time over ref_ms (named `ref`)."""
    out, times = [], {}
    with torch.no_grad():
        for name, fn in impls.items():
            if isinstance(fn, str):
                out.append(row(op, case, name, shape, dtype, device, None, note=fn))
                continue
            try:
                t = time_fn(fn, device)
            except Exception as e:  # noqa: BLE001 - a baseline that cannot run is a row, not a stop
                out.append(row(op, case, name, shape, dtype, device, None,
                               note=f"failed: {type(e).__name__}: {str(e)[:120]}"))
                continue
            times[name] = t["median_ms"]
            r = row(op, case, name, shape, dtype, device, t, bytes_=nbytes)
            if nbytes and copy:
                r["pct_copy_bw"] = 100 * r["gbs"] / copy
            out.append(r)
    if ref_ms:
        for r in out:
            if r["impl"] in times:
                r["note"] = (r.get("note", "") + f" {times[r['impl']] / ref_ms:.2f}x the time"
                             f" of {ref}").strip()
    return harness.compare(out, "mmcore:cuda")


def _lora_rows(quick, device):
    rows = []
    dtype, K, N, r = torch.bfloat16, 4096, 4096, 16
    g = torch.Generator(device=device).manual_seed(0)
    mk = lambda *s, sc=1.0: (torch.randn(*s, generator=g, device=device) * sc).to(dtype)  # noqa
    w, b = mk(N, K, sc=K ** -0.5), mk(N)
    for M in (16, 8192) if quick else LORA_MS:
        x = mk(M, K)
        single = None
        for A in (1, 64) if quick else LORA_ADAPTERS:
            la, lb = mk(A, r, K, sc=K ** -0.5), mk(A, N, r, sc=r ** -0.5)
            s = torch.full((A,), 2.0, device=device)
            ids = (torch.arange(M, device=device) % A)[torch.randperm(M, generator=g,
                                                                      device=device)]
            shape = {"M": M, "K": K, "N": N, "r": r, "adapters": A}
            case = f"lora 4096x4096 r=16 M={M} adapters={A}"
            if A == 1:
                t1 = time_fn(lambda: mmcore.lora_linear(x, w, b, la[0], lb[0], 2.0,
                                                        backend="cuda"), device)
                single = t1["median_ms"]
                rows.append(row("lora_linear", case, "mmcore:cuda single adapter, no ids "
                                "(reference)", shape, dtype, device, t1))

            def loop(la=la, lb=lb, ids=ids, A=A):
                y = F.linear(x, w, b)
                for a in range(A):
                    sel = ids == a
                    y[sel] += (x[sel] @ la[a].t()) @ lb[a].t() * 2.0
                return y

            impls = {name: (lambda be=be, la=la, lb=lb, s=s, ids=ids: mmcore.lora_linear(
                x, w, b, la, lb, s, adapter_ids=ids, backend=be))
                for name, be in (("mmcore:cuda", "cuda"), ("mmcore:triton", "triton"))}
            try:
                p = mmcore.ops.registry.Problem("lora_linear", "cuda", dtype, head_dim=K,
                                                rank=r, adapters=A, extra={"M": M, "N": N})
                mmcore.ops.registry.select("lora_linear", p, "composed")
                impls["mmcore:composed"] = lambda la=la, lb=lb, s=s, ids=ids: mmcore.lora_linear(
                    x, w, b, la, lb, s, adapter_ids=ids, backend="composed")
            except (ValueError, mmcore.ops.BackendError) as e:
                impls["mmcore:composed"] = f"unavailable: {str(e).splitlines()[0][:100]}"
            if A <= 64:
                impls["loop over adapters (boolean indexing)"] = loop
            rows += _ratio_rows("lora_linear", case, shape, dtype, device, impls,
                                "mmcore:cuda single adapter", ref_ms=single)
            del la, lb
        del x
        torch.cuda.empty_cache()
    return rows


def run(quick: bool, device: str) -> list:
    """Benchmark rows (harness.row dicts) for the cuda backend's kernels on `device`."""
    if not str(device).startswith("cuda"):
        return [row("cuda_kernels", "decode + SGMV", "mmcore:cuda", {}, torch.bfloat16, device,
                    None, note="needs a CUDA GPU (csrc/cuda kernels)")]
    return _decode_rows(quick, device) + _lora_rows(quick, device)


if __name__ == "__main__":
    import sys

    from mmcore.benchmarks.harness import markdown_table

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    print(markdown_table(run("--quick" in sys.argv, dev)))
