"""Run the oracle tests of the C++ `cpu` backend again under ATen's and MKL's AVX2 paths.

    python tests/run_isa_paths.py              # ATEN_CPU_CAPABILITY=avx2, MKL_ENABLE_INSTRUCTIONS=AVX2
    python tests/run_isa_paths.py --every 1    # every random case, not every 4th
    python tests/run_isa_paths.py -- -x        # more pytest arguments after --

The main test run takes the widest path of the CPU it runs on (AVX-512 on most CI machines);
this run forces the AVX2 one (ATen's kernels, which the tests' bases and oracles use, MKL's
GEMMs, and mmcore._C's own vector code, which follows ATen's capability), so that a rounding
difference between AVX2 and AVX-512 machines shows up on every machine.  The selection is the
window, cross-attention and LoRA cases of the `cpu` backend: every random LoRA case, every
`--every`-th random window / cross case (same seeds as the main run) and their edge cases,
and every attention-dropout case (the mask's hash loop has one build per capability).
The header line says which capability the run had.  Exit status: pytest's.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SELECTION = ["tests/test_window_cpu.py::test_random", "tests/test_window_cpu.py::test_edge",
             "tests/test_cross_attention.py::test_cpu_random",
             "tests/test_cross_attention.py::test_cpu_edge",
             "tests/test_lora_kernels.py::test_cpu_random", "tests/test_cpu_masks.py",
             "tests/test_cpu_dropout.py"]
THINNED = ("test_window_cpu.py::test_random[", "test_cross_attention.py::test_cpu_random[")


class _Subset:
    """Keeps every `every`-th case of the THINNED random tests; reports the capability."""

    def __init__(self, every):
        self.every = every

    def pytest_collection_modifyitems(self, config, items):
        keep, drop = [], []
        for it in items:
            m = re.search(r"\[(\d+)\]$", it.nodeid)
            thinned = any(t in it.nodeid for t in THINNED)
            (drop if thinned and m and int(m.group(1)) % self.every else keep).append(it)
        items[:] = keep
        config.hook.pytest_deselected(items=drop)

    def pytest_terminal_summary(self, terminalreporter):
        terminalreporter.write_line(capability_line())


def capability_line():
    import torch

    import mmcore  # noqa: F401  (loads mmcore._C)
    try:
        ours = torch.ops.mmcore_C.cpu_capability()
    except (AttributeError, RuntimeError) as e:
        ours = f"not loaded ({type(e).__name__})"
    return (f"ISA paths: ATen CPU capability {torch.backends.cpu.get_cpu_capability()} "
            f"(ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY', 'unset')}), "
            f"MKL_ENABLE_INSTRUCTIONS={os.environ.get('MKL_ENABLE_INSTRUCTIONS', 'unset')}, "
            f"mmcore._C {ours}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--isa", default="avx2", help="ATEN_CPU_CAPABILITY (default avx2; "
                    "'default' leaves ATen and MKL on their widest path)")
    ap.add_argument("--every", type=int, default=4, help="every N-th random window / cross "
                    "case (default 4)")
    ap.add_argument("pytest_args", nargs="*")
    args = ap.parse_args(argv)
    if args.every < 1:
        ap.error(f"--every must be >= 1, got {args.every}")
    if args.isa != "default":  # before anything imports torch (pytest's conftest does)
        os.environ["ATEN_CPU_CAPABILITY"] = args.isa
        os.environ["MKL_ENABLE_INSTRUCTIONS"] = args.isa.upper()
    os.chdir(ROOT)
    import pytest

    return pytest.main(["-q", "-p", "no:cacheprovider", *SELECTION, *args.pytest_args],
                       plugins=[_Subset(args.every)])


if __name__ == "__main__":
    sys.exit(main())
