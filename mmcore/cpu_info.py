"""This CPU's vector ISA and fp32 FMA peak, measured by mmcore._C (csrc/cpu/vec_dispatch.cpp).

    >>> from mmcore.cpu_info import cpu_isa, fma_peak
    >>> cpu_isa()                      # widest vector build this CPU runs
    'avx512'
    >>> fma_peak()                     # doctest: +SKIP
    {'isa': 'avx512', 'vector_bits': 512, 'gflops_per_core': ..., 'gflops_all': ..., 'threads': 2}

The probe runs independent chains of fused multiply-adds of ATen's Vectorized<float> in the
widest build the CPU runs (AVX-512, AVX2, NEON on aarch64; "default" is the compiler's
baseline, SSE2 on x86-64), enough chains to keep every FMA pipe busy, on one thread and on
`threads` threads started together.  It is a ceiling: no fp32 kernel, BLAS included, can pass
it (tests/test_cpu_isa.py checks torch.mm against it).  Results are cached per process.
"""
from __future__ import annotations

import functools

import torch

__all__ = ["cpu_isa", "kernel_isa", "fma_peak"]


def _ops():
    from mmcore.ops.backends import _loaders

    err = _loaders.ext_error()
    if err:
        raise RuntimeError(f"mmcore.cpu_info needs the C++ extension mmcore._C: {err}")
    return torch.ops.mmcore_C


def cpu_isa() -> str:
    """The widest vector ISA this CPU offers that mmcore has a build for: "avx512", "avx2",
    "neon" (aarch64) or "default"."""
    return _ops().cpu_isa()


def kernel_isa() -> str:
    """The vector build mmcore's CPU kernels run now: ATen's CPU capability
    (``ATEN_CPU_CAPABILITY=avx2`` moves both ATen and mmcore to "avx2")."""
    return _ops().cpu_capability()


@functools.lru_cache(None)
def _probe(threads: int) -> tuple:
    isa, bits, gflops = _ops().fma_peak(threads)
    return str(isa), int(bits), float(gflops)


def fma_peak(threads: int | None = None) -> dict:
    """fp32 FMA peak of this CPU: dict(isa, vector_bits, gflops_per_core, gflops_all,
    threads).  threads: how many threads `gflops_all` uses (default: torch.get_num_threads()).
    Takes under a second per distinct `threads` the first time, then comes from a cache."""
    if threads is None:
        threads = torch.get_num_threads()
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ValueError(f"threads: must be a positive int, got {threads!r}")
    isa, bits, per_core = _probe(1)
    every = per_core if threads == 1 else _probe(threads)[2]
    return dict(isa=isa, vector_bits=bits, gflops_per_core=per_core, gflops_all=every,
                threads=threads)
