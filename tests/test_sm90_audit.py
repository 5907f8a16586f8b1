"""The hot Triton kernels compile for Hopper (sm_90) without register spills.

No GPU needed: benchmarks/sm90_audit.py compiles each launch with Triton's own ptxas
(in a subprocess, since this process runs Triton under the interpreter) and reads the
registers, the local-memory stack (spills) and the shared memory of the result.  The
configs checked are the ones used without autotuning (the first kept after pruning).
Before this check, the LoRA kernel's epilogue kept a second (128, 128) fp32 tile and spilled
400-680 bytes per thread in every 128x128 / 128x256 config."""
import json
import os
import platform
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMEM_LIMIT = 227 * 1024  # bytes of shared memory one block may have on an H100 / H200
HOT = {"_lora_mm_kernel", "_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel",
       "_cross_fwd_kernel"}


def _ptxas():
    try:
        import triton.backends.nvidia as nv
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas")
    return path if os.path.exists(path) else None


@pytest.mark.skipif(platform.machine() != "x86_64" or _ptxas() is None,
                    reason="Triton's bundled ptxas (x86-64 wheels) is needed to compile for sm_90")
def test_hot_kernels_compile_for_sm90_without_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    out = tmp_path / "sm90.json"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "sm90_audit.py"),
                        "--smoke", "--json", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    reports = json.loads(out.read_text())
    assert HOT <= {r["kernel"] for r in reports}, reports
    for r in reports:
        what = f"{r.get('case')} {r['kernel']} {r.get('config')} w{r.get('num_warps')}"
        assert "error" not in r, f"{what}: {r.get('error')}"
        assert r["stack"] == 0, f"{what}: {r['stack']} bytes of register spills per thread"
        assert r["smem"] <= SMEM_LIMIT, f"{what}: {r['smem']} bytes of shared memory"
        if r["kernel"] in HOT:  # bf16 tiles: Hopper's tensor-core instructions
            assert r["wgmma"] > 0, f"{what}: no wgmma in the PTX"
