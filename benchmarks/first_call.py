"""First-call (compile) and steady-state times of each Triton op, and the first call of a
second shape of the same family (no compile: issue 11 asks for one compile per family).

    python benchmarks/first_call.py [--device cuda] [--out rows.jsonl]

Each op runs forward + backward through mmcore with backend="triton": window_attention
(bf16, D = 128, causal window), cross_attention (bf16, D = 128, 577 image tokens) and
lora_linear (bf16, r = 16).  Triton's cache is pointed at a fresh folder first, so the first
call compiles.  Autotuning is off (MMCORE_TRITON_AUTOTUNE=0: each kernel compiles its default
config) unless --autotune.  On the CPU the kernels run under TRITON_INTERPRET=1 at tiny
sizes (a dry run of the script, not a measurement).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default=os.environ.get("MMCORE_BENCH_OUT"))
    ap.add_argument("--autotune", action="store_true")
    a = ap.parse_args(argv)
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="mmcore-first-call-")
    os.environ["MMCORE_TRITON_AUTOTUNE"] = "1" if a.autotune else "0"
    import torch
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import triton

    import mmcore

    gpu = device.startswith("cuda")
    dt = torch.bfloat16

    def sync():
        if gpu:
            torch.cuda.synchronize()

    def window(S, H):
        q = torch.randn(1, H, S, 128 if gpu else 16, device=device, dtype=dt, requires_grad=True)
        k, v = torch.randn_like(q).requires_grad_(), torch.randn_like(q).requires_grad_()
        return lambda: mmcore.window_attention(q, k, v, window=(255, 0), causal=True,
                                               backend="triton").sum().backward()

    def cross(Sq, Sk):
        D = 128 if gpu else 16
        q = torch.randn(2, 8, Sq, D, device=device, dtype=dt, requires_grad=True)
        k = torch.randn(2, 8, Sk, D, device=device, dtype=dt, requires_grad=True)
        v = torch.randn_like(k).requires_grad_()
        return lambda: mmcore.cross_attention(q, k, v, backend="triton").sum().backward()

    def lora(M, K, N):
        x = torch.randn(M, K, device=device, dtype=dt, requires_grad=True)
        w = torch.randn(N, K, device=device, dtype=dt)
        la = torch.randn(16, K, device=device, dtype=dt, requires_grad=True)
        lb = torch.randn(N, 16, device=device, dtype=dt, requires_grad=True)
        return lambda: mmcore.lora_linear(x, w, None, la, lb, 0.5,
                                          backend="triton").sum().backward()

    if gpu:
        ops = [("window_attention", window(4096, 16), window(3000, 12)),
               ("cross_attention", cross(2048, 577), cross(1000, 577)),
               ("lora_linear", lora(4096, 4096, 4096), lora(1000, 768, 3072))]
    else:
        ops = [("window_attention", window(40, 2), window(33, 1)),
               ("cross_attention", cross(40, 20), cross(17, 20)),
               ("lora_linear", lora(40, 32, 48), lora(33, 48, 32))]

    def timed(fn):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return (time.perf_counter() - t0) * 1e3

    rows = []
    for name, first, other in ops:
        t_first = timed(first)
        t_other = timed(other)
        steady = statistics.median(timed(first) for _ in range(10 if gpu else 2))
        row = dict(bench="first_call", op=name, device=device,
                   gpu=torch.cuda.get_device_name() if gpu else None,
                   torch=torch.__version__, triton=triton.__version__,
                   autotune=a.autotune, first_call_ms=round(t_first, 1),
                   second_shape_first_call_ms=round(t_other, 1),
                   steady_ms=round(steady, 3))
        rows.append(row)
        print(f"{name:<17} first call {t_first:9.1f} ms   a second shape's first call "
              f"{t_other:8.1f} ms   steady {steady:8.3f} ms (fwd + bwd)", flush=True)
    if a.out:
        with open(a.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
