"""The issue-26 paths of the C++ CPU window kernel against their features-off twins (1 thread).

    PYTHONPATH=. python benchmarks/measure_cpu_masks.py new [ROUNDS]
    PYTHONPATH=OLD_TREE python benchmarks/measure_cpu_masks.py off [ROUNDS]   # and this tree

`off`: the features-off forward (B=1, H=12, N=8192, D=64, window ±256) vs chunked SDPA
(benchmarks/bench_window_attention.py:_chunked_sdpa); run it alternately from an old tree and
this one (PYTHONPATH) to compare builds.  `new`: key_mask (10% holes + 300 keys of left
padding) vs none, softcap 30 vs none, bounds mode vs the same pattern as window / causal
(sliding window (i-255, i+1) at N=8192, causal (0, i+1) at N=2048), forward and forward +
backward.  Each round times both sides (best of 2 calls, thread CPU time: other processes on
a shared machine do not dilute it) and records a / b; prints one JSON line per case with the
median ratio and its min / max over the rounds.  Calls torch.ops.mmcore_C directly.
"""
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mmcore  # noqa: E402,F401  (loads mmcore._C)
from bench_window_attention import _chunked_sdpa  # noqa: E402


def best(fn, inner=2):
    b = float("inf")
    for _ in range(inner):
        t0 = time.thread_time()
        fn()
        b = min(b, time.thread_time() - t0)
    return b


def cases(mode):
    ops = torch.ops.mmcore_C
    f = ops.window_attention_fwd
    g = torch.Generator().manual_seed(0)
    B, H, D, w, sc = 1, 12, 64, 256, 0.125

    def qkv(n):
        return [torch.randn(B, H, n, D, generator=g) for _ in range(3)]

    N = 8192
    q, k, v = qkv(N)
    if mode == "off":
        return {"fwd off / chunked SDPA": (
            lambda: f(q, k, v, None, None, w, w, False, 0, sc),
            lambda: _chunked_sdpa(q, k, v, w, w))}
    km = torch.rand(B, N, generator=g) > 0.1
    km[:, :300] = False
    i = torch.arange(N, dtype=torch.int32)
    lo_sw, hi_sw = (i - 255).expand(B, N).contiguous(), (i + 1).expand(B, N).contiguous()
    do = torch.randn_like(q)
    N2 = 2048
    q2, k2, v2 = qkv(N2)
    do2 = torch.randn_like(q2)
    i2 = torch.arange(N2, dtype=torch.int32)
    lo_c, hi_c = torch.zeros(B, N2, dtype=torch.int32), (i2 + 1).expand(B, N2).contiguous()
    km2 = torch.rand(B, N2, generator=g) > 0.1

    def fb(x, dx, left, right, causal, cap, lo, hi, m):
        def run():
            o, lse = f(x[0], x[1], x[2], None, None, left, right, causal, 0, sc, cap, lo, hi, m)
            ops.window_attention_bwd(dx, x[0], x[1], x[2], o, lse, None, None, left, right,
                                     causal, 0, sc, cap, lo, hi, m)
        return run

    big, small = (q, k, v), (q2, k2, v2)
    return {
        "fwd key_mask / none": (
            lambda: f(q, k, v, None, None, w, w, False, 0, sc, 0.0, None, None, km),
            lambda: f(q, k, v, None, None, w, w, False, 0, sc)),
        "fwd softcap 30 / none": (
            lambda: f(q, k, v, None, None, w, w, False, 0, sc, 30.0),
            lambda: f(q, k, v, None, None, w, w, False, 0, sc)),
        "fwd bounds (i-255, i+1) / window (255, 0) causal": (
            lambda: f(q, k, v, None, None, -1, -1, False, 0, sc, 0.0, lo_sw, hi_sw),
            lambda: f(q, k, v, None, None, 255, 0, True, 0, sc)),
        "fwd bounds (0, i+1) / causal, N=2048": (
            lambda: f(q2, k2, v2, None, None, -1, -1, False, 0, sc, 0.0, lo_c, hi_c),
            lambda: f(q2, k2, v2, None, None, -1, -1, True, 0, sc)),
        "fwd+bwd softcap 30 / none, N=2048": (
            fb(small, do2, w, w, False, 30.0, None, None, None),
            fb(small, do2, w, w, False, 0.0, None, None, None)),
        "fwd+bwd key_mask / none, N=2048": (
            fb(small, do2, w, w, False, 0.0, None, None, km2),
            fb(small, do2, w, w, False, 0.0, None, None, None)),
        "fwd+bwd bounds (0, i+1) / causal, N=2048": (
            fb(small, do2, -1, -1, False, 0.0, lo_c, hi_c, None),
            fb(small, do2, -1, -1, True, 0.0, None, None, None)),
        "fwd+bwd bounds (i-255, i+1) / window (255, 0) causal": (
            fb(big, do, -1, -1, False, 0.0, lo_sw, hi_sw, None),
            fb(big, do, 255, 0, True, 0.0, None, None, None)),
    }


def main():
    mode = sys.argv[1] if len(sys.argv) > 1 else "new"
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    if mode not in ("new", "off"):
        sys.exit(f"mode: 'new' or 'off', got {mode!r}")
    torch.set_num_threads(1)
    for name, (a, b) in cases(mode).items():
        a(), b()
        ta, tb, r = [], [], []
        for _ in range(rounds):
            x, y = best(a), best(b)
            ta.append(x), tb.append(y), r.append(x / y)
        r.sort()
        print(json.dumps({"tree": os.environ.get("PYTHONPATH", ""), "case": name,
                          "a_ms": round(1e3 * min(ta), 1), "b_ms": round(1e3 * min(tb), 1),
                          "a/b median": round(r[len(r) // 2], 3), "min": round(r[0], 3),
                          "max": round(r[-1], 3)}), flush=True)


if __name__ == "__main__":
    main()
