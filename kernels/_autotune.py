"""Autotuning shared by the Triton kernels: a tuner that skips configs which fail to compile,
the on/off switch, and the shared-memory limit the prunes size tiles against.

Triton's own Autotuner skips a config only when it raises OutOfResources,
CompileTimeAssertionFailure or PTXASError; any other compile failure (triton 3.6's
software pipeliner raised ``RuntimeError: PassManager::run failed`` on some kernels) ends the
whole launch.  ``SafeAutotuner`` treats every non-CUDA error of a config as "this config does
not compile here": it logs one line (kernel, config, Triton version, the error's first line),
remembers the config as bad for that specialisation, and goes on with the next one.  Only
when no config is left does the launch raise, naming every config tried.

``MMCORE_TRITON_AUTOTUNE=0`` (or the older ``MMCORE_AUTOTUNE=0``): no benchmarking; the
first config the prune keeps (the one each kernel lists first as its default) is used, and
the next one when it fails to compile.  Nothing here imports the rest of mmcore.
"""
from __future__ import annotations

import logging
import os

import torch
import triton
from triton.runtime.autotuner import Autotuner

log = logging.getLogger("mmcore.kernels")

# shared memory one block may use, by compute capability (bytes); the CUDA driver's figure is
# used when it can be read
_SMEM_BY_CC = {(9, 0): 227 * 1024, (10, 0): 227 * 1024, (8, 0): 163 * 1024,
               (8, 7): 163 * 1024, (8, 6): 99 * 1024, (8, 9): 99 * 1024, (12, 0): 99 * 1024}
# without a GPU (the offline compile audit collects launches on CPU tensors) the target being
# audited; benchmarks/sm90_audit.py sets both per target
CPU_SMEM_LIMIT = 227 * 1024
CPU_ARCH = 90
SMEM_MARGIN = 3 * 1024  # the prunes' estimates are rough: keep a little back


def enabled() -> bool:
    """Whether launches benchmark their configs (MMCORE_TRITON_AUTOTUNE, default on)."""
    for var in ("MMCORE_TRITON_AUTOTUNE", "MMCORE_AUTOTUNE"):
        v = os.environ.get(var)
        if v is not None:
            return v != "0"
    return True


_smem_cache: dict = {}


def smem_limit(device) -> int:
    """Bytes of shared memory one block may have on `device` (CPU: CPU_SMEM_LIMIT)."""
    device = torch.device(device)
    if device.type != "cuda":
        return CPU_SMEM_LIMIT
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _smem_cache:
        try:
            from triton.runtime import driver
            _smem_cache[idx] = int(driver.active.utils.get_device_properties(idx)["max_shared_mem"])
        except Exception:  # pragma: no cover - depends on the driver
            cc = torch.cuda.get_device_capability(idx)
            _smem_cache[idx] = _SMEM_BY_CC.get(cc, 99 * 1024)
    return _smem_cache[idx]


def smem_budget(device) -> int:
    return smem_limit(device) - SMEM_MARGIN


def arch(device) -> int:
    """Compute capability as 10 * major + minor (90 for an H100); CPU: CPU_ARCH."""
    device = torch.device(device)
    if device.type != "cuda":
        return CPU_ARCH
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def config_class(dtype, device) -> str:
    """Which config list a kernel tunes from: "fp32" (FMA, no tensor cores), "sm90" (16-bit on
    Hopper and newer: wgmma) or "sm80" (16-bit on Ampere / Ada: mma.sync, which keeps more in
    registers and so needs smaller tiles)."""
    if dtype == torch.float32:
        return "fp32"
    return "sm90" if arch(device) >= 90 else "sm80"


def _cuda_failure(e: BaseException) -> bool:
    """A CUDA runtime error (illegal address, launch failure): not a compile problem, and the
    context is unusable afterwards -- never retried with another config."""
    accel = getattr(torch, "AcceleratorError", None)
    if accel is not None and isinstance(e, accel):
        return True
    msg = str(e)
    return "[CUDA]" in msg or "CUDA error" in msg or "cudaError" in msg


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    # MLIR failures print the whole module first; the useful line is the last one
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"[:240]


def config_str(c) -> str:
    kw = ", ".join(f"{k}={v}" for k, v in c.kwargs.items())
    return f"{kw}, num_warps={c.num_warps}, num_stages={c.num_stages}"


class NoConfigCompiles(RuntimeError):
    """Every config of a launch failed to compile (or none was left after pruning)."""


class SafeAutotuner(Autotuner):
    """triton.autotune that skips configs failing to compile (see the module docstring).

    prune(configs, named_args, **kwargs) -> configs that fit, the default first."""

    def __init__(self, fn, configs, key, prune=None):
        super().__init__(fn, fn.arg_names, configs, key, None, None,
                         prune_configs_by={"early_config_prune": prune} if prune else None)
        self.bad: dict = {}  # specialisation -> {config_str: first line of its error}
        self._spec = None

    @property
    def name(self):
        fn = self.fn
        while not hasattr(fn, "arg_names") or isinstance(fn, Autotuner):
            fn = fn.fn
        return fn.__name__

    def _spec_key(self, args, kwargs):
        """What a compile depends on besides the config: dtypes and constexpr arguments."""
        parts = []
        for a in list(args) + [kwargs[k] for k in sorted(kwargs)]:
            if isinstance(a, torch.Tensor):
                parts.append(str(a.dtype))
        parts += [(k, v) for k, v in sorted(kwargs.items())
                  if isinstance(v, (bool, int, float, str)) or v is None]
        return tuple(parts)

    def _mark_bad(self, config, e):
        bad = self.bad.setdefault(self._spec, {})
        cs = config_str(config)
        if cs not in bad:
            bad[cs] = _first_line(e)
            log.warning("mmcore: Triton kernel %s, config (%s) failed under triton %s: %s; "
                        "trying the next config", self.name, cs, triton.__version__, bad[cs])

    def prune_configs(self, kwargs):
        configs = super().prune_configs(kwargs)
        bad = self.bad.get(self._spec, {})
        ok = [c for c in configs if config_str(c) not in bad]
        if not ok:
            tried = "; ".join(f"({c}): {err}" for c, err in bad.items()) or "none kept"
            raise NoConfigCompiles(f"Triton kernel {self.name}: no config compiles under "
                                   f"triton {triton.__version__}: {tried}")
        return ok if enabled() else ok[:1]

    def _bench(self, *args, config, **meta):
        try:
            return super()._bench(*args, config=config, **meta)
        except Exception as e:
            if _cuda_failure(e) or isinstance(e, NoConfigCompiles):
                raise
            self._mark_bad(config, e)
            return [float("inf")] * 3

    def run(self, *args, **kwargs):
        self._spec = self._spec_key(args, kwargs)
        while True:
            self.best_config = None  # set by Autotuner.run right before the launch
            try:
                return super().run(*args, **kwargs)
            except NoConfigCompiles:
                raise
            except Exception as e:
                cfg = self.best_config
                if _cuda_failure(e) or cfg is None or len(self.configs) == 1:
                    raise
                if config_str(cfg) in self.bad.get(self._spec, {}):
                    raise  # known bad and still chosen: nothing left to try
                self._mark_bad(cfg, e)
                # forget the choices that used it; the next pass re-prunes without it
                self.cache = {k: c for k, c in self.cache.items() if c is not cfg}
                self.nargs = None


def autotune(configs, key, prune=None):
    """Decorator: SafeAutotuner over `configs`, re-tuned per value of the `key` arguments
    (and the dtypes of the tensor arguments)."""
    return lambda fn: SafeAutotuner(fn, configs, key, prune)
