"""The `cpu` backend of window_attention (csrc/cpu/window_attention.cpp) against the float64
oracle: >= 200 random cases (fwd + grads), named edge cases, determinism, bad inputs."""
import pytest
import torch

import mmcore
from kit import attention_cases, check_attention_case, make_attention_inputs
from mmcore.ops import registry
from mmcore.ops.backends import _loaders

N_CASES = 200

pytestmark = pytest.mark.skipif(
    _loaders.cpp_error("window_attention_fwd") is not None,
    reason=f"mmcore._C not built: {_loaders.cpp_error('window_attention_fwd')}")


def case(**kw):
    c = dict(B=1, Hq=2, Hkv=2, Sq=33, Sk=33, D=32, dtype=torch.float32, noncontig=False,
             scale=None, window=None, causal=False, G=0, seqlens_q=None, seqlens_k=None)
    c.update(kw)
    return c


@pytest.mark.parametrize("i", range(N_CASES))
def test_random(i):
    c = attention_cases("window_attention", "cpu", 1, seed=7000 + i, max_s=100)[0]
    check_attention_case("window_attention", "cpu", c, seed=i)


EDGE = {
    "S=1": case(Sq=1, Sk=1, window=(3, 3)),
    "S=113 window": case(Sq=113, Sk=113, window=(16, 7), D=40),
    "Sq<Sk decode-like": case(Sq=5, Sk=113, window=(20, 0), causal=True),
    "Sq>Sk (rows with p<0)": case(Sq=113, Sk=40, window=(8, 8)),
    "Sq>Sk causal (masked rows)": case(Sq=90, Sk=31, window=(4, 0), causal=True, B=2,
                                       seqlens_k=torch.tensor([31, 0])),
    "GQA 6/2": case(Hq=6, Hkv=2, Sq=70, Sk=70, window=(9, 9)),
    "MQA 4/1 global": case(Hq=4, Hkv=1, Sq=65, Sk=65, window=(5, 5), G=3),
    "global + causal": case(Sq=100, Sk=100, window=(10, 0), causal=True, G=5),
    "global noncausal two key segments": case(Sq=150, Sk=150, window=(6, 6), G=4),
    "global > window reach": case(Sq=80, Sk=120, window=(2, 1), G=40),
    "G = Sk": case(Sq=30, Sk=30, window=(1, 1), G=30),
    "left unbounded": case(Sq=70, Sk=90, window=(-1, 3)),
    "right unbounded": case(Sq=70, Sk=90, window=(3, -1)),
    "window=(0,0)": case(Sq=64, Sk=64, window=(0, 0)),
    "unbounded (dense)": case(Sq=65, Sk=130, window=None),
    "fully masked lengths": case(B=3, Sq=40, Sk=40, window=(4, 4),
                                 seqlens_q=torch.tensor([0, 40, 17]),
                                 seqlens_k=torch.tensor([0, 0, 23])),
    "self-attn padding": case(B=3, Sq=77, Sk=77, window=(8, 8), G=2,
                              seqlens_q=torch.tensor([77, 30, 1]),
                              seqlens_k=torch.tensor([77, 30, 1])),
    "bf16": case(dtype=torch.bfloat16, Sq=97, Sk=97, window=(12, 12), G=2),
    "fp16": case(dtype=torch.float16, Sq=97, Sk=97, window=(12, 3), causal=True, G=2),
    "fp64": case(dtype=torch.float64, Sq=50, Sk=60, window=(5, 5), G=1),
    "non-contiguous": case(noncontig=True, Hq=4, Hkv=2, Sq=67, Sk=67, window=(7, 7), G=1),
    "scale": case(scale=0.3, Sq=40, Sk=40, window=(5, 5)),
    # more keys than one chunk (1024): the online softmax across chunks
    "global rows over 2 chunks": case(Hq=1, Hkv=1, Sq=1300, Sk=1300, window=(2, 2), G=3, D=16),
    "dense over 2 chunks": case(Hq=1, Hkv=1, Sq=9, Sk=1500, window=None, D=16),
}


@pytest.mark.parametrize("name", list(EDGE))
def test_edge(name):
    check_attention_case("window_attention", "cpu", EDGE[name], seed=hash(name) % 1000)


@pytest.mark.parametrize("D,dtype", [(40, torch.float32), (72, torch.float32),
                                     (80, torch.float16), (96, torch.float32),
                                     (128, torch.float32), (256, torch.float32),
                                     (256, torch.bfloat16)])
def test_head_dims(D, dtype):
    c = case(D=D, Hq=2, Hkv=1, Sq=113, Sk=113, window=(16, 16), G=2, dtype=dtype)
    check_attention_case("window_attention", "cpu", c, seed=D)


def _run(c, seed=0):
    q, k, v, dout = make_attention_inputs(c, "cpu", seed=seed)
    out = mmcore.window_attention(q, k, v, window=c["window"], causal=c["causal"],
                                  global_tokens=c["G"], seqlens_q=c["seqlens_q"],
                                  seqlens_k=c["seqlens_k"], backend="cpu")
    return (out, *torch.autograd.grad(out, (q, k, v), dout))


def test_deterministic_across_runs_and_threads():
    """Backward is a pure function of its inputs: bitwise equal across runs and thread counts
    (dK/dV are summed in a fixed order over query heads and query rows)."""
    c = case(Hq=4, Hkv=2, Sq=200, Sk=200, window=(20, 20), G=3, B=2,
             seqlens_k=torch.tensor([200, 150]), seqlens_q=torch.tensor([200, 150]))
    first = _run(c)
    nt = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            for a, b in zip(first, _run(c)):
                assert torch.equal(a, b)
    finally:
        torch.set_num_threads(nt)


