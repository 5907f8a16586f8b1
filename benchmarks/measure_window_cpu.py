"""CPU measurements behind benchmarks/bench_window_cpu_notes.md (standalone, no harness).

    PYTHONPATH=. python benchmarks/measure_window_cpu.py --n 1024 4096 16384 [--bwd] [--threads 2]

B=1, H=12, D=64, fp32, window (256, 256).  Impls: mmcore cpu backend, a hand-written chunked
SDPA (query chunks of 256 calling F.scaled_dot_product_attention on the keys they need with a
bool mask), dense-mask SDPA (N x N bool mask; skipped above --dense-max), and mmcore's torch
reference backend.  Time: median of --rep runs after one warm-up; GFLOP/s count useful FLOPs
only (fwd 4*B*H*pairs*D, bwd 2.5x that).  Besides wall time, the process CPU time (all
threads) is recorded: on a machine shared with other jobs, GFLOP per CPU-second x threads is the
steadier measure of what the code would do on idle cores.  Peak memory: growth of the process
peak RSS during the first call of each (impl, N) (run impls in increasing memory order, or one
impl per process with --impl, for clean numbers).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch
import torch.nn.functional as F

import mmcore


from bench_window_attention import _chunked_sdpa as chunked_sdpa  # noqa: E402
from bench_window_attention import _dense_mask, allowed_pairs  # noqa: E402


def pairs(N, left, right):
    return allowed_pairs(N, left, right, False, 0)


def dense_sdpa(q, k, v, left, right):
    m = _dense_mask(q.shape[2], left, right, False, 0, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m)


IMPLS = {
    "mmcore-cpu": lambda q, k, v, l, r: mmcore.window_attention(q, k, v, window=(l, r),
                                                                 backend="cpu"),
    "chunked-sdpa": chunked_sdpa,
    "dense-sdpa": dense_sdpa,
    "torch-ref": lambda q, k, v, l, r: mmcore.window_attention(q, k, v, window=(l, r),
                                                                backend="torch"),
}


def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(fn, q, k, v, left, right, bwd, rep):
    def call():
        if bwd:
            qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
            out = fn(qq, kk, vv, left, right)
            out.backward(torch.ones_like(out))
        else:
            with torch.no_grad():
                fn(q, k, v, left, right)
    small = [t[:, :, :64] for t in (q, k, v)]
    if bwd:
        qq, kk, vv = (t.detach().requires_grad_() for t in small)
        fn(qq, kk, vv, left, right).sum().backward()
    else:
        fn(*small, left, right)  # load libraries before taking the RSS baseline
    r0 = rss_mb()
    call()  # warm-up
    peak = rss_mb() - r0
    ts, cs = [], []
    for _ in range(rep):
        t0, c0 = time.perf_counter(), time.process_time()
        call()
        ts.append(time.perf_counter() - t0)
        cs.append(time.process_time() - c0)
    return statistics.median(ts), statistics.median(cs), peak


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--impl", nargs="+", default=list(IMPLS))
    ap.add_argument("--bwd", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rep", type=int, default=3)
    ap.add_argument("--dense-max", type=int, default=4096)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    B, H, D, left, right = 1, 12, 64, 256, 256
    for N in a.n:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(B, H, N, D, generator=g) for _ in range(3))
        flops = 4 * B * H * pairs(N, left, right) * D * (3.5 if a.bwd else 1.0)
        for name in a.impl:
            if name == "dense-sdpa" and N > a.dense_max:
                continue
            t, c, peak = measure(IMPLS[name], q, k, v, left, right, a.bwd, a.rep)
            print(json.dumps(dict(impl=name, N=N, pass_="fwd+bwd" if a.bwd else "fwd",
                                  ms=round(t * 1e3, 1), gflops=round(flops / t / 1e9, 1),
                                  cpu_ms=round(c * 1e3, 1),
                                  gflops_per_cpu_s=round(flops / c / 1e9, 1),
                                  rss_growth_mb=round(peak, 1), threads=a.threads)), flush=True)


if __name__ == "__main__":
    main()
