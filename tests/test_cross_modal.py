"""mmcore.nn.CoAttention / CrossModalAttention against a plain-PyTorch composition of the seed
formulas (dense masks), forward and the gradients of every parameter and input, on the cpu,
torch and triton (interpreter; one-launch co-attention) backends.  Tolerance: the tolerance rule, docs/design.md
with the oracle = the composition in float64, base = the composition in the input dtype."""
import copy

import pytest
import torch
from torch import nn

from kit import assert_close, attention_dense
from mmcore.nn import CoAttention, CrossModalAttention
from mmcore.ops.backends import _loaders


def _mask(Lq, Lk, Sq, Sk, B):
    Lq = torch.full((B,), Sq) if Lq is None else Lq.cpu()
    Lk = torch.full((B,), Sk) if Lk is None else Lk.cpu()
    i = torch.arange(Sq)[None, :, None]
    j = torch.arange(Sk)[None, None, :]
    return ((i < Lq[:, None, None]) & (j < Lk[:, None, None]))[:, None]


def _attend(q_in, kv_in, Lq, Lk, W, H, Hkv, scale, dtype):
    """Plain multi-head attention of q_in over kv_in with the module's weights W (dict)."""
    B, Sq, d = q_in.shape
    Sk = kv_in.shape[1]
    D = d // H
    lin = lambda x, n: torch.nn.functional.linear(x, W[n + ".weight"], W.get(n + ".bias"))  # noqa
    q = lin(q_in, "q_proj").view(B, Sq, H, D).transpose(1, 2)
    k = lin(kv_in, "k_proj").view(B, Sk, Hkv, D).transpose(1, 2)
    v = lin(kv_in, "v_proj").view(B, Sk, Hkv, D).transpose(1, 2)
    a, lse = attention_dense(q, k, v, _mask(Lq, Lk, Sq, Sk, B).to(q.device), scale, dtype)
    return a.transpose(1, 2).reshape(B, Sq, d), lse


def co_reference(mod, h_t, h_v, Lt, Lv, dtype):
    """F_t = H_t + Wo·softmax(H_t Wq (H_v Wk)^T/√d) H_v Wv, and the same with t <-> v."""
    W = {n: p.to(dtype) for n, p in mod.named_parameters()}
    h_t, h_v = h_t.to(dtype), h_v.to(dtype)
    s = mod.scale or mod.head_dim ** -0.5
    a_t, lse_t = _attend(h_t, h_v, Lt, Lv, W, mod.n_heads, mod.n_heads, s, dtype)
    a_v, lse_v = _attend(h_v, h_t, Lv, Lt, W, mod.n_heads, mod.n_heads, s, dtype)
    if mod.o_proj is not None:
        o = lambda a: torch.nn.functional.linear(a, W["o_proj.weight"], W.get("o_proj.bias"))  # noqa
        a_t, a_v = o(a_t), o(a_v)
    return h_t + a_t, h_v + a_v, lse_t, lse_v


def _grads(outs, dys, params):
    return torch.autograd.grad(outs, params, dys, allow_unused=False)


def _check_module(mod, run, ref, inputs, dys):
    """run(m, *inputs) -> outputs (first len(dys) differentiable); ref(m, *inputs, dtype)."""
    dtype = inputs[0].dtype
    outs = run(mod, *inputs)
    leaves = list(inputs) + list(mod.parameters())
    got = _grads(list(outs[:len(dys)]), dys, leaves)
    res = {}
    for name, dt in (("oracle", torch.float64), ("base", dtype)):
        m = copy.deepcopy(mod).to(dt if name == "oracle" else dtype)
        ins = [x.detach().to(dt).requires_grad_() for x in inputs]
        o = ref(m, *ins, dt)
        res[name] = (o, _grads(list(o[:len(dys)]), [d.to(dt) for d in dys],
                               ins + list(m.parameters())))
    for i, o in enumerate(outs):
        assert_close(f"out{i}", o, res["oracle"][0][i], res["base"][0][i])
    names = [f"input{i}" for i in range(len(inputs))] + [n for n, _ in mod.named_parameters()]
    for n, g, go, gb in zip(names, got, res["oracle"][1], res["base"][1]):
        assert_close(f"d{n}", g, go, gb, grad=True)


def _backend_device(backend, request):
    if backend == "triton":
        return request.getfixturevalue("interpret")
    if backend == "cpu":
        why = _loaders.cpp_error("cross_attention_fwd")
        if why:
            pytest.fail(f"cpu backend unavailable: {why}")
    return "cpu"


CO_CASES = {
    "mixed": dict(B=3, St=37, Sv=9, d=32, H=2, Lt=[37, 12, 5], Lv=[9, 0, 4]),
    "empty_text": dict(B=2, St=20, Sv=7, d=48, H=3, Lt=[0, 20], Lv=[7, 7]),
    "full": dict(B=2, St=33, Sv=17, d=32, H=4, Lt=None, Lv=None),
}


