"""The ops fuzzer (tests/fuzz_ops.py) on every backend the CPU has: torch, cpu (C++) and
triton under the interpreter.  Each backend runs in its own process, so that a crash
(SIGSEGV, SIGFPE, abort) fails the test instead of killing pytest.

CI size: CASES[backend] cases per op; `MMCORE_FUZZ_SCALE=10 pytest tests/test_fuzz_ops.py`
runs ten times as many (other seeds included)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCALE = int(os.environ.get("MMCORE_FUZZ_SCALE", "1"))
CASES = {"torch": 40, "cpu": 40, "triton": 14}


@pytest.mark.parametrize("backend", sorted(CASES))
def test_fuzz_ops(backend):
    """Bad inputs raise a TypeError / ValueError naming the argument; odd valid inputs equal
    the float64 oracle within the tolerance rule; nothing crashes."""
    n = CASES[backend] * SCALE
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "fuzz_ops.py"),
                        "--backend", backend, "--n", str(n), "--seed", "16"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert r.returncode == 0, f"fuzzer process died (exit {r.returncode}):\n" \
                              f"{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    assert not rep["failures"], "\n\n".join(rep["failures"][:10])
    assert rep["counts"]["bad"] > n // 2 and rep["counts"]["valid"] > n // 2, rep["counts"]
