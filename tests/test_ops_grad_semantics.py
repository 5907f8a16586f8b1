"""Issue 24, items 1, 2 and 6: double backward, a learnable softmax scale, and gradients at
logits ~ 1e4 — on every backend that serves the case, against a float64 oracle.

1. create_graph=True used to give zeros on the cpu backend (and auto on the CPU) and an
   unclear error on triton: the ops' backward now routes create_graph through the
   differentiable PyTorch reference, on every backend.
2. A scale tensor with requires_grad got no gradient (read with .item()): dL/dscale =
   <Q, dQ> / scale.
6. Triton's backward took P = exp2(S - lse) with an fp32 lse (an ulp of S ~ 1e4 off) and
   delta = rowsum(dO * O), so its gradients missed the rule at logits ~ 1e4.  The dQ kernel
   now recomputes each row's max, sum and delta = rowsum(P dP) from the scores, and the dK/dV
   kernel takes P and delta from them (docs/robustness.md)."""
import pytest
import torch

import mmcore
from kit import base_attention, oracle_attention, tolerance, window_mask

OPS = {"window": lambda q, k, v, **kw: mmcore.window_attention(q, k, v, window=(2, 3), **kw),
       "cross": lambda q, k, v, **kw: mmcore.cross_attention(q, k, v, **kw)}


def _oracle_fn(name):
    def f(q, k, v, scale=None):
        S = q.shape[2]
        s = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
        if name == "window":
            i = torch.arange(S)[:, None]
            j = torch.arange(k.shape[2])[None, :]
            s = s.masked_fill(~((j >= i - 2) & (j <= i + 3)), float("-inf"))
        return torch.softmax(s, -1) @ v
    return f


def _second_order(fn, q0, k0, v0):
    q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
    out = fn(q, k, v)
    g, = torch.autograd.grad(out.pow(2).sum(), q, create_graph=True)
    return torch.autograd.grad(g.pow(2).sum(), (q, k, v))


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("backend,dtype", [("cpu", torch.float64), ("cpu", torch.float32),
                                           ("auto", torch.float32), ("triton", torch.float32),
                                           ("sdpa", torch.float32), ("torch", torch.float32)])
def test_double_backward_matches_the_oracle(op, backend, dtype):
    g = torch.Generator().manual_seed(3)
    q0, k0, v0 = (torch.randn(1, 2, 6, 4, generator=g, dtype=dtype) for _ in range(3))
    try:
        got = _second_order(lambda q, k, v: OPS[op](q, k, v, backend=backend), q0, k0, v0)
    except mmcore.ops.registry.BackendError:
        pytest.skip(f"{backend} does not serve {op} {dtype} here")
    want = _second_order(_oracle_fn(op), q0.double(), k0.double(), v0.double())
    base = _second_order(_oracle_fn(op), q0, k0, v0)
    for name, a, w, b in zip("qkv", got, want, base):
        berr = (b.double() - w).abs().max().item()
        tol = tolerance(berr, w.abs().max().item(), dtype, grad=True)
        err = (a.double() - w).abs().max().item()
        assert w.abs().max() > 0.1  # never a test on zeros
        assert err <= tol, f"d2/d{name}: err {err:.3e} > tol {tol:.3e}"


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("backend", ["cpu", "triton", "torch", "sdpa", "auto"])
@pytest.mark.parametrize("value", [0.3, 0.0])
def test_learnable_scale_gets_its_gradient(op, backend, value):
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 6, 4, generator=g) for _ in range(3))
    s = torch.tensor(value, requires_grad=True)
    try:
        out = OPS[op](q, k, v, scale=s, backend=backend)
    except mmcore.ops.registry.BackendError:
        pytest.skip(f"{backend} does not serve {op} here")
    out.pow(2).sum().backward()
    s64 = torch.tensor(value, dtype=torch.float64, requires_grad=True)
    ref = _oracle_fn(op)(q.double(), k.double(), v.double(), scale=s64)
    want, = torch.autograd.grad(ref.pow(2).sum(), s64)
    assert s.grad is not None and abs(want.item()) > 0.1
    assert abs(s.grad.item() - want.item()) <= 1e-4 * abs(want.item()) + 1e-5


def test_co_attention_refuses_a_learnable_scale():
    from mmcore.ops.co_attention import co_attention

    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="scale"):
        co_attention(q, q, q, q, q, q, scale=torch.tensor(0.3, requires_grad=True))


