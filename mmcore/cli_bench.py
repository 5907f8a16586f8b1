"""`mmcore bench` and `mmcore info`: argument checks, the benchmark runner, the environment
report (with the backend `auto` picks for typical problems, and why).

The benchmark modules are the package mmcore.benchmarks (the benchmarks/ folder, installed
with the wheel), so neither command needs a source checkout.  docs/benchmarks.md is the
user's guide to the output."""
from __future__ import annotations

import importlib
import math
import os
import platform
import sys
import time

# op (as given to --op) -> benchmark modules in mmcore.benchmarks (benchmarks/)
BENCH_MODULES = {
    "window_attention": ["bench_window_attention"],
    "cross_attention": ["bench_cross_attention"],
    "lora_linear": ["bench_lora_linear", "bench_lora_peft"],
    "patch": ["bench_patch"],
    "cuda_kernels": ["bench_cuda_kernels"],  # csrc/cuda decode + SGMV (GPU only)
    "train": ["bench_train"],
    "masks": ["bench_masks"],  # HF mask patterns: bounds / key_mask / softcap vs SDPA / eager
}
# `--quick` without --op: these modules (importing peft and a training step take long:
# `--op lora_linear --quick` adds peft's layer, `--op train --quick` a training step)
QUICK_OPS = ("window_attention", "cross_attention", "lora_linear", "patch")
QUICK_SKIP = ("bench_lora_peft",)
SMOKE_OPS = ("window_attention", "lora_linear")  # the ops whose first module has smoke()

BENCH_BUDGET_S = 400.0  # CUDA default for the whole `mmcore bench` grid (--budget overrides)
BENCH_SHARE = {"bench_window_attention": 3.0, "bench_cross_attention": 2.0,
               "bench_lora_linear": 2.0, "bench_lora_peft": 1.0, "bench_patch": 1.0}
PLOT_EXTRA = "pip install 'mmcore[plot]'"


T0 = time.monotonic()  # import time of the CLI: the run's start, for its timing line


class UsageError(Exception):
    """Bad input to a command: printed as one line, exit status 2."""


# ------------------------------------------------------------------ argument checks

def check_device(arg):
    """'cpu' / 'cuda' / 'cuda:N' usable here -> the device string; else UsageError."""
    import torch

    if arg is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(arg)
    except (RuntimeError, ValueError, TypeError):
        raise UsageError(f"--device: expected cpu, cuda or cuda:N, got {arg!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device: the benchmarks run on cpu or cuda, got {arg!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch is built without CUDA" if torch.version.cuda is None
                   else "no CUDA device is visible")
            raise UsageError(f"--device {arg}: CUDA is not available ({why}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {arg}: only {torch.cuda.device_count()} CUDA "
                             f"device(s) here")
    return str(dev)


