"""lora_linear's col_scale epilogue (DoRA) and transposed (Conv1D) weights, every backend,
forward and backward, against the float64 oracle (the tolerance rule, tests/kit.py).

    y = c ⊙ (x Wᵀ + s_a (x A_aᵀ) B_aᵀ) + b,   d c = Σ_rows dy ⊙ (x Wᵀ + LoRA)

Cases come from kit.lora_cases (the backend's declarations) with a col_scale drawn around 1
with both signs, and the weight stored (K, N) and passed as its transposed view in a part of
them.  Triton runs under the interpreter on the CPU."""
import pytest
import torch

import mmcore
from kit import assert_close, lora_cases, lora_dense, noncontig, poison_allocator
from mmcore.ops import registry
from mmcore.ops.backends import _loaders

CASES = {"torch": 12, "composed": 12, "cpu": 24, "triton": 12}


def _backend_device(name, request):
    if name == "cpu":
        why = _loaders.cpp_error("lora_linear_fwd_scaled")
        if why:
            pytest.fail(f"cpu backend without col_scale: {why} (rebuild csrc)")
        return "cpu"
    if name == "triton":
        return request.getfixturevalue("interpret")
    return "cpu"


def _dense_cs(x, w, b, A3, B3, s, ids, c, dtype):
    """The dense bracket in `dtype`, then c ⊙ · + b (c, b in dtype)."""
    pre = lora_dense(x, w, None, A3, B3, s, ids, dtype)
    y = pre * c.to(dtype)
    return y + b.to(dtype) if b is not None else y


def check_cs_case(backend, c, device, seed, weight_t, grad_c=True, grad_bias=True):
    g = torch.Generator().manual_seed(seed)
    dt = c["dtype"]
    mk = lambda *s: torch.randn(*s, generator=g).to(dt).to(device)  # noqa: E731
    A, N, r, K = c["A"], c["N"], c["r"], c["K"]
    x = mk(*c["lead"], K)
    wk = mk(K, N)  # Conv1D storage (K, N)
    w = wk.t() if weight_t else wk.t().contiguous()
    b = mk(N) if c["bias"] else None
    la = mk(A, r, K) if c["stacked"] else mk(r, K)
    lb = mk(A, N, r) if c["stacked"] else mk(N, r)
    s = (torch.rand(A, generator=g) + 0.1).to(device) if c["stacked"] else c["scaling"]
    sign = torch.where(torch.rand(N, generator=g) < 0.2, -1.0, 1.0)
    cs = (sign * (0.5 + torch.rand(N, generator=g))).to(dt).to(device)
    ids = None
    if c["ids"] and c["stacked"]:
        shape = c["lead"][:1] if c["per_seq"] else c["lead"]
        ids = torch.randint(-1, A, shape, generator=g).to(device)
    if c["noncontig"] and x.dim() >= 2:
        x = noncontig(x)
    dy = mk(*c["lead"], N)
    for t in (x, la, lb):
        t.requires_grad_(True)
    cs.requires_grad_(grad_c)
    if b is not None:
        b.requires_grad_(grad_bias)
    poison_allocator(device)
    y = mmcore.lora_linear(x, w, b, la, lb, s, adapter_ids=ids, col_scale=cs, backend=backend)
    A3 = la.detach() if c["stacked"] else la.detach()[None]
    B3 = lb.detach() if c["stacked"] else lb.detach()[None]
    s1 = s if isinstance(s, torch.Tensor) else torch.tensor([s])
    M = x.numel() // K
    ids_m = None
    if ids is not None:
        ids_m = (ids if not c["per_seq"] or len(c["lead"]) == 1 else
                 ids.reshape(-1, *([1] * (len(c["lead"]) - 1))).expand(c["lead"])).reshape(-1)

    def run(dtype, dev):
        xx = x.detach().reshape(M, K).to(dev).requires_grad_(True)
        aa, bb = A3.to(dev).requires_grad_(True), B3.to(dev).requires_grad_(True)
        cc = cs.detach().to(dev).requires_grad_(True)
        bias = None if b is None else b.detach().to(dev).requires_grad_(True)
        yy = _dense_cs(xx, w.detach().to(dev), bias, aa, bb, s1.to(dev),
                       None if ids_m is None else ids_m.to(dev), cc, dtype)
        wrt = (xx, aa, bb, cc) + ((bias,) if bias is not None else ())
        return (yy, *torch.autograd.grad(yy, wrt, dy.reshape(M, N).to(dev).to(dtype)))

    ref = run(torch.float64, "cpu")
    base = run(dt, device)
    assert_close("y", y.reshape(M, N), ref[0], base[0])
    wrt = [x, la, lb] + ([cs] if grad_c else []) + ([b] if b is not None and grad_bias else [])
    got = torch.autograd.grad(y, wrt, dy)
    names = ["dx", "dA", "dB", "dc", "dbias"]
    shapes = [(M, K), A3.shape, B3.shape, (N,), (N,)]
    idx = [0, 1, 2] + ([3] if grad_c else []) + ([4] if b is not None and grad_bias else [])
    for gv, i in zip(got, idx):
        assert gv.dtype == wrt[idx.index(i)].dtype, names[i]
        assert_close(names[i], gv.reshape(shapes[i]), ref[1 + i], base[1 + i], grad=True)


