"""The CI compile audits (tests/test_sm90_audit.py) start in the background when their tests
are selected, so their compiles overlap the rest of the suite instead of adding to it.

Most of the CPU suite runs in one pytest process; the audits (benchmarks/sm90_audit.py
--level ci, about 150 compiles of about a second each per Triton version) use the machine's
other core meanwhile.  conftest.py calls start() once collection is done and moves the audit
tests to the end; each test then waits for its version's result.  triton 3.6 goes first
(the version that rejected kernels before); 3.9 starts when it ends, or when its test is
reached.  Processes still running when pytest exits are ended (only the ones started here).
"""
from __future__ import annotations

import atexit
import os
import subprocess
import sys
import tempfile
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
AUDIT_TEST = "test_sm90_audit.py"
ORDER = ("3.6", "3.9")

_procs: dict = {}
_lock = threading.Lock()
_out = None


def python_for(version):
    """The interpreter whose Triton is `version`: this one (3.9, the main venv) or the second
    venv that ./bootstrap.sh creates (.venv-triton36, or MMCORE_TRITON36_PYTHON)."""
    if version == "3.9":
        return sys.executable
    return os.environ.get("MMCORE_TRITON36_PYTHON",
                          os.path.join(ROOT, ".venv-triton36", "bin", "python"))


def paths(version):
    return os.path.join(_out, f"audit-{version}.json"), os.path.join(_out, f"audit-{version}.log")


def _launch(version):
    with _lock:
        if version in _procs:
            return
        py = python_for(version)
        if not os.path.exists(py):
            _procs[version] = None
            return
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
        js, log = paths(version)
        jobs = os.environ.get("MMCORE_AUDIT_JOBS", "1")
        with open(log, "w") as f:
            _procs[version] = subprocess.Popen(
                [py, os.path.join(ROOT, "benchmarks", "sm90_audit.py"), "--level", "ci",
                 "--jobs", jobs, "--quiet", "--json", js],
                cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)


def _chain():
    for v in ORDER:
        _launch(v)
        p = _procs.get(v)
        if p is not None:
            p.wait()


def start():
    """Start the audits (once per session)."""
    global _out
    if _out is not None:
        return
    _out = tempfile.mkdtemp(prefix="mmcore-audit-")
    threading.Thread(target=_chain, daemon=True).start()
    atexit.register(_stop)


def _stop():
    for p in list(_procs.values()):
        if p is not None and p.poll() is None:
            p.terminate()


def result(version, timeout):
    """Wait for `version`'s audit -> (exit code, json path, log text); exit code None when its
    interpreter does not exist."""
    start()
    _launch(version)  # reached before the chain got to it: run it now, beside the other
    p = _procs[version]
    if p is None:
        return None, None, ""
    p.wait(timeout=timeout)
    js, log = paths(version)
    with open(log) as f:
        return p.returncode, js, f.read()


def pytest_collection_finish(session):
    """Audit tests last (they wait for the background compiles); start them if selected
    (after -m / -k deselection: this hook sees the final list)."""
    items = session.items
    audit = [it for it in items if it.nodeid.split("::")[0].endswith(AUDIT_TEST)]
    if audit and not session.config.option.collectonly:
        items[:] = [it for it in items if it not in audit] + audit
        start()
