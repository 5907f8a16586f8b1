"""Shared benchmark machinery: timing, roofline probe, result rows, tables.

Rows are JSON lines with one schema (see `row`); `benchmarks/report.py` turns a file of them
into markdown tables.  GPU timings use triton.testing.do_bench (median, warm-up excluded);
CPU timings are the median of repeats with the thread count recorded.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import tempfile
import statistics
import time

import torch

_ROOFLINE: dict = {}
_DEADLINE = [None]  # time.monotonic() past which the running benchmark stops adding cases


def set_budget(seconds):
    """Time box for the cases that follow (None: no limit); see out_of_time()."""
    _DEADLINE[0] = None if seconds is None else time.monotonic() + seconds


def out_of_time() -> bool:
    """True once the time box is spent: a module then writes "skipped" rows for the rest."""
    return _DEADLINE[0] is not None and time.monotonic() > _DEADLINE[0]


def skipped(op, case, shape, dtype, device):
    return row(op, case, "(all)", shape, dtype, device, None,
               note="skipped: time box of this run spent")


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_fn(fn, device, warmup=3, rep=10):
    """-> {"median_ms", "p20_ms", "p80_ms"} of fn() (no args)."""
    if str(device).startswith("cuda"):
        import triton.testing

        med, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=100,
                                                quantiles=[0.5, 0.2, 0.8])
        return {"median_ms": med, "p20_ms": p20, "p80_ms": p80}
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(rep):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    ts.sort()
    q = lambda f: ts[min(len(ts) - 1, int(f * len(ts)))]  # noqa: E731
    return {"median_ms": statistics.median(ts), "p20_ms": q(0.2), "p80_ms": q(0.8)}


def peak_memory(fn, device):
    """Peak bytes allocated above the level before fn() runs.

    CUDA: torch.cuda.max_memory_allocated.  CPU: growth of the process's peak RSS."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return cpu_peak_rss(fn)


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def cpu_peak_rss(fn):
    """Peak resident-set growth (bytes) while fn() runs, on Linux: reset the high-water mark
    (write 5 to /proc/self/clear_refs), run, read VmHWM.  Large tensors are mmap-backed and
    returned on free, so this tracks tensor memory closely."""
    try:  # hand freed heap memory back first, so that reusing it counts as growth
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    fn()
    return max(0, _status_kib("VmHWM") - before) * 1024


def roofline(device):
    """Measured ceilings on this device: {"gemm_tflops", "copy_gbs"} (cached per device)."""
    key = str(device)
    if key in _ROOFLINE:
        return _ROOFLINE[key]
    cuda = key.startswith("cuda")
    n = 8192 if cuda else 1024
    dt = torch.bfloat16 if cuda else torch.float32
    a = torch.randn(n, n, device=device, dtype=dt)
    b = torch.randn(n, n, device=device, dtype=dt)
    t = time_fn(lambda: a @ b, device, warmup=2, rep=5)["median_ms"]
    gemm = 2 * n ** 3 / (t * 1e-3) / 1e12
    m = (1 << 28) if cuda else (1 << 24)
    x = torch.randn(m, device=device)
    y = torch.empty_like(x)
    t = time_fn(lambda: y.copy_(x), device, warmup=2, rep=5)["median_ms"]
    copy = 2 * m * 4 / (t * 1e-3) / 1e9
    _ROOFLINE[key] = {"gemm_tflops": gemm, "gemm_dtype": str(dt).replace("torch.", ""),
                      "copy_gbs": copy}
    if not cuda:
        _ROOFLINE[key]["fma_peak_tflops"] = cpu_fma_peak()
    return _ROOFLINE[key]


def cpu_fma_peak(threads=None):
    """Peak fp32 AVX2-FMA TFLOP/s of this CPU on `threads` threads (default: torch's), from
    benchmarks/fma_peak.c built with the system C compiler; None when it cannot be built."""
    threads = threads or torch.get_num_threads()
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fma_peak.c")
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or platform.machine() not in ("x86_64", "AMD64"):
        return None
    with tempfile.TemporaryDirectory() as d:
        exe = os.path.join(d, "fma_peak")
        build = subprocess.run([cc, "-O2", "-mavx2", "-mfma", "-fopenmp", src, "-o", exe],
                               capture_output=True)
        if build.returncode != 0:
            return None
        run = subprocess.run([exe], capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    try:
        return float(run.stdout.split()[-1]) / 1e3
    except (ValueError, IndexError):
        return None


def device_name(device):
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def versions():
    v = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        v["triton"] = triton.__version__
    except Exception:
        pass
    if torch.version.cuda:
        v["cuda"] = torch.version.cuda
    return v


def row(op, case, impl, shape, dtype, device, t, flops=None, bytes_=None, peak=None,
        baseline_ms=None, note=None):
    """One result row (JSON-serialisable).

    op: "window_attention" ...; case: a short label ("fwd N=16k w=256"); impl: what ran
    ("mmcore:cpu", "sdpa-dense-mask", ...); shape: dict of sizes; t: time_fn's dict (or None
    for a row that did not run, with `note` saying why); flops: useful FLOPs of one call;
    baseline_ms: the time of the row this one is compared with -> ratio = baseline/ours."""
    r = {"op": op, "case": case, "impl": impl, "shape": shape,
         "dtype": str(dtype).replace("torch.", ""), "device": str(device),
         "device_name": device_name(device), "versions": versions(),
         "threads": torch.get_num_threads(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    if t is not None:
        r.update(t)
        if flops:
            r["tflops"] = flops / (t["median_ms"] * 1e-3) / 1e12
            rl = roofline(device)
            r["pct_roofline"] = 100 * r["tflops"] / rl["gemm_tflops"]
        if bytes_:
            r["gbs"] = bytes_ / (t["median_ms"] * 1e-3) / 1e9
        if baseline_ms:
            r["speedup_vs_baseline"] = baseline_ms / t["median_ms"]
    if peak is not None:
        r["peak_mib"] = peak / 2 ** 20
    if note:
        r["note"] = note
    return r


def emit(rows, path=None):
    """Append rows to a JSON-lines file (default $MMCORE_BENCH_OUT or benchmarks/results.jsonl)."""
    path = path or os.environ.get("MMCORE_BENCH_OUT") or os.path.join(
        os.path.dirname(__file__), "results.jsonl")
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def _fmt(v, nd=3):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.{nd}g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def markdown_table(rows):
    """Rows -> a markdown table (one line per row)."""
    cols = [("op", "op"), ("case", "case"), ("impl", "impl"), ("dtype", "dtype"),
            ("median_ms", "median ms"), ("p20_ms", "p20"), ("p80_ms", "p80"),
            ("tflops", "TFLOP/s"), ("pct_roofline", "% roof"), ("peak_mib", "peak MiB"),
            ("speedup_vs_baseline", "× vs base"), ("note", "note")]
    used = [c for c in cols if any(c[0] in r for r in rows)]
    lines = ["| " + " | ".join(h for _, h in used) + " |",
             "|" + "|".join("---" for _ in used) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k)) for k, _ in used) + " |")
    return "\n".join(lines)
