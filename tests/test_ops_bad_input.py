"""Issue 16 regressions in the ops: crashes, silently wrong answers, unnamed errors.

Each test tells its case; crash cases run in a subprocess, so that a SIGFPE / SIGSEGV fails
the test instead of killing pytest."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import mmcore
from mmcore.ops.co_attention import co_attention
from kit import assert_close, base_attention, oracle_attention, window_mask

BACKENDS = ("torch", "cpu", "triton")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_isolated(code, timeout=240):
    """Run `code` in a fresh interpreter (TRITON_INTERPRET=1); returns its stdout, failing on
    a non-zero exit -- a signal shows as a negative return code."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                       text=True, timeout=timeout, env=env, cwd=ROOT)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout}\n{r.stderr[-3000:]}"
    return r.stdout


def test_zero_query_heads_do_not_crash():
    """Issue 16, item 1: cross_attention(q of shape (2, 0, 9, 8), k, k) died with SIGFPE in
    the C++ kernel (zero query heads: g = Hq / Hkv = 0).  Zero heads are a valid empty input:
    every backend returns the empty output, and its backward empty / zero gradients."""
    out = run_isolated("""
        import torch, mmcore
        for op in (mmcore.cross_attention, mmcore.window_attention):
            for be in ("auto", "cpu", "torch", "triton"):
                q = torch.randn(2, 0, 9, 8, requires_grad=True)
                k = torch.randn(2, 1, 11, 8, requires_grad=True)
                o = op(q, k, k, backend=be)
                assert o.shape == (2, 0, 9, 8), o.shape
                o.sum().backward()
                assert k.grad.shape == k.shape and not k.grad.any()
                print(op.__name__, be, "ok")
        # the C++ kernels themselves, below the front-end
        q, k = torch.randn(2, 0, 9, 8), torch.randn(2, 1, 11, 8)
        o, lse = torch.ops.mmcore_C.cross_attention_fwd(q, k, k, None, None, 0.5)
        assert o.shape == (2, 0, 9, 8) and lse.shape == (2, 0, 9)
        d = torch.ops.mmcore_C.cross_attention_bwd(q, q, k, k, q, lse, None, None, 0.5)
        assert [t.shape for t in d] == [q.shape, k.shape, k.shape]
        print("C++ ok")
    """)
    assert out.count("ok") == 9


def test_zero_adapters_do_not_crash():
    """Issue 16, item 2: lora_linear with lora_a of shape (0, 3, 8) -- zero adapters -- died
    with SIGSEGV on cpu and triton (scaling[0] of an empty tensor).  With adapter_ids=None
    ("adapter 0 for every row") it is now a ValueError naming lora_a; with every id -1 (base
    only) it is valid and returns x @ W^T + b on every backend."""
    out = run_isolated("""
        import torch, mmcore
        x, w, b = torch.randn(2, 3, 8), torch.randn(5, 8), torch.randn(5)
        a0, b0, s0 = torch.randn(0, 3, 8), torch.randn(0, 5, 3), torch.zeros(0)
        ids = torch.full((2, 3), -1)
        for be in ("auto", "cpu", "torch", "triton"):
            try:
                mmcore.lora_linear(x, w, None, a0, b0, s0, backend=be)
                raise SystemExit("no error")
            except ValueError as e:
                assert "lora_a" in str(e), e
            y = mmcore.lora_linear(x, w, b, a0, b0, s0, adapter_ids=ids, backend=be)
            torch.testing.assert_close(y, x @ w.T + b)
            print(be, "ok")
        try:  # the C++ kernel checks it too
            torch.ops.mmcore_C.lora_linear_fwd(x.reshape(6, 8), w, None, a0, b0, s0, None)
            raise SystemExit("no error")
        except RuntimeError as e:
            assert "lora_a" in str(e), e
        print("C++ ok")
    """)
    assert out.count("ok") == 5


def _attn_inputs(B=2, Hq=2, Hkv=1, Sq=9, Sk=11, D=8, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Sq, D, generator=g)
    k, v = (torch.randn(B, Hkv, Sk, D, generator=g) for _ in range(2))
    return [t.requires_grad_(grad) for t in (q, k, v)]


