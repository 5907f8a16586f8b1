"""The op contract: validation errors, dispatch, torch.library registration, torch.compile."""
import os
import subprocess
import sys

import pytest
import torch

import mmcore
from mmcore.ops import BackendError, registry

R = torch.randn


def qkv(B=2, Hq=4, Hkv=2, Sq=9, Sk=11, D=16, dtype=torch.float32, rg=False):
    return (R(B, Hq, Sq, D, dtype=dtype).requires_grad_(rg), R(B, Hkv, Sk, D, dtype=dtype).requires_grad_(rg),
            R(B, Hkv, Sk, D, dtype=dtype).requires_grad_(rg))


# ------------------------------------------------------------------ bad input names the argument
@pytest.mark.parametrize("fn", [mmcore.window_attention, mmcore.cross_attention])
def test_attention_bad_inputs(fn):
    q, k, v = qkv()
    with pytest.raises(ValueError, match="q must have 4 dims"):
        fn(q[0], k, v)
    with pytest.raises(TypeError, match="k has dtype torch.float16 but q has torch.float32"):
        fn(q, k.half(), v)
    with pytest.raises(ValueError, match="Hq % Hkv must be 0"):
        fn(R(2, 3, 9, 16), k, v)
    with pytest.raises(TypeError, match="q must be float16, bfloat16, float32 or float64"):
        fn(q.int(), k.int(), v.int())
    with pytest.raises(ValueError, match="head dim of k"):
        fn(q, R(2, 2, 11, 8), R(2, 2, 11, 8))
    with pytest.raises(ValueError, match="seqlens_k must have shape \\(2,\\)"):
        fn(q, k, v, seqlens_k=torch.tensor([3]))
    with pytest.raises(TypeError, match="seqlens_q must be an int32/int64 tensor"):
        fn(q, k, v, seqlens_q=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"seqlens_k values must lie in \[0, 11\]"):
        fn(q, k, v, seqlens_k=torch.tensor([3, 12]))
    with pytest.raises(ValueError, match="seqlens_q values must lie"):
        fn(q, k, v, seqlens_q=torch.tensor([-1, 2]))
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        fn(q.tolist(), k, v)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device mismatch needs two devices")
def test_device_mismatch_cuda():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="k is on cuda"):
        mmcore.window_attention(q, k.cuda(), v)


def test_device_mismatch_meta():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="v is on meta:?0? but q is on cpu"):
        mmcore.window_attention(q, k, v.to("meta"))


def test_window_bad_args():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"window\[0\] \(left\) must be >= -1"):
        mmcore.window_attention(q, k, v, window=(-2, 3))
    with pytest.raises(ValueError, match=r"window\[1\] \(right\) must be >= -1"):
        mmcore.window_attention(q, k, v, window=(2, -5))
    with pytest.raises(ValueError, match="window must be None or a"):
        mmcore.window_attention(q, k, v, window=4)
    with pytest.raises(ValueError, match=r"global_tokens \(12\) must be <= Sk \(11\)"):
        mmcore.window_attention(q, k, v, global_tokens=12)
    with pytest.raises(ValueError, match="global_tokens must be an int >= 0"):
        mmcore.window_attention(q, k, v, global_tokens=-1)
    with pytest.raises(ValueError, match="scale must be finite"):
        mmcore.window_attention(q, k, v, scale=float("nan"))


