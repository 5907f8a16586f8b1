"""Shared benchmark machinery: timing, the spread check, the roofline, result rows, tables.

Rows are JSON lines with one schema (see `row`); `benchmarks/report.py` turns a file of them
into markdown tables and plots.  GPU timings use triton.testing.do_bench (median, warm-up
excluded); CPU timings are the median of repeats with the thread count recorded.

Conventions (docs/benchmarks.md explains them to users):
  * ratio: every ratio is "mmcore x faster than <baseline>" = baseline ms / mmcore ms, so
    > 1 means mmcore is faster (`compare`); fields speedup, faster, than.
  * spread: p80 / p20 of a row's repeats; above SPREAD_LIMIT the row is measured once more
    and, if still wide, marked "unstable" (`time_fn`).
  * roofline: `roofline(device)`; "% roof" = useful TFLOP/s / roof_tflops.
"""
from __future__ import annotations

import importlib
import json
import math
import os
import platform
import statistics
import time

import torch

_ROOFLINE: dict = {}
SPREAD_LIMIT = 1.5  # p80 / p20 above this: the row is re-measured once, then marked unstable
DEFAULT_OUT = "mmcore-bench.jsonl"  # in the current directory (or $MMCORE_BENCH_OUT)
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


def _time_once(fn, device, warmup, rep):
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


def spread(t) -> float:
    """p80 / p20 of a time_fn result (1.0: every repeat the same)."""
    return t["p80_ms"] / t["p20_ms"] if t["p20_ms"] > 0 else math.inf


def time_fn(fn, device, warmup=3, rep=10):
    """-> {"median_ms", "p20_ms", "p80_ms", "spread"[, "remeasured", "unstable"]} of fn().

    A measurement whose spread (p80 / p20) exceeds SPREAD_LIMIT is taken once more (no
    second warm-up); the narrower of the two is kept, with "remeasured": the first spread,
    and "unstable": True when it is still above the limit (its ratios are not to be
    trusted; on a shared machine this is mostly other processes' load)."""
    t = _time_once(fn, device, warmup, rep)
    t["spread"] = spread(t)
    if t["spread"] > SPREAD_LIMIT:
        t2 = _time_once(fn, device, 0, rep)
        t2["spread"] = spread(t2)
        first = t["spread"]
        t = t2 if t2["spread"] < t["spread"] else t
        t["remeasured"] = round(first, 3)
        if t["spread"] > SPREAD_LIMIT:
            t["unstable"] = True
    return t


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
    """The ceilings of this device, measured once per device (cached):

    gemm_tflops: a measured GEMM (CUDA: 8192^2 bf16; CPU: 1024^2 fp32 torch.matmul);
    copy_gbs: a measured device copy; fma_tflops (CPU only): the fp32 FMA peak of
    mmcore.cpu_info.fma_peak(threads) -- None when that probe is not available;
    roof_tflops: the higher of the two FLOP/s figures (a measured GEMM can beat a
    low-balled peak probe, and a roof must be an upper bound), roof: which one it is.
    "% roof" of a row = its useful TFLOP/s / roof_tflops."""
    key = str(device)
    if key in _ROOFLINE:
        return _ROOFLINE[key]
    cuda = key.startswith("cuda")
    n = 8192 if cuda else 1024
    dt = torch.bfloat16 if cuda else torch.float32
    a = torch.randn(n, n, device=device, dtype=dt)
    b = torch.randn(n, n, device=device, dtype=dt)
    t = _time_once(lambda: a @ b, device, warmup=2, rep=5)["median_ms"]
    gemm = 2 * n ** 3 / (t * 1e-3) / 1e12
    m = (1 << 28) if cuda else (1 << 24)
    x = torch.randn(m, device=device)
    y = torch.empty_like(x)
    t = _time_once(lambda: y.copy_(x), device, warmup=2, rep=5)["median_ms"]
    copy = 2 * m * 4 / (t * 1e-3) / 1e9
    rl = {"gemm_tflops": gemm, "gemm_dtype": str(dt).replace("torch.", ""),
          "gemm_shape": f"{n}x{n}x{n}", "copy_gbs": copy, "fma_tflops": None}
    if not cuda:
        rl.update(cpu_fma_peak())
    if rl["fma_tflops"] and rl["fma_tflops"] >= gemm:
        rl["roof_tflops"], rl["roof"] = rl["fma_tflops"], "fma"
    else:
        rl["roof_tflops"], rl["roof"] = gemm, "gemm"
    _ROOFLINE[key] = rl
    return rl