def _fwd_bwd(backend, **kw):
    q, k, v = _attn_inputs(grad=True)
    out = mmcore.window_attention(q, k, v, backend=backend, **kw)
    out.backward(torch.ones_like(out))
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_window_sides_past_int32(backend):
    """Issue 16, item 3: window=(0, sys.maxsize) differed from window=(0, -1) by 2.27 on
    every backend, window=(sys.maxsize, 0) gave dK = dV = 0 on cpu and triton, and on triton
    already window=(2**31 - 1, 0).  A side that reaches past every key is now clamped to
    unbounded (exact), so each equals its -1 twin; 2**63 and beyond is a named error."""
    for big in (sys.maxsize, 2 ** 31 - 1):
        for w, ref in (((0, big), (0, -1)), ((big, 0), (-1, 0))):
            got = _fwd_bwd(backend, window=w)
            want = _fwd_bwd(backend, window=ref)
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
            assert got[2].abs().sum() > 0 and got[3].abs().sum() > 0  # dK, dV
    q, k, v = _attn_inputs()
    for w in ((2 ** 63, 0), (0, 2 ** 64 + 3)):
        with pytest.raises(ValueError, match=r"window\[[01]\].*2\*\*63"):
            mmcore.window_attention(q, k, v, window=w, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_seqlens(backend):
    """Issue 16, item 4: triton with seqlens_k = torch.tensor([5, 1, 11, 1])[::2] (a strided
    view) was off by 2.14 against .contiguous() in window, cross and co-attention: the
    kernels read it as a plain array.  The front-end now hands every backend a contiguous
    int64 copy."""
    q, k, v = _attn_inputs()
    sk = torch.tensor([5, 1, 11, 1])[::2]
    sq = torch.tensor([9, 0, 3, 0], dtype=torch.int32)[::2]
    assert not sk.is_contiguous()
    for op, kw in ((mmcore.window_attention, dict(window=(2, 1))),
                   (mmcore.cross_attention, {})):
        got = op(q, k, v, seqlens_q=sq, seqlens_k=sk, backend=backend, **kw)
        want = op(q, k, v, seqlens_q=sq.contiguous(), seqlens_k=sk.contiguous(),
                  backend=backend, **kw)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # co_attention: text (St = 9) and image (Sv = 11) streams, both lengths strided
    q_t, k_t, v_t = _attn_inputs(Sq=9, Sk=9, seed=1)
    q_v, k_v, v_v = _attn_inputs(Sq=11, Sk=11, seed=2)
    args = (q_t, k_t, v_t, q_v, k_v, v_v)
    got = co_attention(*args, text_lengths=sq, image_lengths=sk, backend=backend)
    want = co_attention(*args, text_lengths=sq.contiguous(),
                               image_lengths=sk.contiguous(), backend=backend)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_bias(backend):
    """Issue 16, item 5: triton lora_linear with bias = torch.randn(10)[::2] was off by 2.69
    (the kernel read bias[j] at stride 1).  The front-end makes bias contiguous."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 8, generator=g), torch.randn(5, 8, generator=g)
    a, b = torch.randn(2, 8, generator=g), torch.randn(5, 2, generator=g)
    bias = torch.randn(10, generator=g)[::2]
    got = mmcore.lora_linear(x, w, bias, a, b, 0.5, backend=backend)
    want = mmcore.lora_linear(x, w, bias.contiguous(), a, b, 0.5, backend=backend)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype, val", [(torch.float32, 3e3), (torch.float16, 6e4)])
def test_torch_backend_large_logits(dtype, val):
    """Issue 16, item 6: with q = k = 3e3 (every score equal and ~1e7) the output must be
    the mean of v; the torch backend was off by 0.15 (its softmax used exp(s - lse) with an
    fp32 lse that had lost log(n)), and by a relative 1.0 for fp16 inputs near 6e4.  Scores
    are max-subtracted and renormalised now: the error is fp rounding of the output."""
    q = torch.full((2, 2, 9, 8), val, dtype=dtype)
    v = torch.randn(2, 1, 11, 8).to(dtype).requires_grad_()
    for op in (mmcore.window_attention, mmcore.cross_attention):
        out = op(q, q[:, :1, :1].expand(2, 1, 11, 8), v, backend="torch")
        want = v.detach().double().mean(2, keepdim=True).expand(2, 2, 9, 8)
        err = (out.double() - want).abs().max().item()
        assert err <= 2 * torch.finfo(dtype).eps * want.abs().max().item(), err
        dv, = torch.autograd.grad(out.float().sum(), v)  # uniform P: dV = Sq * g / Sk
        torch.testing.assert_close(dv.float(), torch.full_like(dv.float(), 18 / 11),
                                   rtol=2 * torch.finfo(dtype).eps, atol=0)


LARGE_LOGIT_CASES = ((1, 2, 40, 24, 64, 0), (1, 1, 33, 100, 32, 2))  # (B, H, Sq, Sk, D, seed)


def _large_logit_grads(dev, B, H, Sq, Sk, D, seed):
    """bf16 cross_attention on triton with q, k ~ 100 randn: (out, (dq, dk, dv), oracle, base)."""
    g = torch.Generator().manual_seed(seed)
    q = (100 * torch.randn(B, H, Sq, D, generator=g)).to(torch.bfloat16)
    k = (100 * torch.randn(B, H, Sk, D, generator=g)).to(torch.bfloat16)
    v = torch.randn(B, H, Sk, D, generator=g).to(torch.bfloat16)
    dout = torch.randn(B, H, Sq, D, generator=g).to(torch.bfloat16)
    mask = torch.ones(B, 1, Sq, Sk, dtype=torch.bool)
    ref = oracle_attention(q, k, v, mask, D ** -0.5, dout)
    base = base_attention(q, k, v, mask, D ** -0.5, dout)
    qq, kk, vv = (t.clone().to(dev).requires_grad_() for t in (q, k, v))
    out = mmcore.cross_attention(qq, kk, vv, backend="triton")
    out.backward(dout.to(dev))
    return out, (qq.grad, kk.grad, vv.grad), ref, base


def _within_5_percent(name, got, r, D):
    err = (got.double().cpu() - r).abs().max().item()
    assert err <= 0.05 * r.abs().max().item() + 1e-5, f"{name} (D={D}): err {err:.3e}"


def test_triton_bf16_cross_backward_large_logits(interpret):
    """Issue 16, item 9: triton bf16 cross_attention backward with q, k ~ 100 randn had a dq
    error of 2.1 where the reference's largest value is 0.017: dS = P (dP - delta) must
    cancel where P is one-hot, and it did not with P = exp(S - lse) from an fp32 lse (off by
    an ulp of S ~ 1e4) and delta = rowsum(dO * O) from a bf16 O.  The dq kernel now
    renormalises P from the scores and takes delta = rowsum(P dP).

    At D = 64 the tolerance rule's base (plain bf16 PyTorch: scores of 1e4 rounded to bf16)
    is off by hundreds, so the rule alone cannot fail; the gradients must also be within 5 %
    of the reference's largest value (bf16 rounding of the result is 0.4 %; the old kernel
    was off by 1000x).  At D = 32, Sk = 100 the rule itself failed at 34b1b06."""
    for case in LARGE_LOGIT_CASES:
        out, grads, ref, base = _large_logit_grads(interpret, *case)
        assert_close("out", out, ref[0], base[0])
        # dK / dV: the next test
        assert_close("dq", grads[0], ref[2], base[2], grad=True)
        _within_5_percent("dq", grads[0], ref[2], case[4])


def test_triton_bf16_cross_dkdv_large_logits_within_5_percent(interpret):
    """The dK / dV half of the case above: the tolerance rule, and within 5 % of the
    reference's largest value.  The dK/dV kernel took P = exp2(S - lse) from the fp32 lse:
    dk was 7.4e-5 off at D = 64 (5 %: 6.1e-5) and 7.2e-5 at D = 32 (rule: 1e-5).  It takes
    P and delta from the dQ kernel's row statistics now: 9.2e-6 and ~0 (issue 24)."""
    for case in LARGE_LOGIT_CASES:
        _, grads, ref, base = _large_logit_grads(interpret, *case)
        for name, got, r, b in zip(("dk", "dv"), grads[1:], ref[3:], base[3:]):
            assert_close(name, got, r, b, grad=True)
            _within_5_percent(name, got, r, case[4])