def test_lora_bad_inputs():
    x, w = R(5, 8), R(6, 8)
    a, b = R(2, 8), R(6, 2)
    with pytest.raises(ValueError, match="weight must have shape \\(N, 8\\)"):
        mmcore.lora_linear(x, R(6, 7), None, a, b, 1.0)
    with pytest.raises(ValueError, match="lora_a must have shape"):
        mmcore.lora_linear(x, w, None, R(2, 7), b, 1.0)
    with pytest.raises(ValueError, match="lora_b must have shape \\(6, 2\\)"):
        mmcore.lora_linear(x, w, None, a, R(6, 3), 1.0)
    with pytest.raises(ValueError, match="bias must have shape \\(6,\\)"):
        mmcore.lora_linear(x, w, R(5), a, b, 1.0)
    with pytest.raises(TypeError, match="lora_b has dtype"):
        mmcore.lora_linear(x, w, None, a, b.double(), 1.0)
    A3, B3 = R(3, 2, 8), R(3, 6, 2)
    with pytest.raises(ValueError, match=r"adapter_ids must lie in \[-1, 3\)"):
        mmcore.lora_linear(x, w, None, A3, B3, torch.ones(3), adapter_ids=torch.tensor([0, 1, 2, 3, 0]))
    with pytest.raises(ValueError, match=r"adapter_ids must lie in \[-1, 3\)"):
        mmcore.lora_linear(x, w, None, A3, B3, torch.ones(3), adapter_ids=torch.tensor([0, -2, 2, 1, 0]))
    with pytest.raises(ValueError, match="adapter_ids must have shape"):
        mmcore.lora_linear(x, w, None, A3, B3, torch.ones(3), adapter_ids=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="scaling must be a float or a tensor of shape \\(3,\\)"):
        mmcore.lora_linear(x, w, None, A3, B3, torch.ones(2))
    with pytest.raises(ValueError, match="both be single"):
        mmcore.lora_linear(x, w, None, A3, b, 1.0)


# ------------------------------------------------------------------ dispatch
def test_forced_backend_error_lists_every_backend():
    q, k, v = qkv(D=16, dtype=torch.float64)
    with pytest.raises(BackendError) as e:
        mmcore.window_attention(q, k, v, backend="triton")
    msg = str(e.value)
    for b in ("triton", "cuda", "cpu", "torch"):
        assert f"  {b}:" in msg
    assert "backend 'triton' cannot serve" in msg and "dtype=torch.float64" in msg


def test_unknown_backend():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        mmcore.window_attention(q, k, v, backend="fast")


def test_env_backend(monkeypatch):
    q, k, v = qkv()
    monkeypatch.setenv("MMCORE_BACKEND", "torch")
    p = registry.Problem("window_attention", "cpu", torch.float32, head_dim=16)
    assert registry.select("window_attention", p).backend == "torch"
    out = mmcore.window_attention(q, k, v, window=(2, 2))
    monkeypatch.setenv("MMCORE_BACKEND", "auto")
    torch.testing.assert_close(out, mmcore.window_attention(q, k, v, window=(2, 2)),
                               atol=1e-5, rtol=1e-5)


def test_auto_never_picks_interpreted_triton():
    for op in registry.OPS:
        p = registry.Problem(op, "cpu", torch.float32, head_dim=16, rank=4)
        assert registry.select(op, p).backend != "triton"


def test_registry_declarations_are_complete():
    for op in registry.OPS:
        impls = registry.implementations(op)
        assert "torch" in [i.backend for i in impls]
        for i in impls:
            assert i.dtypes and i.devices and callable(i.forward)


# ------------------------------------------------------------------ torch.library: opcheck, compile
def _opcheck(op, args):
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration",
                                                "test_faketensor", "test_aot_dispatch_dynamic"))


def test_opcheck_window():
    q, k, v = qkv(rg=True)
    sl = torch.tensor([11, 4])
    _opcheck(torch.ops.mmcore.window_attention_fwd.default,
             (q, k, v, None, sl, 3, 1, False, 2, 0.25, "torch"))
    _opcheck(torch.ops.mmcore.window_attention_fwd.default,
             (q, k, v, None, None, -1, 0, True, 0, 0.25, "torch"))


def test_opcheck_cross():
    q, k, v = qkv(rg=True)
    _opcheck(torch.ops.mmcore.cross_attention_fwd.default,
             (q, k, v, torch.tensor([9, 3]), torch.tensor([0, 7]), 0.25, "torch"))


