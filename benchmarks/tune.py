"""`mmcore bench --tune`: measure every backend that can serve each point of a grid of
problems on this device, and write the dispatch table `backend="auto"` reads.

    mmcore bench --tune [--device cuda] [--out PATH] [--budget SECONDS]

The table goes to mmcore/ops/dispatch_tables/<device key>.json (mmcore/ops/tables.py: keyed by the
device name and the torch / Triton versions), or to --out.  Each point is one problem
(op, dtype, head dim, flags, sizes), forward alone (no_grad) and forward + backward
(autograd), so that training and inference calls each get their own ranking.  Every backend
that declares it can serve the point is timed through the public op with that backend
forced (not the Triton interpreter on a CPU, nor the chunked reference on CUDA), one that
fails is recorded with its error and left out of the order.  The grid is explicit below;
--budget (default 120 s on a CPU, 300 s on CUDA) stops early and writes the points measured
so far, and a backend taking over 2 s per call is timed once.
"""
from __future__ import annotations

import importlib
import time

import torch

import mmcore
from mmcore.benchmarks import harness
from mmcore.ops import registry, tables

WIN = importlib.import_module("mmcore.ops.window_attention")
CROSS = importlib.import_module("mmcore.ops.cross_attention")
LORA = importlib.import_module("mmcore.ops.lora_linear")


# not contenders: the interpreted Triton path on the CPU, the chunked reference on CUDA
_SKIP = {"cpu": ("triton",), "cuda": ("torch",)}
BUDGET = {"cpu": 120.0, "cuda": 300.0}


