"""pytest setup: CPU by default; `-m gpu` for device-only tests.

Without a CUDA device, TRITON_INTERPRET=1 is set before anything imports Triton, so every
Triton kernel runs on CPU tensors through the interpreter (backend="triton" accepts them).
With one, autotuning is off (MMCORE_TRITON_AUTOTUNE=0: each kernel compiles its default
config once per family instead of timing every config) and every test gets a watchdog
(tests/watchdog.py; MMCORE_TEST_TIMEOUT seconds, 0 = off).  The offline compile audits start
in the background when their tests are selected (tests/audit_bg.py)."""
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    os.environ.setdefault("MMCORE_TRITON_AUTOTUNE", "0")
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
sys.path.insert(0, os.path.dirname(__file__))

import audit_bg  # noqa: E402  (tests/audit_bg.py)
import watchdog  # noqa: E402  (tests/watchdog.py)

pytest_runtest_protocol = watchdog.pytest_runtest_protocol
pytest_runtest_logreport = watchdog.pytest_runtest_logreport
pytest_collection_finish = audit_bg.pytest_collection_finish


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (compiled Triton, CUDA ext)")
    config.addinivalue_line("markers", "slow: longer cases, still run in CI")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; run `pytest -m gpu` on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def interpret():
    """Triton under the numpy interpreter on the CPU (or compiled, on a CUDA machine).

    Yields the device the triton backend should be given tensors on."""
    from mmcore.ops.backends import _loaders

    why = _loaders.triton_error()
    if why:
        pytest.fail(f"triton backend unavailable: {why}")
    yield "cuda" if torch.cuda.is_available() else "cpu"