def _bad(fn, exc, name):
    with pytest.raises(exc) as e:
        fn()
    assert name in str(e.value), f"{exc.__name__} does not name {name!r}: {e.value}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_op_arguments_named_or_served(backend):
    """Issue 16, item 14: head dim 0 with the default scale raised ZeroDivisionError; scale
    "abc", complex, a list or a 2-element tensor raised raw float() errors while "0.5" was
    accepted; window=(2**63, 0) a pybind cast error; bias=1.0 or lora_a as a list an
    AttributeError; scaling on the meta device a copy error.  Each is now a TypeError /
    ValueError naming the argument.  And the valid empty inputs it refused -- lora_linear
    with K = 0 and the torch backend with Hq = 0 -- are served."""
    q, k, v = _attn_inputs()
    W = lambda **kw: mmcore.window_attention(q, k, v, backend=backend, **kw)  # noqa: E731
    e = torch.empty(2, 2, 9, 0)
    _bad(lambda: mmcore.window_attention(e, e[:, :1], e[:, :1], backend=backend), ValueError,
         "head dim")
    for bad in ("abc", "0.5", 1j, [0.5], torch.tensor([0.5, 0.5]), torch.tensor(1j)):
        _bad(lambda: W(scale=bad), TypeError, "scale")
    _bad(lambda: W(scale=torch.tensor(0.5, device="meta")), ValueError, "scale")
    torch.testing.assert_close(W(scale=torch.tensor(0.5)), W(scale=0.5), rtol=0, atol=0)
    _bad(lambda: W(window=(2 ** 63, 0)), ValueError, "window")
    _bad(lambda: W(window=(1.5, 0)), TypeError, "window")
    x, w = torch.randn(3, 8), torch.randn(5, 8)
    a, b = torch.randn(2, 8), torch.randn(5, 2)
    L = lambda *args, **kw: mmcore.lora_linear(*args, backend=backend, **kw)  # noqa: E731
    _bad(lambda: L(x, w, 1.0, a, b, 0.5), TypeError, "bias")
    _bad(lambda: L(x, w, None, a.tolist(), b, 0.5), TypeError, "lora_a")
    _bad(lambda: L(x, w, None, a, b.tolist(), 0.5), TypeError, "lora_b")
    _bad(lambda: L(x, w, None, a, b, torch.ones(1, device="meta")), ValueError, "scaling")
    _bad(lambda: L(x, w, None, a, b, torch.ones(1, dtype=torch.complex64)), TypeError, "scaling")
    _bad(lambda: L(x, w, None, a[:0], b[:, :0], 0.5), ValueError, "lora_a")
    # valid empty inputs
    y = L(torch.randn(4, 0), torch.randn(5, 0), torch.ones(5), torch.randn(2, 0),
          torch.randn(5, 2), 0.5)
    torch.testing.assert_close(y, torch.ones(4, 5))
    assert L(torch.randn(2, 0, 8), w, None, a, b, 0.5).shape == (2, 0, 5)
    qz = torch.randn(2, 0, 9, 8)
    assert mmcore.window_attention(qz, k, v, backend=backend).shape == (2, 0, 9, 8)
    assert mmcore.cross_attention(qz, k, v, backend=backend).shape == (2, 0, 9, 8)


