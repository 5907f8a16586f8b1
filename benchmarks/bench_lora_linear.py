"""lora_linear kernels against what a user would run instead (peft's own layer: bench_lora_peft).

GPU (bf16): mmcore's triton kernel, the `composed` backend and `auto` vs F.linear alone
(the floor: LoRA for free), the merged weight (F.linear with W + s·B A, inference only), and
the naive composition (F.linear plus two matmuls and an add, what peft runs); forward, backward (dx, dA, dB vs the base GEMM's dx),
and fwd+bwd through autograd; multi-adapter batches with 1 / 8 / 64 distinct adapters vs the
single-adapter time and vs a boolean-indexing loop over adapters (peft's mixed batch).
CPU (fp32): the C++ kernel (and its measured variants) vs F.linear and the naive composition.

Ratios: "mmcore x faster than <baseline>" (> 1: mmcore faster) against the naive
composition (single adapter) or the boolean-indexing loop (multi-adapter).  F.linear without
LoRA is a floor, not a competitor: mmcore rows say how far above it they run ("+N% time over
the F.linear floor"); multi-adapter rows also give their time over the single-adapter time.
Quick (CPU): M = 256, fwd and fwd+bwd, no kernel variants.

    mmcore bench --op lora_linear [--quick] [--device cuda]
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import mmcore
from mmcore.benchmarks import harness
from mmcore.benchmarks.harness import row, time_fn

OP = "lora_linear"
SHAPES = [("bert-base 768x3072", 768, 3072), ("llama-7b 4096x4096", 4096, 4096),
          ("llama-7b 4096x11008", 4096, 11008), ("llama-70b 8192x8192", 8192, 8192),
          ("llama-70b 8192x28672", 8192, 28672)]


def _operands(M, K, N, r, A, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    mk = lambda *s, sc=1.0: (torch.randn(*s, generator=g, device=device) * sc).to(dtype)  # noqa
    x = mk(M, K)
    w = mk(N, K, sc=K ** -0.5)
    b = mk(N)
    la = mk(A, r, K, sc=K ** -0.5)
    lb = mk(A, N, r, sc=r ** -0.5)
    s = torch.full((A,), 2.0, device=device)
    dy = mk(M, N)
    return x, w, b, la, lb, s, dy


def _flops(M, K, N, r):
    return 2 * M * N * K + 2 * M * r * (K + N)


def _gpu_single(rows, quick, device):
    from mmcore.kernels import lora_linear as kern

    import os

    dtype = torch.bfloat16
    sweep = os.environ.get("MMCORE_BENCH_SWEEP") == "1"
    shapes = SHAPES[:2] if quick else SHAPES if sweep else SHAPES[:3]
    Ms = (16, 8192) if quick else (1, 16, 512, 8192, 16384) if sweep else (16, 512, 8192)
    combos = [(sh, M, 16) for sh in shapes for M in Ms]
    if not quick:
        combos += [(sh, 8192, r) for sh in (shapes if sweep else SHAPES[1:2]) for r in (8, 64)]
    for (label, K, N), M, r in combos:
        if harness.out_of_time():
            rows.append(harness.skipped(OP, f"{label} M={M} r={r}", {}, dtype, device))
            continue
        try:
            x, w, b, la, lb, s, dy = _operands(M, K, N, r, 1, dtype, device)
        except torch.cuda.OutOfMemoryError:
            rows.append(row(OP, f"fwd {label} M={M} r={r}", "mmcore:triton", {}, dtype,
                            device, None, note="out of memory"))
            continue
        shape = {"M": M, "K": K, "N": N, "r": r}
        a2, b2 = la[0], lb[0]
        sc = float(s[0])
        wm = w + sc * (b2.float() @ a2.float()).to(dtype)
        case = f"fwd {label} M={M} r={r}"
        fl = _flops(M, K, N, r)
        t_lin = time_fn(lambda: F.linear(x, w, b), device)
        rows.append(row(OP, case, "F.linear (floor)", shape, dtype, device, t_lin,
                        flops=2 * M * N * K))
        base = t_lin["median_ms"]
        impls = {
            "merged weight": lambda: F.linear(x, wm, b),
            "naive (F.linear + 2 matmuls + add)": lambda: F.linear(x, w, b) + (x @ a2.t()) @ (
                b2.t() * sc),
            "mmcore:triton": lambda: mmcore.lora_linear(x, w, b, a2, b2, sc, backend="triton"),
            "mmcore:composed": lambda: mmcore.lora_linear(x, w, b, a2, b2, sc,
                                                          backend="composed"),
            "mmcore:auto": lambda: mmcore.lora_linear(x, w, b, a2, b2, sc),
        }
        for name, fn in impls.items():
            rows.append(harness.floor_note(row(OP, case, name, shape, dtype, device,
                                               time_fn(fn, device), flops=fl),
                                           "F.linear", base))
        harness.compare(rows[-len(impls) - 1:], "mmcore:auto",
                        against="naive (F.linear + 2 matmuls + add)",
                        exclude=("F.linear (floor)",))
        # backward: the three gradients vs the base GEMM's dx (dy @ W)
        case = f"bwd {label} M={M} r={r}"
        t_dx = time_fn(lambda: dy @ w, device)
        rows.append(row(OP, case, "base dx = dy @ W (floor)", shape, dtype, device, t_dx,
                        flops=2 * M * N * K))
        def naive_bwd():  # noqa: E306
            dx = dy @ w
            t = dy @ b2
            dx.addmm_(t, a2, alpha=sc)
            return dx, sc * t.t() @ x, sc * dy.t() @ (x @ a2.t())
        rows.append(row(OP, case, "naive (5 matmuls)", shape, dtype, device,
                        time_fn(naive_bwd, device)))
        rows.append(harness.floor_note(row(
            OP, case, "mmcore:triton", shape, dtype, device,
            time_fn(lambda: kern.lora_backward(dy, x, w, la, lb, s, None, True, True, True),
                    device), flops=2 * M * N * K + 4 * M * r * (N + K)),
            "base dx", t_dx["median_ms"]))
        harness.compare(rows[-2:], "mmcore:triton")
        # fwd + bwd through autograd (x, A, B trainable; W frozen)
        if M >= 512:
            case = f"fwd+bwd {label} M={M} r={r}"
            xg, ag, bg = (t.detach().clone().requires_grad_(True) for t in (x, a2, b2))

            def lin():
                F.linear(xg, w, b).backward(dy)

            def naive():
                (F.linear(xg, w, b) + (xg @ ag.t()) @ bg.t() * sc).backward(dy)

            def ours(be="triton"):
                mmcore.lora_linear(xg, w, b, ag, bg, sc, backend=be).backward(dy)
            t_l = time_fn(lin, device)
            rows.append(row(OP, case, "F.linear fwd+bwd(dx) (floor)", shape, dtype, device, t_l))
            impls2 = (("naive autograd", naive), ("mmcore:triton", ours),
                      ("mmcore:composed", lambda: ours("composed")),
                      ("mmcore:auto", lambda: ours("auto")))
            for name, fn in impls2:
                rows.append(harness.floor_note(row(OP, case, name, shape, dtype, device,
                                                   time_fn(fn, device)),
                                               "F.linear", t_l["median_ms"]))
            harness.compare(rows[-len(impls2):], "mmcore:auto")
        del x, w, b, la, lb, dy, wm
        torch.cuda.empty_cache()


def _gpu_multi(rows, quick, device):
    dtype = torch.bfloat16
    K = N = 4096
    r = 16
    for M in ((64, 8192) if not quick else (64,)):
        single = None
        for n in (1, 8, 64):
            if harness.out_of_time():
                rows.append(harness.skipped(OP, f"multi-adapter M={M} distinct={n}", {}, dtype,
                                            device))
                continue
            x, w, b, la, lb, s, dy = _operands(M, K, N, r, n, dtype, device)
            g = torch.Generator(device=device).manual_seed(1)
            ids = (torch.arange(M, device=device) % n)[torch.randperm(M, generator=g,
                                                                      device=device)]
            shape = {"M": M, "K": K, "N": N, "r": r, "adapters": n}
            case = f"multi-adapter fwd 4096x4096 M={M} distinct={n}"
            t = time_fn(lambda: mmcore.lora_linear(x, w, b, la, lb, s, adapter_ids=ids,
                                                   backend="triton"), device)
            if n == 1:
                single = t["median_ms"]
                t1 = time_fn(lambda: mmcore.lora_linear(x, w, b, la[0], lb[0], 2.0,
                                                        backend="triton"), device)
                rows.append(row(OP, case, "mmcore:triton single adapter, no ids (baseline)",
                                shape, dtype, device, t1))
                single = t1["median_ms"]

            def loop():  # peft's mixed batch: boolean indexing per adapter
                y = F.linear(x, w, b)
                for a in range(n):
                    sel = ids == a
                    y[sel] += (x[sel] @ la[a].t()) @ lb[a].t() * 2.0
                return y
            case_rows = [row(OP, case, "loop over adapters (boolean indexing)", shape, dtype,
                             device, time_fn(loop, device)),
                         row(OP, case, "mmcore:triton", shape, dtype, device, t)]
            for be in ("composed", "auto"):
                case_rows.append(row(OP, case, f"mmcore:{be}", shape, dtype, device,
                                     time_fn(lambda be=be: mmcore.lora_linear(
                                         x, w, b, la, lb, s, adapter_ids=ids, backend=be),
                                         device)))
            for r_ in case_rows:
                if r_.get("median_ms") and single:
                    r_["note"] = f"{r_['median_ms'] / single:.2f}x the single-adapter time"
            rows += harness.compare(case_rows, "mmcore:triton")


def _cpu(rows, quick, device, sizes=None):
    """sizes: (K, N, Ms) instead of the BERT FFN 768 x 3072 (smoke)."""
    dtype = torch.float32
    K, N, Ms = sizes or (768, 3072, (256,) if quick else (16, 256, 2048))
    r = 16
    rep, warm = (3, 1) if quick else (10, 2)
    naive_name = "naive (F.linear + 2 matmuls + add)"
    for M in Ms:
        if harness.out_of_time():  # --budget spent
            rows.append(harness.skipped(OP, f"cpu {K}x{N} M={M} r={r}", {}, dtype, device))
            continue
        x, w, b, la, lb, s, dy = _operands(M, K, N, r, 1, dtype, "cpu")
        a2, b2 = la[0], lb[0]
        shape = {"M": M, "K": K, "N": N, "r": r, "threads": torch.get_num_threads()}
        case = f"fwd cpu {K}x{N} M={M} r={r}"
        t_lin = time_fn(lambda: F.linear(x, w, b), "cpu", warmup=warm, rep=rep)
        case_rows = [row(OP, case, "F.linear (floor)", shape, dtype, device, t_lin,
                         flops=2 * M * N * K)]
        base = t_lin["median_ms"]
        impls = {naive_name: lambda: F.linear(x, w, b) + (x @ a2.t()) @ (b2.t() * 2.0),
                 "mmcore:cpu": lambda: mmcore.lora_linear(x, w, b, a2, b2, 2.0, backend="cpu"),
                 "mmcore:composed": lambda: mmcore.lora_linear(x, w, b, a2, b2, 2.0,
                                                               backend="composed")}
        from mmcore.ops.backends import _loaders
        if _loaders.ext_error() is None and not quick:  # its ops appear in torch.ops
            for v, name in ((0, "two-pass"), (1, "aug-K"), (2, "merged")):
                impls[f"mmcore:cpu variant {name}"] = (
                    lambda v=v: torch.ops.mmcore_C.lora_linear_fwd_variant(x, w, b, la, lb, s, v))
        for name, fn in impls.items():
            r_ = row(OP, case, name, shape, dtype, device,
                     time_fn(fn, "cpu", warmup=warm, rep=rep), flops=_flops(M, K, N, r))
            case_rows.append(harness.floor_note(r_, "F.linear", base)
                             if name.startswith("mmcore") else r_)
        rows += harness.compare(case_rows, "mmcore:cpu", against=naive_name,
                                exclude=("F.linear (floor)",))
        if M == Ms[-1]:
            case = f"fwd+bwd cpu {K}x{N} M={M} r={r}"
            xg, ag, bg = (t.detach().clone().requires_grad_(True) for t in (x, a2, b2))
            t_l = time_fn(lambda: F.linear(xg, w, b).backward(dy), "cpu", warmup=1, rep=rep)
            floor = "F.linear fwd+bwd(dx) (floor)"
            case_rows = [row(OP, case, floor, shape, dtype, device, t_l)]
            for name, fn in (
                    ("naive autograd",
                     lambda: (F.linear(xg, w, b) + (xg @ ag.t()) @ bg.t() * 2.0).backward(dy)),
                    ("mmcore:cpu",
                     lambda: mmcore.lora_linear(xg, w, b, ag, bg, 2.0,
                                                backend="cpu").backward(dy))):
                r_ = row(OP, case, name, shape, dtype, device,
                         time_fn(fn, "cpu", warmup=1, rep=rep))
                case_rows.append(harness.floor_note(r_, "F.linear fwd+bwd", t_l["median_ms"])
                                 if name.startswith("mmcore") else r_)
            rows += harness.compare(case_rows, "mmcore:cpu", exclude=(floor,))


def smoke(device: str) -> list:
    """Tiny CPU cases (64 x 128, M = 32 / 64): the runner's self-test in CI, not a
    measurement."""
    rows: list = []
    _cpu(rows, True, "cpu", sizes=(64, 128, (32, 64)))
    return rows


def run(quick: bool, device: str) -> list:
    rows: list = []
    if str(device).startswith("cuda"):
        _gpu_single(rows, quick, device)
        _gpu_multi(rows, quick, device)
    else:
        _cpu(rows, quick, device)
    return rows


if __name__ == "__main__":
    import argparse
    import json

    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    for r_ in run(args.quick, args.device):
        print(json.dumps(r_))
