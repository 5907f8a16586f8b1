"""Run the GPU suite so that a hung test fails that test, not the run.

    python tests/run_gpu.py [--budget S] [pytest args, default: -m gpu tests]

Collects the selected tests and runs them in one pytest process with the per-test watchdog of
tests/watchdog.py.  When that process is ended by the watchdog's hard timeout (a test stuck
in C code: a compile or a kernel that never returns), the test that was running is recorded
as HUNG and the tests after it run in a fresh process.  --budget bounds the whole run; tests
not reached count as not run.  Outcomes come from the watchdog's progress file, so a process
that died still counts what it finished.  Ends with "N passed, N failed, N skipped" (hung and
not run count as failed); exit 0 only when nothing failed."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def collect(pytest_args, cwd=ROOT):
    p = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                        "-p", "no:cacheprovider", *pytest_args],
                       cwd=cwd, capture_output=True, text=True)
    if p.returncode not in (0, 5):
        sys.stdout.write(p.stdout[-4000:] + p.stderr[-4000:])
        raise SystemExit(f"run_gpu: collection failed (exit {p.returncode})")
    return [ln.strip() for ln in p.stdout.splitlines() if "::" in ln and not ln.startswith(" ")]


def run_once(todo, marker, left, cwd=ROOT):
    """One pytest process over `todo` -> (outcomes {nodeid: outcome}, last started, rc)."""
    fd, progress = tempfile.mkstemp(suffix=".progress")
    os.close(fd)
    env = dict(os.environ, MMCORE_TEST_PROGRESS=progress)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE",
           *(["-m", marker] if marker else []), *todo]
    try:
        rc = subprocess.run(cmd, cwd=cwd, env=env, timeout=left).returncode
    except subprocess.TimeoutExpired:
        rc = None
    with open(progress) as f:
        lines = [ln.split(" ") for ln in f.read().splitlines()]
    os.unlink(progress)
    outcomes, last = {}, None
    for parts in lines:
        if parts[0] == "start":
            last = parts[1]
        elif parts[0] == "done":
            outcomes[parts[1]] = parts[2] if len(parts) > 2 else "passed"
    return outcomes, last, rc


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=float(os.environ.get("GPU_TEST_BUDGET", 0)),
                    help="seconds for the whole run (0: no limit)")
    ap.add_argument("--cwd", default=ROOT, help="where pytest runs (default: the repo)")
    a, rest = ap.parse_known_args(argv)
    pytest_args = rest or ["-m", "gpu", "tests"]
    marker = next((pytest_args[i + 1] for i, x in enumerate(pytest_args[:-1]) if x == "-m"), None)
    ids = collect(pytest_args, a.cwd)
    print(f"run_gpu: {len(ids)} tests selected", flush=True)
    t0 = time.time()
    outcomes, hung, not_run, todo = {}, [], [], list(ids)
    while todo:
        left = a.budget - (time.time() - t0) if a.budget else None
        if left is not None and left <= 5:
            not_run = todo
            break
        got, last, rc = run_once(todo, marker, left, a.cwd)
        outcomes.update(got)
        rest_ids = [n for n in todo if n not in got]
        if rc is None:  # the budget ran out inside this process
            print(f"run_gpu: budget of {a.budget:g} s spent while running {last}", flush=True)
            not_run = rest_ids
            break
        if last is not None and last not in got:  # ended by the watchdog's hard timeout
            hung.append(last)
            print(f"run_gpu: HUNG {last} (process ended by the watchdog); going on after it",
                  flush=True)
            todo = [n for n in rest_ids if n != last]
            continue
        not_run = rest_ids  # normally empty; pytest stopped early otherwise (-x, crash)
        break
    n = {k: sum(1 for v in outcomes.values() if v == k) for k in ("passed", "failed", "skipped")}
    for name in hung:
        print(f"HUNG {name}")
    for name in not_run:
        print(f"NOT RUN {name}")
    for name, v in outcomes.items():
        if v == "failed":
            print(f"FAILED {name}")
    failed = n["failed"] + len(hung) + len(not_run)
    print(f"run_gpu: {time.time() - t0:.0f} s")
    print(f"{n['passed']} passed, {failed} failed, {n['skipped']} skipped")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
