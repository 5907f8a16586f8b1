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
    """None when mmcore._C imported; else why, with the command that builds it (logged
    once; the pure-PyTorch backends serve meanwhile)."""
    try:
        from mmcore import _C  # noqa: F401
    except Exception as e:
        msg = explain_ext_error(e)
        log.warning("%s\n  Until then the C++ kernels are off and the PyTorch backends "
                    "(torch, sdpa, composed) serve.", msg)
        return msg
    return None


def explain_ext_error(e: BaseException, pkg_dir: str | None = None) -> str:
    """What is wrong with mmcore._C (absent, built against another torch, or broken) and
    the exact command that builds it.  (Python's own message for an absent extension,
    "cannot import name '_C' from partially initialized module 'mmcore' (most likely due to
    a circular import)", points at a bug that is not there.)"""
    import glob
    import importlib.machinery

    pkg_dir = pkg_dir or os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
    root = os.path.dirname(pkg_dir)
    found = [p for sfx in importlib.machinery.EXTENSION_SUFFIXES
             for p in glob.glob(os.path.join(pkg_dir, "_C" + sfx))]
    if os.path.exists(os.path.join(root, "setup.py")):
        how = (f"build it against this torch ({torch.__version__}) with\n"
               f"    cd {root} && pip install --no-build-isolation --use-pep517 -e .\n"
               f"  (or ./bootstrap.sh, which also makes the venv)")
    else:
        how = (f"reinstall mmcore from its source tree against this torch "
               f"({torch.__version__}): pip install --no-build-isolation --use-pep517 <src>")
    first = (str(e).strip().splitlines() or [""])[0][:300]
    if not found:
        return f"mmcore._C is not built (no compiled extension in {pkg_dir}); {how}"
    if "undefined symbol" in first or "version" in first.lower():
        return (f"mmcore._C ({found[0]}) was built against another torch than this one "
                f"({type(e).__name__}: {first}); {how}")
    return f"mmcore._C ({found[0]}) could not be loaded ({type(e).__name__}: {first}); {how}"


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