def test_cpu_cross_backward_dv_sums_pairwise(cpu):
    """Issue 16, item 18: the C++ cross-attention backward summed dV of a key over all the
    query rows of a chunk (256 when Lk is short) in one GEMM and the chunks in sequence; with
    a hidden random matrix, dV of a single key over 256 rows (B=2, Hq=4, Hkv=2, Sq=128, Sk=1,
    D=64, fp32) was 12x less accurate than PyTorch's (2.2e-5 vs 1.8e-6), failing the
    tolerance rule.  Partial sums of 64 rows are now added pairwise.  Here the hidden matrix
    (dout) is uniform in [0, 1), the case the sequential sum handles worst; at the issue's
    shape this machine's old error stays inside the rule, at Hq=16, Sq=1024 it did not."""
    for (B, Hq, Hkv, Sq) in ((2, 4, 2, 128), (1, 16, 1, 1024)):
        g = torch.Generator().manual_seed(0)
        q = torch.randn(B, Hq, Sq, 64, generator=g)
        k, v = (torch.randn(B, Hkv, 1, 64, generator=g) for _ in range(2))
        dout = torch.rand(B, Hq, Sq, 64, generator=g)
        mask = torch.ones(B, 1, Sq, 1, dtype=torch.bool)
        ref = oracle_attention(q, k, v, mask, 0.125, dout)
        base = base_attention(q, k, v, mask, 0.125, dout)
        vv = v.clone().requires_grad_()
        mmcore.cross_attention(q, k, vv, scale=0.125, backend="cpu").backward(dout)
        assert_close(f"dv (Hq={Hq}, Sq={Sq})", vv.grad, ref[4], base[4], grad=True)


@pytest.fixture
def cpu():
    from mmcore.ops.backends import _loaders

    why = _loaders.cpp_error("cross_attention_fwd")
    if why:
        pytest.fail(f"cpu backend unavailable: {why}")