def check_budget(arg):
    """--budget: a finite number of seconds > 0 (or None)."""
    if arg is None:
        return None
    try:
        v = float(arg)
    except ValueError:
        raise UsageError(f"--budget: expected seconds (a number > 0), got {arg!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise UsageError(f"--budget: expected seconds (a finite number > 0), got {arg!r}")
    return v


def check_output(opt, path):
    """An output file we can create or append to, checked before any work: not a directory,
    its folder exists and is writable -> the absolute path."""
    if not path:
        raise UsageError(f"{opt}: expected a file name, got {path!r}")
    p = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(p):
        raise UsageError(f"{opt} {path}: is a directory; give a file name "
                         f"(e.g. {os.path.join(path, 'mmcore-bench.jsonl')})")
    folder = os.path.dirname(p)
    if not os.path.isdir(folder):
        raise UsageError(f"{opt} {path}: folder {folder} does not exist")
    if os.path.exists(p):
        if not os.access(p, os.W_OK):
            raise UsageError(f"{opt} {path}: file is not writable")
    elif not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{opt} {path}: cannot create a file in {folder} (not writable)")
    return p


def require_matplotlib():
    """Import matplotlib (Agg) or raise UsageError naming the `plot` extra."""
    from ._optional import require

    try:
        matplotlib = require("matplotlib", feature="mmcore bench --plot")
    except ImportError as e:
        raise UsageError(str(e)) from None
    matplotlib.use("Agg")
    return matplotlib


def check_plot(path):
    p = check_output("--plot", path)
    require_matplotlib()
    from matplotlib.figure import Figure

    kinds = Figure().canvas.get_supported_filetypes()
    ext = os.path.splitext(p)[1].lstrip(".").lower()
    if ext not in kinds:
        raise UsageError(f"--plot {path}: the file name must end in one of "
                         f"{', '.join('.' + k for k in sorted(kinds))}")
    return p


# ------------------------------------------------------------------ mmcore bench

def add_bench_parser(sub):
    b = sub.add_parser("bench", help="benchmarks (ratios vs baselines in the same run)",
                       description="Benchmark mmcore's ops against the PyTorch / Hugging Face "
                                   "baselines, in one run (docs/benchmarks.md).")
    b.add_argument("--op", action="append", choices=sorted(BENCH_MODULES),
                   help="op to benchmark (repeatable; default all; with --quick: "
                        + ", ".join(QUICK_OPS) + ", without peft's layer)")
    b.add_argument("--quick", action="store_true",
                   help="a few small cases (under a minute on a 2-core CPU)")
    b.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if "
                                                  "present)")
    b.add_argument("--out", default=None,
                   help="JSON-lines file to append rows to (default ./mmcore-bench.jsonl, or "
                        "$MMCORE_BENCH_OUT); with --tune: the dispatch table to write "
                        "(default ./<device key>.json)")
    b.add_argument("--no-save", action="store_true", help="print only")
    b.add_argument("--plot", default=None, metavar="FILE",
                   help="draw time vs length and the mmcore x-faster ratios to FILE "
                        f"(.png, .pdf, .svg; needs matplotlib: {PLOT_EXTRA})")
    b.add_argument("--tune", action="store_true",
                   help="time every backend on a grid of problems and write this device's "
                        "dispatch table (see --out)")
    b.add_argument("--budget", default=None, metavar="SECONDS",
                   help="seconds for the whole run (default on CUDA: 400 for the grid, 300 for"
                        " --tune); cases past it are written as skipped rows")
    b.add_argument("--smoke", action="store_true",
                   help="two tiny cases of the first op that has them (window_attention, "
                        "lora_linear): checks the runner, output and plot in seconds; "
                        "not a measurement")
    return b


def _check_bench_args(args):
    device = check_device(args.device)
    budget = check_budget(args.budget)
    if args.no_save and args.out is not None:
        raise UsageError("--out and --no-save: give one of them")
    if args.smoke and args.op and not set(args.op) & set(SMOKE_OPS):
        raise UsageError(f"--smoke: only {' and '.join(SMOKE_OPS)} have a smoke case")
    if args.tune:
        if args.plot is not None:
            raise UsageError("--plot: --tune writes a dispatch table, nothing to plot")
        if args.op or args.quick or args.smoke:
            raise UsageError("--tune measures its own grid; drop --op / --quick / --smoke")
    out = None
    if not args.no_save:
        if args.tune:
            from .ops import tables

            default = os.path.join(os.getcwd(), tables.device_key(device.split(":")[0]) +
                                   ".json")
            out = check_output("--out", default if args.out is None else args.out)
        elif args.out is not None:
            out = check_output("--out", args.out)
        else:
            from .benchmarks import harness

            env = os.environ.get("MMCORE_BENCH_OUT")
            out = check_output("$MMCORE_BENCH_OUT" if env else "--out (default)",
                               harness.out_path())
    plot = check_plot(args.plot) if args.plot is not None else None
    return device, budget, out, plot


def run_bench(args) -> int:
    try:
        device, budget, out, plot = _check_bench_args(args)
    except UsageError as e:
        print(f"mmcore bench: error: {e}", file=sys.stderr)
        return 2
    from .benchmarks import harness

    if args.tune:
        tune = importlib.import_module("mmcore.benchmarks.tune")
        path = tune.run(device.split(":")[0], out=out, budget=budget)
        print(f"use it: MMCORE_DISPATCH_TABLE={path} (or, in a checkout, copy it into "
              f"mmcore/ops/dispatch_tables/ to ship it)")
        return 0
    ops = args.op or (list(QUICK_OPS) if args.quick else list(BENCH_MODULES))
    mods = [(op, n) for op in ops for n in BENCH_MODULES[op]
            if args.op or not args.quick or n not in QUICK_SKIP]
    if args.smoke:  # the first module with tiny cases (tests, docs: not a measurement)
        mods = [m for m in mods if m[0] in SMOKE_OPS][:1] or [("window_attention",
                                                               "bench_window_attention")]
    # time box: on CUDA the whole grid in BENCH_BUDGET_S (within 8 minutes with start-up),
    # shared between the modules by BENCH_SHARE; a module past its share writes "skipped"
    # rows for the rest of its cases
    if budget is None and device.startswith("cuda"):
        budget = BENCH_BUDGET_S
    t0 = time.monotonic()
    rows = []
    for n, (op, name) in enumerate(mods):
        mod = importlib.import_module(f"mmcore.benchmarks.{name}")
        share = None
        if budget is not None:
            left = budget - (time.monotonic() - t0)
            weights = [BENCH_SHARE.get(m, 1.0) for _, m in mods[n:]]
            share = max(0.0, left) * weights[0] / sum(weights)
        harness.set_budget(share)
        mode = "smoke" if args.smoke else "quick" if args.quick else "full"
        print(f"[{op}] running {name} ({mode}, {device}"
              + (f", time box {share:.0f} s" if share is not None else "") + ")",
              file=sys.stderr)
        t_mod, c_mod = time.monotonic(), time.process_time()
        if args.smoke and hasattr(mod, "smoke"):
            rows.extend(mod.smoke(device))
        else:
            rows.extend(mod.run(args.quick, device))
        print(f"[{op}] {name} done in {time.monotonic() - t_mod:.1f} s "
              f"({time.process_time() - c_mod:.1f} s of CPU time)", file=sys.stderr)
    harness.set_budget(None)
    print(f"[all] {time.monotonic() - T0:.1f} s since start ({time.process_time():.1f} s of "
          f"CPU time)", file=sys.stderr)
    print(f"device: {harness.device_name(device)}; versions {harness.versions()}")
    print(harness.roofline_line(device))
    print(f"ratios: 'mmcore x faster than <baseline>' = baseline ms / mmcore ms (> 1: mmcore "
          f"faster); rows with p80/p20 > {harness.SPREAD_LIMIT} are re-measured once and "
          f"marked UNSTABLE if still wide\n")
    print(harness.markdown_table(rows))
    unstable = sum(1 for r in rows if r.get("unstable"))
    if unstable:
        print(f"\n{unstable} of {len(rows)} rows UNSTABLE (timing spread above the limit after"
              f" re-measuring): another process is probably loading this machine")
    if out and rows:
        harness.emit(rows, out)
        print(f"\n{len(rows)} rows appended to {out}")
    if plot:
        from .benchmarks import report

        report.plot(rows, plot)
        print(f"plot written to {plot}")
    return 0


# ------------------------------------------------------------------ mmcore info