def test_opcheck_lora():
    x = R(7, 8, requires_grad=True)
    a = R(2, 3, 8, requires_grad=True)
    b = R(2, 6, 3, requires_grad=True)
    _opcheck(torch.ops.mmcore.lora_linear_fwd.default,
             (x, R(6, 8), R(6), a, b, torch.tensor([0.5, 2.0]), torch.tensor([0, 1, -1, 1, 0, 0, 1]),
              "torch"))
    _opcheck(torch.ops.mmcore.lora_linear_fwd.default,
             (x, R(6, 8), None, a[:1], b[:1], torch.tensor([0.5]), None, "torch"))


def test_torch_compile_fullgraph():
    q, k, v = qkv(rg=True)
    x, w = R(3, 5, 8, requires_grad=True), R(6, 8)
    a, b = R(2, 8, requires_grad=True), R(6, 2, requires_grad=True)
    sl = torch.tensor([11, 6])

    def f(q, k, v, x, a, b):
        o1 = mmcore.window_attention(q, k, v, window=(3, 0), causal=True, global_tokens=1,
                                     seqlens_k=sl)
        o2 = mmcore.cross_attention(q, k, v, seqlens_k=sl)
        y = mmcore.lora_linear(x, w, None, a, b, 0.5)
        return o1.sum() + o2.square().sum() + y.sum()

    eager = f(q, k, v, x, a, b)
    ge = torch.autograd.grad(eager, (q, k, v, x, a, b))
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v, x, a, b)
    gc = torch.autograd.grad(out, (q, k, v, x, a, b))
    torch.testing.assert_close(out, eager)
    for g1, g2 in zip(gc, ge):
        torch.testing.assert_close(g1, g2)


# ------------------------------------------------------------------ edge semantics
def test_lse_and_zero_rows():
    q, k, v = qkv(rg=True)
    out, lse = mmcore.window_attention(q, k, v, seqlens_k=torch.tensor([0, 5]),
                                       return_lse=True, backend="torch")
    assert torch.all(out[0] == 0) and torch.all(torch.isinf(lse[0]))
    out.square().sum().backward()
    assert torch.all(k.grad[0] == 0) and torch.all(q.grad[0] == 0)
    assert not any(torch.isnan(t.grad).any() for t in (q, k, v))


def test_flash_layout_views():
    """A flash-attn (B, S, H, D) tensor passes as a transposed view, no copy needed."""
    qf, kf, vf = R(2, 9, 4, 16), R(2, 11, 2, 16), R(2, 11, 2, 16)
    out = mmcore.window_attention(qf.transpose(1, 2), kf.transpose(1, 2), vf.transpose(1, 2),
                                  window=(2, 2), backend="torch")
    ref = mmcore.window_attention(qf.transpose(1, 2).contiguous(), kf.transpose(1, 2).contiguous(),
                                  vf.transpose(1, 2).contiguous(), window=(2, 2), backend="torch")
    torch.testing.assert_close(out, ref)


# ------------------------------------------------------------------ memory O(N) (torch backend)
_MEM = r"""
import sys, torch
sys.path.insert(0, "benchmarks")
import harness, mmcore
N = int(sys.argv[1])
q = torch.randn(1, 2, N, 32); k = torch.randn(1, 2, N, 32); v = torch.randn(1, 2, N, 32)
f = lambda: mmcore.window_attention(q, k, v, window=(64, 64), global_tokens=4, backend="torch")
f()
print(harness.peak_memory(f, "cpu"))
"""


def test_window_memory_linear_in_n():
    """Peak memory beyond inputs grows linearly with N (a dense mask would grow 16x for 4x N)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    peaks = []
    for n in (8192, 32768):
        r = subprocess.run([sys.executable, "-c", _MEM, str(n)], cwd=root, capture_output=True,
                           text=True, check=True)
        peaks.append(int(r.stdout.strip().splitlines()[-1]))
    out_bytes = 2 * 32768 * 32 * 4
    # 4x the length: at most ~4x the memory (+ slack for allocator noise), and far below N^2
    assert peaks[1] <= 4 * peaks[0] + 8 * 2 ** 20, peaks
    assert peaks[1] < 8 * out_bytes + 16 * 2 ** 20, (peaks, out_bytes)
