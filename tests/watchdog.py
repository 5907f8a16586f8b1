"""Per-test timeouts that fire even when a test is stuck in C code (a hung compile or kernel).

pytest-timeout is not on every GPU image, and its thread method did not stop a stuck compile
there.  Two layers, armed around each test (setup, call and teardown):

* soft: SIGALRM after MMCORE_TEST_TIMEOUT seconds raises TestTimeout in the main thread --
  the test fails and the run goes on.  Python only runs the handler between bytecodes, so a
  wait inside C code (a CUDA synchronize on a kernel that never ends, an MLIR pass) delays it.
* hard: faulthandler, MMCORE_TEST_HARD_GRACE seconds later, prints every thread's stack and
  ends the process (exit 1).  tests/run_gpu.py then records the test as hung and runs the
  tests after it in a fresh process, so one stall fails one test, not the run.

MMCORE_TEST_PROGRESS=FILE: lines "start NODEID" and "done NODEID OUTCOME" (passed, failed,
skipped) per test, for run_gpu.py.
Default timeout: 90 s with a CUDA device (first compiles of a kernel family included), else 0
(off: the CPU suite under the interpreter is slow on a loaded machine, never stuck in C)."""
import faulthandler
import os
import signal
import sys

import pytest


class TestTimeout(Exception):
    """The test ran past MMCORE_TEST_TIMEOUT seconds."""


def timeout_s() -> float:
    v = os.environ.get("MMCORE_TEST_TIMEOUT")
    if v is None:
        import torch
        v = "90" if torch.cuda.is_available() else "0"
    return float(v)


_outcome: dict = {}


def _progress(what, nodeid, outcome=""):
    path = os.environ.get("MMCORE_TEST_PROGRESS")
    if path:
        with open(path, "a") as f:
            f.write(f"{what} {nodeid} {outcome}".rstrip() + "\n")


def pytest_runtest_logreport(report):
    """The outcome of a test: failed if any phase failed, else skipped / passed."""
    prev = _outcome.get(report.nodeid, "passed")
    if report.failed:
        _outcome[report.nodeid] = "failed"
        if os.environ.get("MMCORE_TEST_PROGRESS"):  # under run_gpu.py: the report now, since
            # a later hang ends the process before pytest's own summary
            sys.stdout.write(f"\n--- FAILED {report.nodeid} ({report.when})\n"
                             f"{report.longreprtext[-3000:]}\n")
            sys.stdout.flush()
    elif report.skipped and prev != "failed":
        _outcome[report.nodeid] = "skipped"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    t = timeout_s()
    _progress("start", item.nodeid)
    if t <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        _progress("done", item.nodeid, _outcome.get(item.nodeid, "passed"))
        return
    grace = float(os.environ.get("MMCORE_TEST_HARD_GRACE", "30"))

    def on_alarm(signum, frame):
        raise TestTimeout(f"{item.nodeid} ran past {t:g} s (MMCORE_TEST_TIMEOUT)")

    sys.stderr.flush()
    faulthandler.dump_traceback_later(t + grace, exit=True)
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, t)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        faulthandler.cancel_dump_traceback_later()
        _progress("done", item.nodeid, _outcome.get(item.nodeid, "passed"))
