"""Whether each backend's machinery loaded, and why not (for dispatch and `mmcore info`)."""
from __future__ import annotations

import functools
import logging
import os

import torch

log = logging.getLogger("mmcore")


def interpret() -> bool:
    """TRITON_INTERPRET=1: Triton kernels run on CPU tensors through the numpy interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(None)
def _triton_error():
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the machine
        return f"triton not importable ({type(e).__name__}: {e})"
    return None


def triton_error():
    """None when the triton backend can run here (a CUDA GPU, or TRITON_INTERPRET=1)."""
    err = _triton_error()
    if err:
        return err
    if not interpret() and not torch.cuda.is_available():
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU)"
    return None


def triton_devices():
    return frozenset({"cuda", "cpu"}) if interpret() else frozenset({"cuda"})


@functools.lru_cache(None)
def ext_error():
    """None when mmcore._C imported; else why (logged once, the torch backend serves)."""
    try:
        from mmcore import _C  # noqa: F401
    except Exception as e:
        msg = f"mmcore._C did not load ({type(e).__name__}: {e})"
        log.warning("%s; the 'torch' backend will serve instead", msg)
        return msg
    return None


def has_kernel(name: str, key: str) -> bool:
    """Whether mmcore._C registered op mmcore_C::<name> for dispatch key CPU / CUDA."""
    if ext_error():
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"mmcore_C::{name}", key)
    except RuntimeError:
        return False


def cpp_error(name: str):
    if ext_error():
        return ext_error()
    if not has_kernel(name, "CPU"):
        return f"mmcore._C has no CPU kernel mmcore_C::{name}"
    return None


def cuda_error(name: str):
    if ext_error():
        return ext_error()
    if not torch.cuda.is_available():
        return "no CUDA device"
    if not has_kernel(name, "CUDA"):
        return f"mmcore._C was built without CUDA kernel mmcore_C::{name}"
    return None