@pytest.mark.parametrize("out_proj", [True, False])
@pytest.mark.parametrize("name", sorted(CO_CASES))
@pytest.mark.parametrize("backend", ["triton", "cpu", "torch"])
def test_co_attention(backend, name, out_proj, request):
    device = _backend_device(backend, request)
    c = CO_CASES[name]
    torch.manual_seed(0)
    mod = CoAttention(c["d"], c["H"], out_proj=out_proj, backend=backend).to(device)
    h_t = torch.randn(c["B"], c["St"], c["d"], device=device, requires_grad=True)
    h_v = torch.randn(c["B"], c["Sv"], c["d"], device=device, requires_grad=True)
    Lt = None if c["Lt"] is None else torch.tensor(c["Lt"], device=device)
    Lv = None if c["Lv"] is None else torch.tensor(c["Lv"], device=device)
    dys = [torch.randn_like(h_t), torch.randn_like(h_v)]

    def run(m, ht, hv):
        return m(ht, hv, text_lengths=Lt, image_lengths=Lv, return_lse=True)

    def ref(m, ht, hv, dt):
        return co_reference(m, ht, hv, Lt, Lv, dt)

    _check_module(mod, run, ref, [h_t, h_v], dys)


def test_co_attention_one_launch(interpret, monkeypatch):
    """On the triton backend both directions are a single kernel launch (and the residual is
    fused when there is no Wo)."""
    from mmcore.kernels import cross_attention as K

    calls = []
    for name in ("_fwd", "_co_fwd"):
        kern = getattr(K, name)

        class Spy:
            def __init__(self, k, n):
                self.k, self.n = k, n

            def __getitem__(self, grid):
                calls.append(self.n)
                return self.k[grid]
        monkeypatch.setattr(K, name, Spy(kern, name))
    mod = CoAttention(32, 2, out_proj=False, backend="triton").to(interpret)
    with torch.no_grad():
        mod(torch.randn(2, 20, 32, device=interpret), torch.randn(2, 5, 32, device=interpret),
            image_lengths=torch.tensor([5, 0], device=interpret))
    assert calls == ["_co_fwd"]


class _Wrapped(nn.Module):
    """Stands for a LoRA-wrapped projection (not a plain nn.Linear)."""

    def __init__(self, lin):
        super().__init__()
        self.base = lin

    def forward(self, x):
        return self.base(x)


def test_co_attention_wrapped_projections():
    torch.manual_seed(1)
    mod = CoAttention(32, 4, backend="torch")
    h_t, h_v = torch.randn(2, 11, 32), torch.randn(2, 6, 32)
    f_t, f_v = mod(h_t, h_v)
    for n in ("q_proj", "v_proj", "o_proj"):
        setattr(mod, n, _Wrapped(getattr(mod, n)))
    g_t, g_v = mod(h_t, h_v)
    torch.testing.assert_close(f_t, g_t)
    torch.testing.assert_close(f_v, g_v)


@pytest.mark.parametrize("backend", ["triton", "cpu", "torch"])
def test_cross_modal_attention(backend, request):
    device = _backend_device(backend, request)
    torch.manual_seed(0)
    d, H, Hkv, kv_dim = 48, 4, 2, 40
    mod = CrossModalAttention(d, H, kv_dim=kv_dim, n_kv_heads=Hkv, backend=backend).to(device)
    x = torch.randn(3, 21, d, device=device, requires_grad=True)
    ctx = torch.randn(3, 9, kv_dim, device=device, requires_grad=True)
    Lx = torch.tensor([21, 4, 10], device=device)
    Lc = torch.tensor([9, 3, 0], device=device)

    def run(m, x_, c_):
        return m(x_, c_, x_lengths=Lx, context_lengths=Lc, return_lse=True)

    def ref(m, x_, c_, dt):
        W = {n: p for n, p in m.named_parameters()}
        a, lse = _attend(x_, c_, Lx, Lc, W, H, Hkv, d // H and (d // H) ** -0.5, dt)
        return torch.nn.functional.linear(a, W["o_proj.weight"], W["o_proj.bias"]), lse

    _check_module(mod, run, ref, [x, ctx], [torch.randn(3, 21, d, device=device)])


def test_module_bad_args():
    with pytest.raises(ValueError, match="n_heads"):
        CoAttention(30, 4)
    with pytest.raises(ValueError, match="n_kv_heads"):
        CrossModalAttention(32, 4, n_kv_heads=3)
    mod = CoAttention(16, 2, backend="torch")
    with pytest.raises(ValueError, match="text_lengths"):
        mod(torch.randn(2, 5, 16), torch.randn(2, 3, 16), text_lengths=torch.tensor([5]))


@pytest.mark.gpu
@pytest.mark.parametrize("out_proj", [True, False])
def test_gpu_co_attention(out_proj):
    torch.manual_seed(0)
    B, St, Sv, d, H = 2, 700, 197, 256, 4
    mod = CoAttention(d, H, out_proj=out_proj, backend="triton").cuda().float()
    h_t = torch.randn(B, St, d, device="cuda", requires_grad=True)
    h_v = torch.randn(B, Sv, d, device="cuda", requires_grad=True)
    Lt = torch.tensor([700, 311], device="cuda")
    Lv = torch.tensor([197, 50], device="cuda")
    dys = [torch.randn_like(h_t), torch.randn_like(h_v)]
    _check_module(mod, lambda m, a, b: m(a, b, text_lengths=Lt, image_lengths=Lv),
                  lambda m, a, b, dt: co_reference(m, a, b, Lt, Lv, dt)[:2], [h_t, h_v], dys)
