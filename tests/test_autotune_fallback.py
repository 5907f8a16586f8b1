"""One config that fails to compile cannot fail a launch (kernels/_autotune.py).

Issue 11: Triton's autotuner skips a config only when it raises OutOfResources,
CompileTimeAssertionFailure or PTXASError; triton 3.6's "PassManager::run failed" is a
RuntimeError, so the first bad config ended the whole launch.  SafeAutotuner skips any
non-CUDA failure of a config, logs one line (kernel, config, Triton version, error), and goes
on; only when no config is left does it raise, naming each one.  Checked here under the
interpreter with a kernel whose first config raises (a RuntimeError, as 3.6's pipeliner did),
autotuning off as in the tests (the first config kept is the one used)."""
import logging

import pytest
import torch
import triton
import triton.language as tl

from mmcore.kernels import _autotune

BAD = 32  # the BLOCK whose "compile" fails


@triton.jit
def _copy_kernel(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs, mask=offs < n) * 2, mask=offs < n)


def _tuner(blocks):
    configs = [triton.Config({"BLOCK": b}, num_warps=1) for b in blocks]
    t = _autotune.autotune(configs, ["n"])(_copy_kernel)
    real = t.fn.run

    def run(*args, **kwargs):  # the compile of BLOCK == BAD fails as 3.6's pipeliner did
        if kwargs.get("BLOCK") == BAD:
            raise RuntimeError("PassManager::run failed")
        return real(*args, **kwargs)

    t.fn = type("F", (), {"run": staticmethod(run), "arg_names": t.fn.arg_names,
                          "__name__": "_copy_kernel", "fn": t.fn})()
    return t


def test_bad_config_is_skipped_with_a_log_line(interpret, monkeypatch, caplog):
    monkeypatch.setenv("MMCORE_TRITON_AUTOTUNE", "0")
    t = _tuner([BAD, 16])
    x = torch.randn(100, device=interpret)
    y = torch.empty_like(x)
    with caplog.at_level(logging.WARNING, logger="mmcore.kernels"):
        t[lambda m: (triton.cdiv(100, m["BLOCK"]),)](x, y, 100)
    torch.testing.assert_close(y, 2 * x)
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1, msgs
    assert "BLOCK=32" in msgs[0] and triton.__version__ in msgs[0]
    assert "PassManager::run failed" in msgs[0]
    # remembered: the next launch goes straight to the good config, no second log line
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mmcore.kernels"):
        t[lambda m: (triton.cdiv(100, m["BLOCK"]),)](x, y, 100)
    assert not caplog.records


def test_no_config_compiles_names_each(interpret, monkeypatch):
    monkeypatch.setenv("MMCORE_TRITON_AUTOTUNE", "0")
    t = _tuner([BAD, BAD])
    t.configs = [triton.Config({"BLOCK": BAD}, num_warps=1),
                 triton.Config({"BLOCK": BAD}, num_warps=2)]
    x = torch.randn(10, device=interpret)
    with pytest.raises(_autotune.NoConfigCompiles) as e:
        t[(1,)](x, torch.empty_like(x), 10)
    msg = str(e.value)
    assert "_copy_kernel" in msg and "num_warps=1" in msg and "num_warps=2" in msg


def test_cuda_errors_are_not_skipped():
    assert _autotune._cuda_failure(RuntimeError("Triton Error [CUDA]: an illegal memory access"))
    assert not _autotune._cuda_failure(RuntimeError("PassManager::run failed"))


def test_autotune_switch(monkeypatch):
    monkeypatch.delenv("MMCORE_AUTOTUNE", raising=False)
    monkeypatch.setenv("MMCORE_TRITON_AUTOTUNE", "0")
    assert not _autotune.enabled()
    monkeypatch.delenv("MMCORE_TRITON_AUTOTUNE")
    monkeypatch.setenv("MMCORE_AUTOTUNE", "0")  # the older name still works
    assert not _autotune.enabled()
    monkeypatch.delenv("MMCORE_AUTOTUNE")
    assert _autotune.enabled()
