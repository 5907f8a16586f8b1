"""The GPU suite's per-test timeouts fire, and a hung test fails itself, not the run.

On the GPU image `pytest -m gpu` once stopped at a stuck compile that pytest-timeout's thread
method did not end (issue 11); tests/watchdog.py arms a SIGALRM (soft) and a faulthandler
exit (hard) around every test, and tests/run_gpu.py resumes after a test the hard timeout
killed.  Here both paths run on the CPU with a 2 s timeout: a test sleeping in Python (soft:
it fails, the next test runs) and a test blocked with SIGALRM masked, standing in for a wait
inside C code (hard: the process ends, run_gpu.py records it as HUNG and runs the rest)."""
import os
import subprocess
import sys
import textwrap

HERE = os.path.dirname(os.path.abspath(__file__))

CONFTEST = f"""
import sys
sys.path.insert(0, {HERE!r})
import watchdog
pytest_runtest_protocol = watchdog.pytest_runtest_protocol
pytest_runtest_logreport = watchdog.pytest_runtest_logreport
"""

TESTS = """
import signal, time

def test_a_passes():
    assert True

def test_b_sleeps_in_python():
    time.sleep(60)

def test_c_stuck_in_c():
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGALRM])
    time.sleep(60)

def test_d_after_the_hang():
    assert True
"""


def test_soft_and_hard_timeouts(tmp_path):
    (tmp_path / "conftest.py").write_text(textwrap.dedent(CONFTEST))
    (tmp_path / "test_stalls.py").write_text(textwrap.dedent(TESTS))
    env = dict(os.environ, MMCORE_TEST_TIMEOUT="2", MMCORE_TEST_HARD_GRACE="2")
    p = subprocess.run([sys.executable, os.path.join(HERE, "run_gpu.py"), "--cwd",
                        str(tmp_path), "--budget", "100", "test_stalls.py"],
                       env=env, capture_output=True, text=True, timeout=120)
    out = p.stdout + p.stderr
    assert p.returncode == 1, out
    assert "TestTimeout" in out and "test_b_sleeps_in_python ran past 2 s" in out, out
    assert "HUNG test_stalls.py::test_c_stuck_in_c" in out, out
    assert "FAILED test_stalls.py::test_b_sleeps_in_python" in out, out
    assert out.rstrip().splitlines()[-1] == "2 passed, 2 failed, 0 skipped", out