# op -> (Sq, Sk, window_attention arguments or None for cross_attention, oracle mask)
LARGE_LOGIT_OPS = {
    "window": (40, 40, dict(window=(8, 8)), lambda: window_mask(1, 40, 40, 8, 8, False, 0)),
    "cross": (40, 24, None, lambda: torch.ones(1, 1, 40, 24, dtype=torch.bool)),
    # Sq <= 16: the split-K decoding forward; causal, with global tokens
    "decode": (8, 64, dict(window=(16, 0), causal=True, global_tokens=4),
               lambda: window_mask(1, 8, 64, 16, 0, True, 4)),
}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("op", sorted(LARGE_LOGIT_OPS))
def test_triton_gradients_at_logits_1e4_meet_the_rule(op, seed):
    """The issue's case: q, k ~ 100 N(0, 1), D = 16, fp32.  Before (seed 0, interpreter):
    window dq 6.3e-5, dk 7.8e-5, dv 6.5e-3; cross dk 5.9e-5, dv 7.7e-3; decode dq 4.0e-5,
    dk 5.2e-5, dv 9.8e-3, against 1e-5 allowed.  Now within fp32 rounding of the oracle
    (dq, dk <= 5e-7, dv <= 3e-7).

    Under the interpreter the dot is modelled as a GPU's (kernels/window_attention.py _dot):
    with numpy's BLAS, whose rounding depends on the tile's shape, dK / dV still missed."""
    Sq, Sk, kw, mask = LARGE_LOGIT_OPS[op]
    g = torch.Generator().manual_seed(seed)
    D = 16
    q = 100 * torch.randn(1, 2, Sq, D, generator=g)
    k = 100 * torch.randn(1, 2, Sk, D, generator=g)
    v = torch.randn(1, 2, Sk, D, generator=g)
    dout = torch.randn(1, 2, Sq, D, generator=g)
    ref = oracle_attention(q, k, v, mask(), D ** -0.5, dout)
    base = base_attention(q, k, v, mask(), D ** -0.5, dout)
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    if kw is None:
        mmcore.cross_attention(qq, kk, vv, backend="triton").backward(dout)
    else:
        mmcore.window_attention(qq, kk, vv, backend="triton", **kw).backward(dout)
    for name, got, r, b in zip(("dq", "dk", "dv"), (qq.grad, kk.grad, vv.grad), ref[2:],
                               base[2:]):
        berr = (b.double() - r).abs().max().item()
        tol = tolerance(berr, r.abs().max().item(), torch.float32, grad=True)
        err = (got.double() - r).abs().max().item()
        # at these logits softmax is one-hot and the exact dq, dk nearly vanish (<= 4e-7):
        # the case checks that dS cancels, which it did not (6e-5); dv is not small
        assert name != "dv" or r.abs().max() > 0.1
        assert err <= tol, f"{op} {name}: err {err:.3e} > tol {tol:.3e}"


def test_co_attention_double_backward_matches_two_cross_attentions():
    """co_attention's backward ran the triton kernels only: second-order gradients were 0."""
    from mmcore.ops.co_attention import co_attention

    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(1, 2, n, 8, generator=g, dtype=torch.float32) for n in (5, 5, 5, 7, 7, 7)]

    def second(fn):
        xs = [t.clone().requires_grad_() for t in ts]
        o_t, o_v = fn(*xs)
        gq, = torch.autograd.grad(o_t.pow(2).sum() + o_v.pow(2).sum(), xs[0], create_graph=True)
        gs = torch.autograd.grad(gq.pow(2).sum(), xs, allow_unused=True)
        return [torch.zeros_like(x) if d is None else d for d, x in zip(gs, xs)]

    def ref(q_t, k_t, v_t, q_v, k_v, v_v):
        return (mmcore.cross_attention(q_t, k_v, v_v, backend="torch"),
                mmcore.cross_attention(q_v, k_t, v_t, backend="torch"))

    try:
        got = second(lambda *x: co_attention(*x, backend="auto"))
    except mmcore.ops.registry.BackendError:
        pytest.skip("no co_attention backend here")
    want = second(ref)
    top = max(float(w.abs().max()) for w in want)
    assert top > 1.0
    for a, w in zip(got, want):
        assert float((a - w).abs().max()) <= 1e-5 * top


@pytest.mark.parametrize("backend", ["cpu", "triton", "auto", "torch"])
def test_lora_linear_double_backward(backend):
    """lora_linear under create_graph: the cpu backend failed (and was marked failed for the
    rest of the process), triton raised 'element 0 of tensors does not require grad'."""
    g = torch.Generator().manual_seed(0)
    x0, w, b = torch.randn(6, 8, generator=g), torch.randn(4, 8, generator=g), torch.randn(4, generator=g)
    A0, B0 = torch.randn(1, 2, 8, generator=g), torch.randn(1, 4, 2, generator=g)
    s = torch.tensor([0.5])

    def second(fn, dt):
        x, A, B = (t.to(dt).clone().requires_grad_() for t in (x0, A0, B0))
        gx, = torch.autograd.grad(fn(x, A, B).pow(2).sum(), x, create_graph=True)
        return torch.autograd.grad(gx.pow(2).sum(), (x, A, B))

    def dense(x, A, B):
        return x @ w.to(x.dtype).T + b.to(x.dtype) + s.to(x.dtype) * (x @ A[0].T) @ B[0].T

    try:
        got = second(lambda x, A, B: mmcore.lora_linear(x, w, b, A, B, s, backend=backend),
                     torch.float32)
    except mmcore.ops.registry.BackendError:
        if backend != "triton":  # cpu / torch / auto serve it on every machine
            raise
        pytest.skip("triton does not serve lora_linear here")
    want, base = second(dense, torch.float64), second(dense, torch.float32)
    for a, wv, bv in zip(got, want, base):
        tol = tolerance((bv.double() - wv).abs().max().item(), wv.abs().max().item(),
                        torch.float32, grad=True)
        assert (a.double() - wv).abs().max().item() <= tol
