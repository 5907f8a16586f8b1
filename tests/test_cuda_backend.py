"""The `cuda` backend's declarations: registered for window_attention and lora_linear, never
picked by `auto` until measured, refusals that say why, and `mmcore info` listing it."""
import subprocess
import sys

import pytest
import torch

import mmcore
from mmcore.ops import registry
from mmcore.ops.backends import cuda as cuda_backend


@pytest.mark.parametrize("op", ["window_attention", "lora_linear"])
def test_declared_forward_only_and_not_auto(op):
    impl = registry.get(op, "cuda")
    assert impl.devices == frozenset({"cuda"})
    assert impl.auto_devices == frozenset()  # not measured: auto must not pick it
    assert impl.dtypes == frozenset({torch.float16, torch.bfloat16})
    assert not impl.supports_backward


def test_auto_never_picks_cuda_even_when_available(monkeypatch):
    impl = registry.get("window_attention", "cuda")
    monkeypatch.setitem(impl.__dict__, "_why", None)  # pretend it loaded
    monkeypatch.setattr(impl, "devices", frozenset({"cuda", "cpu"}))
    p = registry.Problem("window_attention", "cpu", torch.bfloat16, head_dim=64,
                         extra={"Sq": 1, "Sk": 100, "window": (-1, -1)})
    assert registry.select("window_attention", p, "auto").backend != "cuda"
    assert registry.select("window_attention", p, "cuda").backend == "cuda"


def test_refusals_name_the_limit(monkeypatch):
    impl = registry.get("window_attention", "cuda")
    monkeypatch.setitem(impl.__dict__, "_why", None)
    p = registry.Problem("window_attention", "cuda", torch.bfloat16, head_dim=36,
                         extra={"Sq": 17, "Sk": 100, "window": (-1, -1)})
    why = impl.refuse(p)
    assert any("Sq = 17 > 16" in w for w in why) and any("multiple of 8" in w for w in why)
    p = registry.Problem("window_attention", "cuda", torch.bfloat16, head_dim=64,
                         needs_grad=True, extra={"Sq": 1})
    assert impl.refuse(p) == ["no backward"]
    lora = registry.get("lora_linear", "cuda")
    monkeypatch.setitem(lora.__dict__, "_why", None)
    p = registry.Problem("lora_linear", "cuda", torch.float16, head_dim=4096, rank=16,
                         adapters=5000, extra={"M": 8, "N": 4097})
    why = lora.refuse(p)
    assert any("N = 4097 is odd" in w for w in why) and any("5000 adapters" in w for w in why)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_forcing_cuda_without_gpu_says_why():
    q = torch.randn(1, 2, 1, 16, dtype=torch.bfloat16)
    with pytest.raises(registry.BackendError, match=r"cuda: not available: .*(CPU build|no CUDA)"):
        mmcore.window_attention(q, q, q, backend="cuda")
    assert cuda_backend.cuda_error("window_decode")


def test_info_lists_cuda_backend():
    out = subprocess.run([sys.executable, "-m", "mmcore", "info"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = [ln for ln in out.stdout.splitlines() if ln.strip().startswith("cuda ")]
    assert len(lines) == 2, out.stdout  # window_attention and lora_linear
    if not torch.cuda.is_available():
        assert all("refused" in ln and "(" in ln for ln in lines), lines