def test_auto_picks_cpu():
    p = registry.Problem("window_attention", "cpu", torch.float32, head_dim=64)
    assert registry.select("window_attention", p).backend == "cpu"


def test_matches_torch_backend_lse():
    c = case(B=2, Hq=4, Hkv=2, Sq=150, Sk=150, window=(10, 0), causal=True, G=2)
    q, k, v, _ = make_attention_inputs(c, "cpu", requires_grad=False)
    kw = dict(window=c["window"], causal=True, global_tokens=2, return_lse=True)
    o1, l1 = mmcore.window_attention(q, k, v, backend="cpu", **kw)
    o2, l2 = mmcore.window_attention(q, k, v, backend="torch", **kw)
    torch.testing.assert_close(o1, o2, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(l1, l2, atol=2e-5, rtol=1e-4)


def test_opcheck():
    c = case(Sq=20, Sk=20, window=(3, 3), G=1, Hq=2, Hkv=1)
    q, k, v, _ = make_attention_inputs(c, "cpu")
    torch.library.opcheck(torch.ops.mmcore.window_attention_fwd.default,
                          (q, k, v, None, None, 3, 3, False, 1, 0.25, "cpu"))


# ------------------------------------------------------------------ bad inputs


def _qkv(dtype=torch.float32, S=8):
    return [torch.randn(1, 2, S, 16, dtype=dtype) for _ in range(3)]


def test_bad_dtype_through_public_api():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="k"):
        mmcore.window_attention(q, k.half(), v, window=(2, 2), backend="cpu")
    with pytest.raises(TypeError, match="q"):
        mmcore.window_attention(q.int(), k.int(), v.int(), window=(2, 2), backend="cpu")


def test_bad_shapes_through_public_api():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="Hq % Hkv"):
        mmcore.window_attention(q, torch.randn(1, 3, 8, 16), torch.randn(1, 3, 8, 16),
                                backend="cpu")
    with pytest.raises(ValueError, match="seqlens_k"):
        mmcore.window_attention(q, k, v, seqlens_k=torch.tensor([9]), backend="cpu")
    with pytest.raises(ValueError, match="window"):
        mmcore.window_attention(q, k, v, window=(-2, 0), backend="cpu")


def test_kernel_checks_name_the_argument():
    """The C++ kernel validates on its own (it is reachable as torch.ops.mmcore_C.*)."""
    q, k, v = _qkv()
    fwd = torch.ops.mmcore_C.window_attention_fwd
    bad = [
        ((q, k.double(), v, None, None, 2, 2, False, 0, 0.25), "k"),
        ((q[0], k, v, None, None, 2, 2, False, 0, 0.25), "q"),
        ((q, k, v, None, torch.tensor([9]), 2, 2, False, 0, 0.25), "seqlens_k"),
        ((q, k, v, torch.tensor([1.0]), None, 2, 2, False, 0, 0.25), "seqlens_q"),
        ((q, k, v, None, None, -3, 2, False, 0, 0.25), "left"),
        ((q, k, v, None, None, 2, 2, False, 99, 0.25), "global_tokens"),
        ((q, k, v, None, None, 2, 2, False, 0, float("nan")), "scale"),
        ((q, k.transpose(2, 3), v, None, None, 2, 2, False, 0, 0.25), "k"),
    ]
    for args, name in bad:
        with pytest.raises(RuntimeError, match=name):
            fwd(*args)
    out, lse = fwd(q, k, v, None, None, 2, 2, False, 0, 0.25)
    bwd = torch.ops.mmcore_C.window_attention_bwd
    with pytest.raises(RuntimeError, match="lse"):
        bwd(out, q, k, v, out, lse.double(), None, None, 2, 2, False, 0, 0.25)
    with pytest.raises(RuntimeError, match="dout"):
        bwd(out[:, :1], q, k, v, out, lse, None, None, 2, 2, False, 0, 0.25)


def test_expanded_kv_stride0():
    """A broadcast (stride-0) K/V is a legal input: the kernel copies what BLAS cannot read."""
    q = torch.randn(1, 2, 9, 16)
    k = torch.randn(1, 2, 1, 16).expand(1, 2, 9, 16)
    v = torch.randn(1, 2, 9, 16)
    out = mmcore.window_attention(q, k, v, window=(2, 2), backend="cpu")
    ref = mmcore.window_attention(q, k.contiguous(), v, window=(2, 2), backend="torch")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_aten_gemm_fallback():
    """The at::mm path (used when torch's BLAS exports no sgemm_/dgemm_) gives the same
    answers: a few cases in a subprocess with MMCORE_CPU_GEMM=aten."""
    import os
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    code = (
        "import sys, torch; sys.path.insert(0, %r)\n"
        "from kit import check_attention_case\n"
        "from test_window_cpu import EDGE\n"
        "for name in ['GQA 6/2', 'global noncausal two key segments', 'fp64', 'bf16',\n"
        "             'non-contiguous']:\n"
        "    check_attention_case('window_attention', 'cpu', EDGE[name])\n"
        "print('ok')\n" % here)
    env = dict(os.environ, MMCORE_CPU_GEMM="aten")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr
