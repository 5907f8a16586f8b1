"""The `mmcore` command: info | bench | read | train | index | search."""
from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
import time

# op (as given to --op) -> benchmark modules in benchmarks/
BENCH_MODULES = {
    "window_attention": ["bench_window_attention"],
    "cross_attention": ["bench_cross_attention"],
    "lora_linear": ["bench_lora_linear", "bench_lora_peft"],
    "patch": ["bench_patch"],
    "cuda_kernels": ["bench_cuda_kernels"],  # csrc/cuda decode + SGMV (GPU only)
    "train": ["bench_train"],
}


BENCH_BUDGET_S = 400.0  # CUDA default for the whole `mmcore bench` grid (--budget overrides)
BENCH_SHARE = {"bench_window_attention": 3.0, "bench_cross_attention": 2.0,
               "bench_lora_linear": 2.0, "bench_lora_peft": 1.0, "bench_patch": 1.0}


def cmd_info(args) -> int:
    import torch

    import mmcore
    from mmcore.ops import registry
    from mmcore.ops.backends import _loaders

    print(f"mmcore {mmcore.__version__}  python {platform.python_version()}  "
          f"torch {torch.__version__}")
    try:
        import triton

        print(f"triton {triton.__version__}  TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}")
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
    print(f"MMCORE_BACKEND={os.environ.get('MMCORE_BACKEND', 'auto')}")
    from mmcore.ops import tables

    for dev in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
        print(f"dispatch table ({dev}): {tables.describe(dev)}")
    for op, rows in registry.report().items():
        print(f"\n{op}:")
        for backend, why, lim in rows:
            state = "loaded " if why is None else "refused"
            dts = ",".join(lim["dtypes"])
            hd = f" D<={lim['max_head_dim']}" if lim["max_head_dim"] else ""
            prio = ",".join(f"{d}={n}" for d, n in lim["priority"].items())
            print(f"  {backend:<8} {state}  devices={','.join(lim['devices'])} dtypes={dts}{hd}"
                  f" bwd={'yes' if lim['backward'] else 'no'} priority {prio}"
                  + (f" (per problem: {lim['priority_fn']})" if lim.get("priority_fn") else "")
                  + (f"  ({why})" if why else ""))
    return 0


def _bench_dir():
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    d = os.path.join(here, "benchmarks")
    if not os.path.isdir(d):
        raise SystemExit("mmcore bench needs a source checkout (benchmarks/ beside mmcore/)")
    return d


def cmd_bench(args) -> int:
    import torch

    d = _bench_dir()
    sys.path.insert(0, d)
    harness = importlib.import_module("harness")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.tune:
        importlib.import_module("tune").run(device, out=args.out, budget=args.budget)
        return 0
    ops = args.op or list(BENCH_MODULES)
    for op in ops:
        if op not in BENCH_MODULES:
            raise SystemExit(f"--op must be one of {sorted(BENCH_MODULES)}, got {op!r}")
    mods = [(op, n) for op in ops for n in BENCH_MODULES[op]
            if os.path.exists(os.path.join(d, n + ".py"))]
    # time box: on CUDA the whole grid in BENCH_BUDGET_S (within 8 minutes with start-up),
    # shared between the modules by BENCH_SHARE; a module past its share writes "skipped"
    # rows for the rest of its cases
    budget = args.budget if args.budget is not None else (
        BENCH_BUDGET_S if device.startswith("cuda") else None)
    t0 = time.monotonic()
    rows = []
    for n, (op, name) in enumerate(mods):
        mod = importlib.import_module(name)
        share = None
        if budget is not None:
            left = budget - (time.monotonic() - t0)
            weights = [BENCH_SHARE.get(m, 1.0) for _, m in mods[n:]]
            share = max(0.0, left) * weights[0] / sum(weights)
        harness.set_budget(share)
        print(f"[{op}] running {name} ({'quick' if args.quick else 'full'}, {device}"
              + (f", time box {share:.0f} s" if share is not None else "") + ")",
              file=sys.stderr)
        rows.extend(mod.run(args.quick, device))
    harness.set_budget(None)
    rl = harness.roofline(device)
    print(f"device: {harness.device_name(device)}; versions {harness.versions()}")
    fma = rl.get("fma_peak_tflops")
    print(f"roofline: GEMM {rl['gemm_tflops']:.3g} TFLOP/s ({rl['gemm_dtype']}), "
          f"copy {rl['copy_gbs']:.3g} GB/s"
          + (f", fp32 FMA peak {fma:.3g} TFLOP/s" if fma else "") + "\n")
    print(harness.markdown_table(rows))
    if rows and not args.no_save:
        path = harness.emit(rows, args.out)
        print(f"\n{len(rows)} rows appended to {path}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="mmcore", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions, devices, and each backend per op: loaded or why not")
    b = sub.add_parser("bench", help="benchmarks (ratios vs baselines in the same run)")
    b.add_argument("--op", action="append", choices=sorted(BENCH_MODULES),
                   help="op to benchmark (repeatable; default all)")
    b.add_argument("--quick", action="store_true", help="a few small cases (< 1 min on a CPU)")
    b.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    b.add_argument("--out", default=None, help="JSON-lines file to append rows to")
    b.add_argument("--no-save", action="store_true", help="print only")
    b.add_argument("--tune", action="store_true",
                   help="time every backend on a grid of problems and write this device's "
                        "dispatch table (mmcore/ops/dispatch_tables/, or --out)")
    b.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole run (default on CUDA: 400 for the grid, 300 for"
                        " --tune); cases past it are written as skipped rows")
    from .cli_read import add_read_parser, run_read

    add_read_parser(sub).set_defaults(func=run_read)
    from .cli_train import add_train_parser, run_train

    add_train_parser(sub).set_defaults(func=run_train)
    from .cli_index import add_index_parser, add_search_parser, run_index, run_search

    add_index_parser(sub).set_defaults(func=run_index)
    add_search_parser(sub).set_defaults(func=run_search)
    args = ap.parse_args(argv)
    if args.cmd == "info":
        return cmd_info(args)
    if args.cmd == "bench":
        return cmd_bench(args)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
