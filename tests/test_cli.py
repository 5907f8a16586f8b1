"""`mmcore info` and `mmcore bench` run and say something sensible."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mmcore(*args, env=None):
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "mmcore", *args], cwd=ROOT, capture_output=True,
                          text=True, env=e, timeout=600)


def test_info_lists_every_backend_per_op():
    r = _mmcore("info")
    assert r.returncode == 0, r.stderr
    for op in ("window_attention", "cross_attention", "lora_linear"):
        assert f"{op}:" in r.stdout
    for b in ("torch", "cpu", "triton"):
        assert f"  {b} " in r.stdout
    assert "mmcore._C:" in r.stdout


def test_info_explains_a_refused_backend():
    r = _mmcore("info", env={"TRITON_INTERPRET": "0"})
    assert r.returncode == 0, r.stderr
    if "no CUDA device" in r.stdout:  # CPU machine: triton is refused with the reason
        assert "refused" in r.stdout


def test_bench_quick_writes_rows(tmp_path):
    out = tmp_path / "rows.jsonl"  # --smoke: the tiny case list of --quick's runner (CI time)
    r = _mmcore("bench", "--op", "lora_linear", "--smoke", "--device", "cpu", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "| op |" in r.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and all("median_ms" in x or "note" in x for x in rows)
    assert all(x["device"] == "cpu" and "torch" in x["versions"] for x in rows)
