"""Backends that failed to compile or launch, per problem, and how such a failure is told.

Under ``backend="auto"`` a failure is logged once (logger "mmcore", WARNING), remembered for
the problem's failure key (tables.failure_key: op, device, dtype, head dim and the flags a
kernel is specialised on -- not the lengths) and the next backend serves; the failed one is
skipped for that key for the rest of the process.  A forced backend raises one BackendError
built by :func:`describe`.  Both name the op, the backend, the Triton kernel and config when
the failure happened inside one, the Triton version, and the error's first line.
"""
from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger("mmcore")

# (op, backend, failure key) -> one-line description of the first failure
_FAILED: dict = {}
_LOGGED: set = set()


def any_recorded() -> bool:
    return bool(_FAILED)


def failed(op: str, backend: str, fkey) -> str | None:
    """The recorded failure of ``backend`` for this failure key, or None."""
    return _FAILED.get((op, backend, fkey)) if _FAILED else None


def record(op: str, backend: str, method: str, fkey, exc: BaseException) -> str:
    """Remember that ``backend`` failed for ``fkey``; log it once per distinct error."""
    msg = describe(op, backend, method, exc)
    _FAILED[(op, backend, fkey)] = msg
    first = _first_line(exc)
    if (op, backend, method, first) not in _LOGGED:
        _LOGGED.add((op, backend, method, first))
        log.warning("%s; problem %s; the next backend serves it from now on", msg,
                    _fmt_key(fkey))
    return msg


def reset() -> None:
    """Forget every recorded failure (tests; after fixing a stack in the same process)."""
    _FAILED.clear()
    _LOGGED.clear()
    from . import registry

    registry.clear_cache()


def describe(op: str, backend: str, method: str, exc: BaseException, forced=False) -> str:
    """One line: op, backend, kernel/config when known, Triton version, the error's first
    line (and for a forced backend, what to do instead)."""
    kernel, config = _kernel_and_config(exc)
    where = ""
    if kernel:
        where = f" in Triton kernel {kernel}" + (f" (config {config})" if config else "")
    msg = (f"{op} {method}: backend {backend!r} failed{where} [{_versions()}]: "
           f"{type(exc).__name__}: {_first_line(exc)}")
    if forced:
        msg += "\n  (backend='auto' falls back to the next backend that can serve)"
    return msg


def _first_line(exc) -> str:
    text = str(exc).strip()
    for line in text.splitlines():
        if line.strip():
            return line.strip()[:300]
    return "(no message)"


def _versions() -> str:
    import torch

    v = f"torch {torch.__version__}"
    triton = sys.modules.get("triton")
    if triton is not None and getattr(triton, "__version__", None):
        v += f", triton {triton.__version__}"
    if os.environ.get("TRITON_INTERPRET") == "1":
        v += ", TRITON_INTERPRET=1"
    return v


def _kernel_and_config(exc):
    """The innermost Triton JITFunction and autotuner Config on the traceback, if any."""
    kernel = config = None
    tb = exc.__traceback__
    while tb is not None:
        loc = tb.tb_frame.f_locals
        for v in (loc.get("self"), loc.get("fn"), loc.get("kernel")):
            name = _jit_name(v)
            if name:
                kernel = name
        cfg = loc.get("config")
        if cfg is not None and type(cfg).__name__ == "Config" and hasattr(cfg, "kwargs"):
            config = ", ".join(f"{k}={val}" for k, val in cfg.kwargs.items())
            for k in ("num_warps", "num_stages"):
                if getattr(cfg, k, None) is not None:
                    config += f", {k}={getattr(cfg, k)}"
        tb = tb.tb_next
    return kernel, config


def _jit_name(v):
    if v is None:
        return None
    cls = type(v).__name__
    if cls in ("JITFunction", "InterpretedFunction", "Autotuner", "Heuristics"):
        fn = getattr(v, "fn", None)
        while fn is not None and not hasattr(fn, "__code__") and hasattr(fn, "fn"):
            fn = fn.fn
        return getattr(fn, "__name__", None)
    return None


def _fmt_key(fkey) -> str:
    return "(" + ", ".join(str(x) for x in fkey) + ")"
