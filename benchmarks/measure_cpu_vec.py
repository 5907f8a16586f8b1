"""mmcore's C++ CPU kernels vs PyTorch, interleaved rounds in one process (issue 21).

    PYTHONPATH=. python benchmarks/measure_cpu_vec.py [--case window cross] [--rounds 7]
        [--threads 1]

Cases (fp32, forward, both sides on whatever path ATen / mmcore pick; set
ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 to force both to AVX2):
  window: B=1, H=12, N=8192, D=64, window (256, 256): mmcore cpu backend vs chunked SDPA
          (benchmarks/bench_window_attention.py:_chunked_sdpa, query chunks of 256).
  cross:  B=2, H=4, Sq=8192, Sk=577, D=64, equal lengths: mmcore cpu backend vs
          F.scaled_dot_product_attention (ATen's CPU flash kernel).
Comparing two builds (e.g. main's .so against this one): run this script alternately from each
tree (PYTHONPATH) with --label, see benchmarks/compare_cpu_builds.sh.
Each round times mmcore then the baseline (best of --inner calls each) and records the ratio
baseline / mmcore, so load from other processes hits both sides of a ratio alike.  Prints one
JSON line per case: median ms of each side, median ratio and its min / max over the rounds,
GFLOP/s (useful FLOPs, 4*H*pairs*D; also per CPU-second of the process, which other jobs on a
shared machine do not dilute) and its share of the per-core FMA peak (mmcore.cpu_info).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mmcore  # noqa: E402
from bench_window_attention import _chunked_sdpa, allowed_pairs  # noqa: E402


_CPU = []  # process CPU seconds of each timed call of the last _best (for one thread)


def _best(fn, inner):
    best, cpu = float("inf"), float("inf")
    for _ in range(inner):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        best = min(best, time.perf_counter() - t0)
        cpu = min(cpu, time.process_time() - c0)
    _CPU.append(cpu)
    return best


def case_window():
    B, H, N, D, w = 1, 12, 8192, 64, 256
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, generator=g) for _ in range(3))
    flops = 4 * B * H * allowed_pairs(N, w, w, False, 0) * D
    ours = lambda: mmcore.window_attention(q, k, v, window=(w, w), backend="cpu")  # noqa: E731
    base = lambda: _chunked_sdpa(q, k, v, w, w)  # noqa: E731
    return "window fwd N=8192 w=±256 D=64", ours, base, "chunked-sdpa", flops


def case_cross():
    B, H, Sq, Sk, D = 2, 4, 8192, 577, 64
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, Sq, D, generator=g)
    k, v = (torch.randn(B, H, Sk, D, generator=g) for _ in range(2))
    flops = 4 * B * H * Sq * Sk * D
    ours = lambda: mmcore.cross_attention(q, k, v, backend="cpu")  # noqa: E731
    base = lambda: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
    return "cross fwd Sq=8192 Sk=577 D=64", ours, base, "sdpa", flops


CASES = {"window": case_window, "cross": case_cross}


def roofline(label):
    """torch.mm 2048^2 fp32 (best of 3) on 1 thread and on all of torch's, against the FMA
    peak probe (mmcore.cpu_info) on the same thread counts."""
    from mmcore.cpu_info import fma_peak

    n, every = 2048, torch.get_num_threads()
    for t in sorted({1, every}):
        torch.set_num_threads(t)
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)
        best = min(_best(lambda: torch.mm(a, b), 1) for _ in range(3))
        p = fma_peak(t)
        peak = p["gflops_per_core"] if t == 1 else p["gflops_all"]
        print(json.dumps(dict(label=label, case="torch.mm 2048^2 fp32", threads=t,
                              gemm_gflops=round(2 * n ** 3 / best / 1e9, 1),
                              fma_peak_gflops=round(peak, 1), isa=p["isa"],
                              vector_bits=p["vector_bits"],
                              mkl=os.environ.get("MKL_ENABLE_INSTRUCTIONS", "default"),
                              load1=round(os.getloadavg()[0], 2))), flush=True)
    torch.set_num_threads(every)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--inner", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--label", default="", help="tag copied into each JSON line (e.g. the build)")
    ap.add_argument("--roofline", action="store_true",
                    help="also torch.mm 2048^2 vs the FMA peak probe, 1 and all threads")
    a = ap.parse_args()
    if a.roofline:
        roofline(a.label)
    torch.set_num_threads(a.threads)
    try:
        from mmcore.cpu_info import fma_peak
        peak = fma_peak(a.threads)
    except Exception:  # an old build without the probe
        peak = None
    for name in a.case:
        label, ours, base, base_name, flops = CASES[name]()
        with torch.no_grad():
            ours(), base()  # warm-up
            to, tb, ratio, co = [], [], [], []
            for _ in range(a.rounds):
                o = _best(ours, a.inner)
                co.append(_CPU[-1])
                b = _best(base, a.inner)
                to.append(o)
                tb.append(b)
                ratio.append(b / o)
        gf = flops / statistics.median(to) / 1e9
        rec = dict(label=a.label, case=label, baseline=base_name, threads=a.threads,
                   aten_capability=torch.backends.cpu.get_cpu_capability(),
                   mmcore_isa=torch.ops.mmcore_C.cpu_capability(),
                   mkl=os.environ.get("MKL_ENABLE_INSTRUCTIONS", "default"),
                   ms_mmcore=round(statistics.median(to) * 1e3, 2),
                   ms_baseline=round(statistics.median(tb) * 1e3, 2),
                   ratio_median=round(statistics.median(ratio), 3),
                   ratio_min=round(min(ratio), 3), ratio_max=round(max(ratio), 3),
                   rounds=a.rounds, gflops_mmcore=round(gf, 1),
                   gflops_mmcore_best=round(flops / min(to) / 1e9, 1),
                   # per CPU-second: what the code does while it runs (steadier when shared)
                   gflops_mmcore_per_cpu_s=round(flops / min(co) / 1e9, 1),
                   load1=round(os.getloadavg()[0], 2))
        if peak:
            rec["fma_peak_isa"] = peak["isa"]
            top = peak["gflops_per_core"] if a.threads == 1 else peak["gflops_all"]
            rec["fma_peak_gflops"] = round(top, 1)
            rec["pct_of_fma_peak"] = round(100 * gf / top, 1)
            rec["pct_of_fma_peak_per_cpu_s"] = round(
                100 * rec["gflops_mmcore_per_cpu_s"] / top, 1) if a.threads == 1 else None
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