def _problems(dtype):
    """(op, description, build(needs_grad) -> Problem) of a few typical calls."""
    import torch

    # the modules (mmcore.ops re-exports the functions under the same names)
    WA, CA, LL = (importlib.import_module(f"mmcore.ops.{m}") for m in
                  ("window_attention", "cross_attention", "lora_linear"))

    def meta(*shape):
        return torch.empty(*shape, device="meta", dtype=dtype)

    def win(N, H, Hkv, D, left, right, causal, G):
        return lambda grad: WA.problem(meta(1, H, N, D), meta(1, Hkv, N, D), None, None,
                                       left, 0 if causal else right, causal, G, grad)

    def cross(B, H, Sq, Sk, D):
        lens = meta(B)
        return lambda grad: CA.problem(meta(B, H, Sq, D), meta(B, H, Sk, D), lens, lens, grad)

    def lora(M, K, N, r, A):
        return lambda grad: LL.problem(meta(M, K), meta(N, K), meta(A, r, K), grad)

    return [
        ("window_attention", "encoder window ±256, N=8192, H=12, D=64",
         win(8192, 12, 12, 64, 256, 256, False, 0)),
        ("window_attention", "Longformer window ±256 + 64 global tokens, N=16384, D=64",
         win(16384, 12, 12, 64, 256, 256, False, 64)),
        ("window_attention", "causal decoder window (4096, 0), N=16384, GQA 32/8, D=128",
         win(16384, 32, 8, 128, 4096, 0, True, 0)),
        ("window_attention", "full attention (window=None), N=2048, H=12, D=64",
         win(2048, 12, 12, 64, -1, -1, False, 0)),
        ("cross_attention", "text -> image Sq=8192, Sk=577, H=8, D=64, per-sample lengths",
         cross(2, 8, 8192, 577, 64)),
        ("lora_linear", "LoRA 4096x4096 r=16, M=2048 tokens", lora(2048, 4096, 4096, 16, 1)),
        ("lora_linear", "LoRA 4096x4096 r=16, M=2048, 8 adapters by row",
         lora(2048, 4096, 4096, 16, 8)),
    ]


def _why_auto(op, p):
    """(backend or None, one line saying why) for `auto` on problem p (nothing runs)."""
    from .ops import failures, registry, tables

    impls, _ = registry.plan(op, p)
    refused = []
    for impl in registry.implementations(op):
        why = impl.refuse(p)
        if not why and impl.auto_devices is not None and p.device not in impl.auto_devices \
                and impl not in impls:
            why = [f"serves {p.device} only when asked for by name"]
        if not why and failures.failed(op, impl.backend, tables.failure_key(p)):
            why = ["failed earlier in this process"]
        if why and not why[0].startswith("not available"):  # unloaded: listed above
            w = why[0].split(" (")[0]
            w = w if len(w) <= 70 else w[:67] + "..."
            refused.append(f"{impl.backend} ({w})")
    tail = f"; cannot: {', '.join(refused)}" if refused else ""
    if not impls:
        return None, f"no backend can serve it{tail}"
    order = tables.lookup(op, p)
    first = impls[0]
    if order and first.backend in order:
        reason = f"measured fastest in the dispatch table (order {', '.join(order)})"
    else:
        pr = first.priority_for(p)
        if first.priority_fn is not None and first.priority_fn(p) is not None:
            doc = (first.priority_fn.__doc__ or first.priority_fn.__name__).strip()
            reason = f"priority {pr} for this problem ({doc.splitlines()[0].rstrip('.')})"
        else:
            reason = f"highest declared priority on {p.device} ({pr})"
    others = ", ".join(f"{i.backend} {i.priority_for(p)}" for i in impls[1:])
    return first.backend, reason + (f"; then {others}" if others else "") + tail


def _auto_report(devices):
    """Lines: for each device, the backend auto picks for each typical problem, and why."""
    import dataclasses

    import torch

    from .ops import registry

    lines = []
    for dev in devices:
        dtype = torch.bfloat16 if dev == "cuda" else torch.float32
        gone = sorted({b for rows in registry.report().values() for b, why, _ in rows if why})
        lines.append(f"\nbackend=\"auto\" on {dev} ({str(dtype).replace('torch.', '')}; "
                     f"nothing is run" + (f"; not loaded here: {', '.join(gone)}" if gone
                                           else "") + "):")
        for op, desc, build in _problems(dtype):
            lines.append(f"  {op}: {desc}")
            for mode, grad in (("inference", False), ("training ", True)):
                p = dataclasses.replace(build(grad), device=dev)
                be, why = _why_auto(op, p)
                lines.append(f"    {mode} -> {be or 'ERROR'}: {why}")
    return lines


