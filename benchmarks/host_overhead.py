"""Host time per call of the public ops at tiny sizes (the kernels take microseconds, so
this is validation + dispatch + custom-op / autograd plumbing).

    python benchmarks/host_overhead.py [--calls 2000]

Prints the median over 5 rounds of the calling thread's CPU time per call (us; CPU time, not
wall time, so that other processes on a shared machine do not count), for each op with and
without autograd recording.  Compare two checkouts in one run (same machine, interleaved):
    for t in /path/a /path/b; do
        PYTHONPATH=$t:<site-packages> python -S $t/benchmarks/host_overhead.py; done
"""
import argparse
import statistics
import time

import torch

import mmcore


def cases():
    q = torch.randn(1, 2, 4, 16)
    k = torch.randn(1, 2, 6, 16)
    x, w = torch.randn(2, 16), torch.randn(8, 16)
    a, b = torch.randn(4, 16), torch.randn(8, 4)
    qg, xg = q.clone().requires_grad_(True), x.clone().requires_grad_(True)
    return {
        "window_attention": lambda: mmcore.window_attention(q, k, k, window=(2, 2)),
        "window_attention grad": lambda: mmcore.window_attention(qg, k, k, window=(2, 2)),
        "cross_attention": lambda: mmcore.cross_attention(q, k, k),
        "lora_linear": lambda: mmcore.lora_linear(x, w, None, a, b, 0.5),
        "lora_linear grad": lambda: mmcore.lora_linear(xg, w, None, a, b, 0.5),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=2000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    for name, fn in cases().items():
        for _ in range(50):
            fn()
        rounds = []
        for _ in range(5):
            t0 = time.thread_time()
            for _ in range(args.calls):
                fn()
            rounds.append((time.thread_time() - t0) / args.calls * 1e6)
        print(f"{name:<24} {statistics.median(rounds):8.1f} us/call")


if __name__ == "__main__":
    main()