@pytest.mark.parametrize("backend,i", [(b, i) for b, n in CASES.items() for i in range(n)])
def test_col_scale_random(backend, i, request):
    device = _backend_device(backend, request)
    c = lora_cases(backend, 1, seed=9100 + i, max_m=48, max_nk=72)[0]
    check_cs_case(backend, c, device, seed=i, weight_t=i % 2 == 0,
                  grad_c=i % 5 != 3, grad_bias=i % 3 != 1)


@pytest.mark.parametrize("backend", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_transposed_weight_plain(backend, dtype, request):
    """No col_scale, weight the transposed view of a (K, N) matrix: the plain op, same as a
    contiguous weight (within the rule), forward and backward."""
    device = _backend_device(backend, request)
    if dtype not in registry.get("lora_linear", backend).dtypes:
        pytest.fail(f"{backend} declares no {dtype}")
    g = torch.Generator().manual_seed(3)
    M, K, N, r = 37, 40, 24, 4
    mk = lambda *s: torch.randn(*s, generator=g).to(dtype).to(device)  # noqa: E731
    x, wk, b, la, lb, dy = mk(M, K), mk(K, N), mk(N), mk(r, K), mk(N, r), mk(M, N)
    for t in (x, la, lb):
        t.requires_grad_(True)
    y = mmcore.lora_linear(x, wk.t(), b, la, lb, 0.7, backend=backend)
    got = torch.autograd.grad(y, (x, la, lb), dy)

    def run(dt):
        xx, aa, bb = (t.detach().double().to(dt).requires_grad_(True) for t in (x, la, lb))
        yy = lora_dense(xx, wk.t().cpu(), b.cpu(), aa[None], bb[None], torch.tensor([0.7]),
                        None, dt)
        return (yy, *torch.autograd.grad(yy, (xx, aa, bb), dy.cpu().to(dt)))

    ref, base = run(torch.float64), run(dtype)
    assert_close("y", y, ref[0], base[0])
    for n, gv, rv, bv in zip(("dx", "dA", "dB"), got, ref[1:], base[1:]):
        assert_close(n, gv.reshape(rv.shape), rv, bv, grad=True)


def test_transposed_weight_not_copied(monkeypatch):
    """The transposed view reaches the backend as it is (no per-call copy)."""
    seen = {}
    impl = registry.get("lora_linear", "composed")
    orig = impl.forward

    def spy(x, weight, *a):
        seen["ptr"], seen["stride"] = weight.data_ptr(), weight.stride()
        return orig(x, weight, *a)

    monkeypatch.setattr(impl, "forward", spy)
    wk = torch.randn(16, 24)
    mmcore.lora_linear(torch.randn(5, 16), wk.t(), None, torch.randn(2, 16),
                       torch.randn(24, 2), 1.0, backend="composed")
    assert seen == {"ptr": wk.data_ptr(), "stride": (1, 24)}


def test_col_scale_registry_flag():
    """A backend that does not declare the epilogue is never picked for it."""
    p = registry.Problem("lora_linear", "cuda", torch.float16, head_dim=64, rank=8,
                         extra={"M": 8, "N": 64, "col_scale": True})
    why = registry.get("lora_linear", "cuda").refuse(p)
    assert why and any("col_scale" in w or "not available" in w for w in why)
    impl = registry.OpImpl(op="lora_linear", backend="cuda", priority=0,
                           devices=frozenset({"cuda"}), dtypes=frozenset({torch.float16}),
                           forward=lambda *a: None)
    assert impl.refuse(p) == ["no col_scale epilogue"]
    p2 = registry.Problem("lora_linear", "cuda", torch.float16, head_dim=64, rank=8,
                          extra={"M": 8, "N": 64, "weight_t": True})
    assert impl.refuse(p2) == ["no transposed (Conv1D) weight"]


@pytest.mark.parametrize("bad,msg", [
    (lambda N: torch.ones(N + 1), "col_scale must have shape"),
    (lambda N: torch.ones(N, dtype=torch.long), "col_scale must be a float"),
    (lambda N: torch.ones(1, N), "col_scale"),
])
def test_col_scale_bad_input(bad, msg):
    x, w = torch.randn(3, 8), torch.randn(6, 8)
    with pytest.raises((ValueError, TypeError), match=msg):
        mmcore.lora_linear(x, w, None, torch.randn(2, 8), torch.randn(6, 2), 1.0,
                           col_scale=bad(6))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_opcheck_col_scale_op(backend, request):
    """The col_scale custom op (mmcore::lora_linear_cs_fwd) passes torch.library.opcheck:
    schema, autograd registration, fake tensors, AOT dispatch; with and without the bracket
    output, stacked adapters with ids, a transposed weight."""
    _backend_device(backend, request)
    g = torch.Generator().manual_seed(0)
    R = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x = R(7, 8).requires_grad_()
    a, b = R(2, 3, 8).requires_grad_(), R(2, 6, 3).requires_grad_()
    c = (R(6) + 2).requires_grad_()
    utils = ("test_schema", "test_autograd_registration", "test_faketensor",
             "test_aot_dispatch_dynamic")
    op = torch.ops.mmcore.lora_linear_cs_fwd.default
    torch.library.opcheck(op, (x, R(6, 8), R(6), a, b, torch.tensor([0.5, 2.0]),
                               torch.tensor([0, 1, -1, 1, 0, 0, 1]), c, True, backend),
                          test_utils=utils)
    torch.library.opcheck(op, (x, R(8, 6).t(), None, a[:1], b[:1], torch.tensor([0.5]), None,
                               c.detach(), False, backend), test_utils=utils)


def test_col_scale_under_compile():
    """lora_linear with a col_scale traces whole under torch.compile (fullgraph), forward and
    backward equal to eager."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 8, generator=g, requires_grad=True)
    w, a, b = torch.randn(8, 6, generator=g), torch.randn(2, 8, generator=g), \
        torch.randn(6, 2, generator=g)
    a.requires_grad_()
    c = (torch.rand(6, generator=g) + 0.5).requires_grad_()

    def f(x, a, c):
        return mmcore.lora_linear(x, w.t(), None, a, b, 0.5, col_scale=c)

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    ye, yc = f(x, a, c), cf(x, a, c)
    ge = torch.autograd.grad(ye.sum(), (x, a, c))
    gc = torch.autograd.grad(yc.sum(), (x, a, c))
    torch.testing.assert_close(yc, ye)
    for u, v in zip(gc, ge):
        torch.testing.assert_close(u, v)