def cpu_fma_peak(threads=None) -> dict:
    """{"fma_tflops", "fma_isa", "fma_threads"} from mmcore.cpu_info.fma_peak (the probe in
    the extension); fma_tflops None, with "fma_missing" saying why, where it is absent."""
    threads = threads or torch.get_num_threads()
    try:
        cpu_info = importlib.import_module("mmcore.cpu_info")
    except ImportError as e:
        return {"fma_tflops": None, "fma_missing": f"mmcore.cpu_info not importable ({e})"}
    try:
        p = cpu_info.fma_peak(threads=threads)
    except Exception as e:  # a probe that fails must not stop the benchmark
        return {"fma_tflops": None, "fma_missing": f"fma_peak failed: {type(e).__name__}: {e}"}
    return {"fma_tflops": p["gflops_all"] / 1e3, "fma_isa": p["isa"],
            "fma_threads": p["threads"]}


def roofline_line(device) -> str:
    """One line defining the roofline of this run (printed once above the table)."""
    rl = roofline(device)
    gemm = (f"measured GEMM {rl['gemm_tflops']:.3g} TFLOP/s ({rl['gemm_shape']} "
            f"{rl['gemm_dtype']} matmul)")
    if rl.get("fma_tflops"):
        fma = (f"{rl['fma_isa']} fp32 FMA peak {rl['fma_tflops']:.3g} TFLOP/s on "
               f"{rl['fma_threads']} threads")
        hi = "FMA peak" if rl["roof"] == "fma" else "measured GEMM (above the FMA probe)"
        return (f"roofline: {fma}; {gemm}; % roof = useful TFLOP/s / "
                f"{rl['roof_tflops']:.3g} TFLOP/s, the higher of the two ({hi}); "
                f"copy {rl['copy_gbs']:.3g} GB/s")
    why = "" if str(device).startswith("cuda") else \
        f" (no FMA peak: {rl.get('fma_missing', 'unavailable')})"
    return (f"roofline: {gemm}{why}; % roof = useful TFLOP/s / that GEMM's "
            f"{rl['roof_tflops']:.3g} TFLOP/s; copy {rl['copy_gbs']:.3g} GB/s")


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
        baseline_ms=None, baseline=None, note=None):
    """One result row (JSON-serialisable).

    op: "window_attention" ...; case: a short label ("fwd N=16k w=256"); impl: what ran
    ("mmcore:cpu", "sdpa-dense-mask", ...); shape: dict of sizes; t: time_fn's dict (or None
    for a row that did not run, with `note` saying why); flops: useful FLOPs of one call.
    baseline_ms / baseline: for an mmcore row, the time and name of what it is compared
    with -> speedup = baseline_ms / ours (> 1: mmcore faster); see also `compare`."""
    r = {"op": op, "case": case, "impl": impl, "shape": shape,
         "dtype": str(dtype).replace("torch.", ""), "device": str(device),
         "device_name": device_name(device), "versions": versions(),
         "threads": torch.get_num_threads(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    notes = [note] if note else []
    if t is not None:
        r.update(t)
        if flops:
            r["tflops"] = flops / (t["median_ms"] * 1e-3) / 1e12
            r["pct_roofline"] = 100 * r["tflops"] / roofline(device)["roof_tflops"]
        if bytes_:
            r["gbs"] = bytes_ / (t["median_ms"] * 1e-3) / 1e9
        if baseline_ms:
            set_ratio(r, impl, baseline or "baseline", baseline_ms / t["median_ms"])
        if t.get("unstable"):
            notes.append(f"UNSTABLE: p80/p20 {t['spread']:.2f} after re-measuring "
                         f"(limit {SPREAD_LIMIT}); do not trust its ratio")
    if peak is not None:
        r["peak_mib"] = peak / 2 ** 20
    if notes:
        r["note"] = "; ".join(notes)
    return r


def set_ratio(r, faster, than, speedup, unstable=False):
    """Put the run's one ratio convention on row r: `faster` (an mmcore impl) is `speedup`
    times faster than `than` (its time / mmcore's; > 1: mmcore faster).  unstable: either
    time behind the ratio is unstable (see time_fn) -> "ratio_unstable": True."""
    r["speedup"], r["faster"], r["than"] = speedup, faster, than
    if unstable or r.get("unstable"):
        r["ratio_unstable"] = True
    else:
        r.pop("ratio_unstable", None)


def compare(rows, ours, against=None, exclude=()):
    """Fill the ratios of one case's rows (those that ran), in place; -> rows.

    ours: the mmcore impl the case is about.  Every other non-mmcore row (a baseline) gets
    "ours x faster than this row"; ours gets the ratio against `against` (an impl name)
    or, by default, the fastest baseline.  Other mmcore rows (other backends) are compared
    with the same baseline as ours.  exclude: impls that are not competitors (a floor such
    as F.linear without LoRA): no ratio either way."""
    ms = {r["impl"]: r["median_ms"] for r in rows if r.get("median_ms")}
    if ours not in ms:
        return rows
    base = [i for i in ms if not i.startswith("mmcore") and i not in exclude]
    ref = against if against in ms else (min(base, key=ms.get) if base else None)
    shaky = {r["impl"] for r in rows if r.get("unstable")}
    for r in rows:
        i = r["impl"]
        if i not in ms or i in exclude:
            continue
        if not i.startswith("mmcore"):
            set_ratio(r, ours, i, ms[i] / ms[ours], unstable=bool({i, ours} & shaky))
        elif ref is not None:
            set_ratio(r, i, ref, ms[ref] / ms[i], unstable=bool({i, ref} & shaky))
    return rows


def floor_note(r, floor_name, floor_ms):
    """Note on an mmcore row how far above a floor (work it cannot avoid) it runs."""
    if r.get("median_ms") and floor_ms:
        pct = 100 * (r["median_ms"] / floor_ms - 1)
        text = f"{pct:+.0f}% time over the {floor_name} floor"
        r["note"] = f"{r['note']}; {text}" if r.get("note") else text
    return r


def out_path(path=None):
    """Where rows go: `path`, else $MMCORE_BENCH_OUT, else ./mmcore-bench.jsonl (the current
    directory; never inside the package or a checkout)."""
    return path or os.environ.get("MMCORE_BENCH_OUT") or os.path.join(os.getcwd(),
                                                                      DEFAULT_OUT)


def emit(rows, path=None):
    """Append rows to a JSON-lines file (see out_path); -> its path."""
    path = out_path(path)
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


def _ratio_cell(r):
    if r.get("speedup") is None:
        return ""
    than = "this row" if r.get("than") == r["impl"] else r.get("than")
    who = "" if r.get("faster") == r["impl"] else f"{r.get('faster')} "
    flag = " (unstable)" if r.get("ratio_unstable") else ""
    slower = f" ({1 / r['speedup']:.2f}x slower)" if 0 < r["speedup"] < 1 else ""
    return f"{who}{r['speedup']:.2f}x faster than {than}{slower}{flag}"


def markdown_table(rows):
    """Rows -> a markdown table (one line per row).  The ratio column reads "<mmcore impl>
    N.NNx faster than <baseline>" (> 1: mmcore faster); rows of older files that carry
    only the old `speedup_vs_baseline` show it in a "legacy ratio" column."""
    cols = [("op", "op"), ("case", "case"), ("impl", "impl"), ("dtype", "dtype"),
            ("median_ms", "median ms"), ("p20_ms", "p20"), ("p80_ms", "p80"),
            ("tflops", "TFLOP/s"), ("pct_roofline", "% roof"), ("peak_mib", "peak MiB"),
            ("speedup", "mmcore x faster"), ("speedup_vs_baseline", "legacy ratio"),
            ("note", "note")]
    used = [c for c in cols if any(c[0] in r for r in rows)]
    lines = ["| " + " | ".join(h for _, h in used) + " |",
             "|" + "|".join("---" for _ in used) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_ratio_cell(r) if k == "speedup" else _fmt(r.get(k))
                                       for k, _ in used) + " |")
    return "\n".join(lines)