def add_info_parser(sub):
    return sub.add_parser("info", help="versions, devices, each backend per op (loaded or why "
                                       "not), and what backend=\"auto\" picks for typical calls")


def run_info(args) -> int:
    import torch

    import mmcore
    from .ops import registry, tables
    from .ops.backends import _loaders

    print(f"mmcore {mmcore.__version__}  python {platform.python_version()}  "
          f"torch {torch.__version__}")
    try:
        import triton

        print(f"triton {triton.__version__}  TRITON_INTERPRET="
              f"{os.environ.get('TRITON_INTERPRET', '0')}")
    except Exception as e:
        print(f"triton: not importable ({type(e).__name__})")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"cuda:{i} {p.name}  sm_{p.major}{p.minor}  {p.total_memory / 2**30:.0f} GiB"
                  f"  CUDA {torch.version.cuda}")
    else:
        print("cuda: no device")
    err = _loaders.ext_error()
    if err:
        print(f"mmcore._C: NOT loaded: {err}")
    else:
        print(f"mmcore._C: loaded (cpu ISA {torch.ops.mmcore_C.cpu_capability()}, "
              f"{torch.ops.mmcore_C.num_threads()} threads, "
              f"cuda kernels {'built' if torch.ops.mmcore_C.with_cuda() else 'not built'})")
    env = os.environ.get("MMCORE_BACKEND")
    bad_env = None
    if env and env != "auto" and env not in registry.BACKENDS:
        bad_env = (f"MMCORE_BACKEND={env!r} is not a backend: every op call that says "
                   f"backend='auto' will raise ValueError; set it to auto or one of "
                   f"{', '.join(registry.BACKENDS)}, or unset it")
        print(f"MMCORE_BACKEND={env}  <- INVALID: {bad_env}")
    elif env and env != "auto":
        print(f"MMCORE_BACKEND={env}: forces {env} wherever a call says backend='auto' "
              f"(the choices below are what auto would pick without it)")
    else:
        print("MMCORE_BACKEND=auto")
    exact_ok = True
    try:
        exact = registry.exact_gradients_enabled()
        print(f"{registry.EXACT_ENV}={'1' if exact else '0'}: attention calls that need "
              "gradients " + ("use only the backends marked exact-grads below" if exact else
                              "may use any backend (exact-grads: exact at any logit size)"))
    except ValueError as e:
        bad_env, exact_ok = bad_env or str(e), False
        print(f"{registry.EXACT_ENV}={os.environ.get(registry.EXACT_ENV)!r}  <- INVALID: {e}")
    devices = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
    for dev in devices:
        print(f"dispatch table ({dev}): {tables.describe(dev)}")
    for op, rows in registry.report().items():
        print(f"\n{op}:")
        for backend, why, lim in rows:
            state = "loaded " if why is None else "refused"
            dts = ",".join(lim["dtypes"])
            hd = f" D<={lim['max_head_dim']}" if lim["max_head_dim"] else ""
            prio = ",".join(f"{d}={n}" for d, n in lim["priority"].items())
            print(f"  {backend:<8} {state}  devices={','.join(lim['devices'])} dtypes={dts}{hd}"
                  f" bwd={'yes' if lim['backward'] else 'no'}"
                  + (" exact-grads" if lim["exact_grads"] and lim["backward"]
                     and op in registry.SOFTMAX_OPS else "")
                  + f" priority {prio}"
                  + (f" (per problem: {lim['priority_fn']})" if lim.get("priority_fn") else "")
                  + (f"  ({why})" if why else ""))
    for line in _auto_report(devices) if exact_ok else ():
        print(line)
    if bad_env:
        print(f"mmcore info: error: {bad_env}", file=sys.stderr)
        return 2
    return 0