def grid(device: str) -> list:
    """The points: dicts with op, dtype, bwd and the op's sizes."""
    pts = []
    if device == "cuda":
        dt = torch.bfloat16
        for bwd in (False, True):
            for S in (4096, 16384, 32768):
                for D in (64, 128):
                    for win, causal in (((4095, 0), True), ((256, 256), False),
                                        ((-1, 0), True), ((-1, -1), False)):
                        if bwd and S > 16384:
                            continue
                        pts.append(dict(op="window_attention", dtype=dt, bwd=bwd, B=1, H=16,
                                        S=S, D=D, window=win, causal=causal, G=0))
                pts.append(dict(op="window_attention", dtype=dt, bwd=bwd, B=1, H=16, S=S,
                                D=64, window=(256, 256), causal=False, G=64))
            for Sq in (2048, 8192, 32768):
                for Sk in (64, 257, 577, 1025):
                    for D in (64, 128):
                        pts.append(dict(op="cross_attention", dtype=dt, bwd=bwd,
                                        B=max(1, 16384 // Sq), H=8, Sq=Sq, Sk=Sk, D=D,
                                        lengths=False))
                pts.append(dict(op="cross_attention", dtype=dt, bwd=bwd, B=2, H=8, Sq=Sq,
                                Sk=577, D=64, lengths=True))
            for M in (16, 512, 8192):
                for K, N in ((768, 3072), (4096, 4096), (4096, 11008)):
                    pts.append(dict(op="lora_linear", dtype=dt, bwd=bwd, M=M, K=K, N=N, r=16,
                                    adapters=1))
            pts.append(dict(op="lora_linear", dtype=dt, bwd=bwd, M=8192, K=4096, N=4096, r=16,
                            adapters=8))
        return pts
    dt = torch.float32
    for bwd in (False, True):
        for S in (1024, 4096):
            for win, causal in (((64, 64), False), ((-1, 0), True), ((-1, -1), False)):
                if bwd and S > 1024:
                    continue
                pts.append(dict(op="window_attention", dtype=dt, bwd=bwd, B=1, H=4, S=S, D=64,
                                window=win, causal=causal, G=0))
        for Sq, Sk, lengths in ((1024, 64, False), (4096, 577, False), (4096, 577, True)):
            pts.append(dict(op="cross_attention", dtype=dt, bwd=bwd, B=2, H=4, Sq=Sq, Sk=Sk,
                            D=64, lengths=lengths))
        for M, adapters in ((64, 1), (1024, 1), (1024, 4)):
            pts.append(dict(op="lora_linear", dtype=dt, bwd=bwd, M=M, K=768, N=768, r=16,
                            adapters=adapters))
    return pts


def _inputs(pt, device):
    """-> (call(backend) -> output, leaves needing grads, Problem)."""
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g).to(device, pt["dtype"])  # noqa: E731
    bwd = pt["bwd"]
    if pt["op"] == "lora_linear":
        A = pt["adapters"]
        x, w, b = mk(pt["M"], pt["K"]), mk(pt["N"], pt["K"]) * pt["K"] ** -0.5, mk(pt["N"])
        la, lb = mk(A, pt["r"], pt["K"]) * pt["K"] ** -0.5, mk(A, pt["N"], pt["r"])
        s = torch.full((A,), 2.0, device=device)
        ids = None if A == 1 else torch.arange(pt["M"], device=device) % A
        leaves = (x, la, lb)
        for t in leaves:
            t.requires_grad_(bwd)
        p = LORA.problem(x, w, la, bwd)
        return (lambda be: mmcore.lora_linear(x, w, b, la, lb, s, adapter_ids=ids, backend=be),
                leaves, p)
    if pt["op"] == "cross_attention":
        B, H, Sq, Sk, D = pt["B"], pt["H"], pt["Sq"], pt["Sk"], pt["D"]
        q, k, v = mk(B, H, Sq, D), mk(B, H, Sk, D), mk(B, H, Sk, D)
        sq = sk = None
        if pt["lengths"]:
            sq = torch.tensor([Sq - (b * Sq) // (3 * B) for b in range(B)], device=device)
            sk = torch.tensor([Sk - (b * Sk) // (2 * B) for b in range(B)], device=device)
        for t in (q, k, v):
            t.requires_grad_(bwd)
        p = CROSS.problem(q, k, sq, sk, bwd)
        return (lambda be: mmcore.cross_attention(q, k, v, seqlens_q=sq, seqlens_k=sk,
                                                  backend=be), (q, k, v), p)
    B, H, S, D = pt["B"], pt["H"], pt["S"], pt["D"]
    q, k, v = mk(B, H, S, D), mk(B, H, S, D), mk(B, H, S, D)
    for t in (q, k, v):
        t.requires_grad_(bwd)
    left, right = pt["window"]
    causal, G = pt["causal"], pt["G"]
    p = WIN.problem(q, k, None, None, left, 0 if causal else right, causal, G, bwd)
    return (lambda be: mmcore.window_attention(q, k, v, window=pt["window"], causal=causal,
                                               global_tokens=G, backend=be), (q, k, v), p)


def _timed(call, leaves, bwd, device, reps):
    if not bwd:
        def fn():
            with torch.no_grad():
                return call()
    else:
        def fn():
            out = call()
            return torch.autograd.grad(out, leaves, torch.ones_like(out))
    fn()  # compile / first call outside the timing
    harness.sync(device)
    t0 = time.perf_counter()
    fn()
    harness.sync(device)
    if time.perf_counter() - t0 > 2.0:
        return (time.perf_counter() - t0) * 1e3  # one timed call is enough
    if device == "cuda":
        return harness.time_fn(fn, device)["median_ms"]
    return harness.time_fn(fn, device, warmup=0, rep=reps)["median_ms"]


def run(device: str, out: str | None = None, budget: float | None = None, points=None,
        log=print, reps: int = 5) -> str:
    """Measure the grid (or `points`) and write the table; -> its path."""
    budget = BUDGET[device] if budget is None else budget
    t_start = time.perf_counter()
    entries: dict = {}
    for n, pt in enumerate(points if points is not None else grid(device)):
        if time.perf_counter() - t_start > budget:
            log(f"budget of {budget:.0f} s spent: {n} points measured, the rest skipped")
            break
        call, leaves, p = _inputs(pt, device)
        ms, errors = {}, {}
        for impl in registry.implementations(pt["op"]):
            if impl.refuse(p) or impl.backend in _SKIP.get(device, ()):
                continue
            try:
                ms[impl.backend] = _timed(lambda: call(impl.backend), leaves, pt["bwd"],
                                          device, reps)
            except Exception as e:  # a failure is data: recorded, left out of the order
                errors[impl.backend] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        if not ms:
            continue
        order = sorted(ms, key=ms.get)
        entries.setdefault(pt["op"], []).append(
            {"kind": tables.kind(p), "sizes": list(tables.sizes(p)), "order": order,
             "ms": {b: round(t, 4) for b, t in ms.items()}, "errors": errors})
        desc = ", ".join(f"{b} {ms[b]:.3g}" for b in order)
        log(f"[{n}] {pt['op']} {tables.kind(p)} {tables.sizes(p)}: {desc}"
            + (f"  (failed: {', '.join(errors)})" if errors else ""))
    path = out or f"{tables.TABLE_DIR}/{tables.device_key(device)}.json"
    desc = "cuda grid" if device == "cuda" else "cpu grid"
    tables.write(path, device, entries, grid=f"benchmarks/tune.py {desc}, "
                 f"{sum(map(len, entries.values()))} points")
    log(f"dispatch table written to {path}")
    return path
