"""pytest setup: CPU by default; `-m gpu` for device-only tests.

Without a CUDA device, TRITON_INTERPRET=1 is set before anything imports Triton, so every
Triton kernel runs on CPU tensors through the interpreter (backend="triton" accepts them)."""
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
sys.path.insert(0, os.path.dirname(__file__))


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
