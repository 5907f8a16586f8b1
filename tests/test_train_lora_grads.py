"""lora_linear's bias and scaling gradients (issue 13: peft's bias="all"/"lora_only" needs
d bias; issue 16 item 7: a scaling tensor that requires grad got no .grad on any backend).

Both are computed at the op's autograd level, so every backend gets them; each is checked
against the float64 oracle with the tolerance rule (docs/design.md), through the eager path and the
registered custom op (the path torch.compile takes)."""
import pytest
import torch
from torch.overrides import TorchFunctionMode

import mmcore
from kit import assert_close, lora_dense, noncontig


class _NoEager(TorchFunctionMode):
    """Any torch-function mode makes lora_linear go through torch.ops.mmcore.lora_linear_fwd."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.fixture(params=["torch", "cpu", "triton"])
def backend(request):
    if request.param == "triton":
        return "triton", request.getfixturevalue("interpret")
    if request.param == "cpu":
        from mmcore.ops.backends import _loaders

        why = _loaders.cpp_error("lora_linear_fwd")
        if why:
            pytest.fail(f"cpu backend unavailable: {why}")
    return request.param, "cpu"


def _case(backend, device, *, lead, K, N, r, A, stacked, ids, dtype, seed, custom_op=False,
          grads=("bias", "scaling", "x", "a", "b"), nc=False):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    x, w, b = mk(*lead, K), mk(N, K), mk(N)
    la = mk(A, r, K) if stacked else mk(r, K)
    lb = mk(A, N, r) if stacked else mk(N, r)
    s = (torch.rand(A if stacked else 1, generator=g) + 0.2)
    dy = mk(*lead, N)
    if nc:
        x = noncontig(x.reshape(-1, K)).reshape(*lead, K) if len(lead) == 1 else x
        dy = noncontig(dy.reshape(-1, N)).reshape(*lead, N) if len(lead) == 1 else dy
    ids_t = None
    if ids:
        ids_t = torch.randint(-1, A, lead, generator=g)
    leaves = dict(x=x, bias=b, a=la, b=lb, scaling=s)
    dev = {k: v.to(device).detach().requires_grad_(k in grads) for k, v in leaves.items()}
    call = lambda: mmcore.lora_linear(  # noqa: E731
        dev["x"], w.to(device), dev["bias"], dev["a"], dev["b"],
        dev["scaling"] if stacked else dev["scaling"].reshape(()),
        adapter_ids=None if ids_t is None else ids_t.to(device), backend=backend)
    if custom_op:
        with _NoEager():
            y = call()
    else:
        y = call()
    y.backward(dy.to(device))
    M = x.numel() // K
    A3 = la if stacked else la[None]
    B3 = lb if stacked else lb[None]

    def dense(dt):
        t = {k: v.detach().to(dt).requires_grad_(True) for k, v in
             dict(x=x.reshape(M, K), bias=b, a=A3, b=B3, scaling=s).items()}
        yy = lora_dense(t["x"], w.to(dt), t["bias"], t["a"], t["b"], t["scaling"],
                        None if ids_t is None else ids_t.reshape(-1), dt)
        names = list(t)
        return yy, dict(zip(names, torch.autograd.grad(yy, [t[n] for n in names],
                                                       dy.reshape(M, N).to(dt))))

    y64, g64 = dense(torch.float64)
    yb, gb = dense(dtype)
    assert_close("y", y.reshape(M, N), y64, yb)
    for k in grads:
        got = dev[k].grad
        assert got is not None, f"{k}: no gradient (backend {backend})"
        want_shape = {"x": (M, K), "a": A3.shape, "b": B3.shape}.get(k, None)
        got = got.reshape(want_shape) if want_shape else got
        assert got.dtype == dev[k].dtype
        assert_close("d" + k, got, g64[k], gb[k], grad=True)


@pytest.mark.parametrize("seed", range(3))
def test_bias_and_scaling_grads_single(backend, seed):
    """Single adapter, bias and a 0-dim scaling tensor both trainable, odd sizes."""
    name, dev = backend
    _case(name, dev, lead=(2, 17), K=33, N=29, r=5, A=1, stacked=False, ids=False,
          dtype=torch.float32, seed=seed)


@pytest.mark.parametrize("seed", range(2))
def test_bias_and_scaling_grads_multi_adapter(backend, seed):
    """Stacked adapters with per-token ids incl. -1 (base only): d scaling_a sums only the
    rows of adapter a; -1 rows feed d bias only."""
    name, dev = backend
    _case(name, dev, lead=(37,), K=24, N=19, r=4, A=3, stacked=True, ids=True,
          dtype=torch.float32, seed=10 + seed, nc=seed == 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bias_grad_half(backend, dtype):
    name, dev = backend
    _case(name, dev, lead=(23,), K=16, N=21, r=3, A=1, stacked=False, ids=False,
          dtype=dtype, seed=5, grads=("bias", "scaling"))


def test_custom_op_path(backend):
    """The registered custom op (torch.compile's path) gives the same gradients."""
    name, dev = backend
    _case(name, dev, lead=(13,), K=20, N=11, r=2, A=2, stacked=True, ids=True,
          dtype=torch.float32, seed=3, custom_op=True)


def test_only_bias_trainable(backend):
    """Only the bias requires grad (peft bias="all" on a frozen adapter): the backend's
    backward is not needed, d bias still arrives."""
    name, dev = backend
    _case(name, dev, lead=(9,), K=8, N=7, r=2, A=1, stacked=False, ids=False,
          dtype=torch.float32, seed=4, grads=("bias",))


def test_learnable_scaling_regression():
    """Issue 16 item 7: `scaling` a tensor that requires grad got `.grad = None` after backward
    on every backend (at 34b1b06), so a learnable LoRA scale was silently frozen."""
    x = torch.randn(4, 8)
    w, la, lb = torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2)
    for backend in ("torch", "cpu"):
        s = torch.tensor(0.5, requires_grad=True)
        mmcore.lora_linear(x, w, None, la, lb, s, backend=backend).sum().backward()
        assert s.grad is not None, backend
        want = ((x @ la.t()) @ lb.t()).sum()
        torch.testing.assert_close(s.grad, want, rtol=1e-5, atol=1e-5)


def test_weight_stays_frozen():
    """Contract: never a gradient for the base weight, even when it requires grad."""
    w = torch.randn(5, 4, requires_grad=True)
    b = torch.randn(5, requires_grad=True)
    y = mmcore.lora_linear(torch.randn(3, 4), w, b, torch.randn(2, 4), torch.randn(5, 2), 1.0)
    y.sum().backward()
    assert w.grad is None and b.grad is not None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_computes_in_the_autocast_dtype(dtype):
    """Under torch.autocast (mixed-precision training) fp32 weights and a half x are cast to
    the autocast dtype, as F.linear is, instead of failing the dtype check; gradients reach
    the fp32 leaves in fp32."""
    x = torch.randn(5, 8)
    w, b = torch.randn(6, 8), torch.randn(6, requires_grad=True)
    la, lb = torch.randn(2, 8, requires_grad=True), torch.randn(6, 2, requires_grad=True)
    with torch.autocast("cpu", dtype=dtype):
        y = mmcore.lora_linear(x.to(dtype), w, b, la, lb, 0.5)
        ref = torch.nn.functional.linear(x, w + 0.5 * lb.detach() @ la.detach(), b.detach())
    assert y.dtype == dtype == ref.dtype
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=5e-2)
    y.float().sum().backward()
    assert b.grad.dtype == la.grad.dtype == torch.float32
