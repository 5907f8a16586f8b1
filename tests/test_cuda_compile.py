"""csrc/cuda compiles for sm_80 and sm_90 with nvcc, without a GPU, and ptxas spills nothing.

benchmarks/nvcc_check.py compiles every .cu to a cubin per arch (the flags of torch's
CUDAExtension + -Xptxas -v) and syntax-checks the binding files with -DMMCORE_WITH_CUDA
against this torch's headers; here we check its report: no compile error, no spill, every
kernel instantiation present, and the decode kernel fits two blocks per SM (its occupancy
target: one block's tile loads while the other computes)."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import nvcc_check  # noqa: E402

# kernel -> instantiations per arch
EXPECTED = {"window_decode_kernel": 6, "window_decode_combine": 2, "sgmv_shrink_kernel": 8,
            "sgmv_expand_kernel": 8, "sgmv_plan_kernel": 1}


@pytest.mark.skipif(nvcc_check.nvcc() is None, reason="needs the CUDA toolkit (nvcc)")
def test_cuda_sources_compile_without_spills():
    res = nvcc_check.run((80, 90))
    for c in res["compiles"]:
        assert c["rc"] == 0, f"nvcc {c['file']} sm_{c['arch']}:\n{c.get('log')}"
    for h in res["host"]:
        assert h["rc"] == 0, f"binding {h['file']} with -DMMCORE_WITH_CUDA:\n{h['log']}"
    assert {h["file"] for h in res["host"]} == {"csrc/cuda/window_decode_op.cpp",
                                               "csrc/cuda/lora_sgmv_op.cpp"}
    for arch in (80, 90):
        ks = [k for k in res["kernels"] if k["arch"] == arch]
        counts = {n: sum(k["name"] == n for k in ks) for n in EXPECTED}
        assert counts == EXPECTED, f"sm_{arch}: {counts}"
        for k in ks:
            what = f"{k['kernel']} sm_{arch}"
            assert k["spill_stores"] == 0 and k["spill_loads"] == 0, \
                f"{what}: spills {k['spill_stores']} B stores / {k['spill_loads']} B loads"
            assert k["stack"] == 0, f"{what}: {k['stack']} B stack frame"
            if k["name"] == "window_decode_kernel":
                assert k["blocks_per_sm"] >= 2, f"{what}: {k['blocks_per_sm']} block(s) per SM"
    assert res["ok"]


def test_ptxas_parser():
    log = """ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'
ptxas info    : Function properties for _Z3fooPf
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 2048 bytes smem, 400 bytes cmem[0]
ptxas info    : Compiling entry function '_Z3barv' for 'sm_90'
ptxas info    : Function properties for _Z3barv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 0 barriers, 412 bytes cmem[0]
"""
    a, b = nvcc_check.parse_ptxas(log)
    assert (a["mangled"], a["arch"], a["regs"], a["stack"], a["spill_stores"], a["spill_loads"],
            a["smem"]) == ("_Z3fooPf", 90, 255, 8, 4, 12, 2048)
    assert (b["regs"], b["smem"], b["spill_stores"]) == (32, 0, 0)
    assert nvcc_check.blocks_per_sm(90, 141, 128, 81088) == 2
    assert nvcc_check.blocks_per_sm(80, 255, 128, 0) == 2
