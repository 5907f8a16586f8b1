"""mmcore's CPU vector builds: which one runs, and the FMA peak probe (mmcore.cpu_info).

The kernels' build must follow ATen's CPU capability (ATEN_CPU_CAPABILITY included), and the
probe's peak must be a ceiling: torch's own fp32 GEMM may not pass it.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from mmcore.ops.backends import _loaders

pytestmark = pytest.mark.skipif(_loaders.ext_error() is not None,
                                reason="mmcore._C not built")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BITS = {"avx512": 512, "avx2": 256, "neon": 128, "default": 128}


def _expected_kernel_isa(aten: str, widest: str) -> str:
    if aten in ("AVX512", "AVX2"):
        return aten.lower()
    return "neon" if widest == "neon" else "default"


def test_kernel_isa_follows_aten():
    from mmcore.cpu_info import cpu_isa, kernel_isa

    assert cpu_isa() in _BITS
    assert kernel_isa() == _expected_kernel_isa(torch.backends.cpu.get_cpu_capability(),
                                                cpu_isa())


@pytest.mark.parametrize("forced", ["avx2", "default"])
def test_kernel_isa_follows_aten_cpu_capability_env(forced):
    """ATEN_CPU_CAPABILITY moves mmcore's kernels with ATen's (what CI's AVX2 run relies on)."""
    from mmcore.cpu_info import cpu_isa

    if forced == "avx2" and cpu_isa() not in ("avx2", "avx512"):
        pytest.skip("this CPU has no AVX2")  # ATen itself falls back: nothing to force
    code = ("import torch, mmcore.cpu_info as c; "
            "print(torch.backends.cpu.get_cpu_capability() + '|' + c.kernel_isa())")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": forced,
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    aten, ours = out.stdout.strip().splitlines()[-1].split("|")
    assert aten in ({"AVX2"} if forced == "avx2" else {"DEFAULT", "NO AVX"})
    assert ours == _expected_kernel_isa(aten, cpu_isa())


def test_fma_peak_fields():
    from mmcore.cpu_info import cpu_isa, fma_peak

    p = fma_peak(1)
    assert set(p) == {"isa", "vector_bits", "gflops_per_core", "gflops_all", "threads"}
    assert p["isa"] == cpu_isa() and p["vector_bits"] == _BITS[p["isa"]]
    assert p["threads"] == 1 and p["gflops_all"] == p["gflops_per_core"] > 0
    assert fma_peak(1) == p  # cached
    with pytest.raises(ValueError, match="threads"):
        fma_peak(0)


def _gemm_gflops(threads: int, n: int = 2048) -> float:
    """Best of three fp32 torch.mm n x n on `threads` threads, GFLOP/s."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(old)
    return 2 * n ** 3 / best / 1e9


def test_gemm_stays_below_fma_peak():
    """The probe is a ceiling: torch.mm (MKL / OpenBLAS at the widest ISA) must not pass it,
    on one thread or on all of torch's.  On a shared machine the probe may have been measured
    while another job held the core: a GEMM above it re-measures the probe before failing."""
    from mmcore import cpu_info

    threads = torch.get_num_threads()
    for t in sorted({1, threads}):
        gemm = _gemm_gflops(t)
        key = "gflops_per_core" if t == 1 else "gflops_all"
        peak = cpu_info.fma_peak(t)[key]
        if gemm > peak:
            cpu_info._probe.cache_clear()
            peak = cpu_info.fma_peak(t)[key]
        assert gemm <= peak, (f"torch.mm 2048^2 on {t} thread(s): {gemm:.1f} GFLOP/s above the "
                              f"{cpu_info.cpu_isa()} FMA peak {peak:.1f}: the probe is wrong")


@pytest.mark.parametrize("path", ["vec", "blas"])
def test_gemm_paths(path):
    """The tile products of the window / cross kernels through either path (MMCORE_CPU_GEMM:
    the vector build's register-blocked kernel, or the BLAS torch links) give oracle answers;
    the default picks one per CPU, so each run covers the other one here."""
    here = os.path.join(ROOT, "tests")
    code = (
        "import sys; sys.path.insert(0, %r)\n"
        "from kit import check_attention_case\n"
        "import test_window_cpu as w, test_cross_attention as c\n"
        "for name in ['GQA 6/2', 'global noncausal two key segments', 'bf16', 'fp16',\n"
        "             'non-contiguous', 'self-attn padding', 'dense over 2 chunks']:\n"
        "    check_attention_case('window_attention', 'cpu', w.EDGE[name])\n"
        "for name in ['mixed_lengths', 'gqa_3', 'noncontig_bf16', 'lk_zero', 'sk_1']:\n"
        "    check_attention_case('cross_attention', 'cpu', c.EDGE[name])\n"
        "print('ok')\n" % here)
    env = {**os.environ, "MMCORE_CPU_GEMM": path,
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr
