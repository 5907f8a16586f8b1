"""Attention dropout on the C++ `cpu` backend (csrc/cpu/common.h: Dropout) of window_attention
and cross_attention: its mask is reference/dropout.py's bit for bit, so for the same seed its
outputs and gradients are the torch backend's (float64: to rounding) and the float64 oracle's
built with D.mask (the tolerance rule, float32 / float64 / bfloat16), in every mask mode,
forward and backward; the kept fraction is 1 - p; edge values of p and of the seed."""
import math

import pytest
import torch

from kit import assert_close, attention_dense, bounds_mask, window_mask, with_lengths
from mmcore.ops import cross_attention, window_attention
from mmcore.ops.backends import _loaders
from mmcore.ops.reference import attention as ref
from mmcore.ops.reference import dropout as D

pytestmark = pytest.mark.skipif(
    _loaders.cpp_error("window_attention_fwd") is not None,
    reason=f"mmcore._C not built: {_loaders.cpp_error('window_attention_fwd')}")

DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def _qkv(B, Hq, Hkv, Sq, Sk, Dh, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    return mk(B, Hq, Sq, Dh), mk(B, Hkv, Sk, Dh), mk(B, Hkv, Sk, Dh)


def _check(fn, q, k, v, mask, scale, p, softcap=None, seed=11, vs_torch=True):
    """fn(q, k, v, backend, p) with dropout_p=p on the cpu backend against (1) the oracle and
    base built with the mask regenerated from the seed the call draws after
    torch.manual_seed(seed) (the tolerance rule), (2) the torch backend with the same seed
    (float64: to rounding; its gradients use an fp32 lse on the cpu backend, as without
    dropout), (3) the call without dropout (the dropout did something)."""
    B, Hq, Sq, _ = q.shape
    Sk = k.shape[2]
    torch.manual_seed(seed)
    keep = D.mask(D.draw_seed(), B, Hq, Sq, Sk, p)
    dout = torch.randn(B, Hq, Sq, v.shape[-1], generator=torch.Generator().manual_seed(3),
                       dtype=torch.float64).to(q.dtype)
    res = {}
    for be in ("cpu", "torch") if vs_torch else ("cpu",):
        ts = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        torch.manual_seed(seed)
        out = fn(*ts, be, p)
        res[be] = (out.detach(), *torch.autograd.grad(out, ts, dout))
    dense = {}
    for name, dt in (("oracle", torch.float64), ("base", q.dtype)):
        ts = [t.detach().clone().to(dt).requires_grad_() for t in (q, k, v)]
        o = attention_dense(*ts, mask, scale, dt, softcap, keep, p)[0]
        dense[name] = (o, *torch.autograd.grad(o, ts, dout.to(dt)))
    for i, n in enumerate(("out", "dq", "dk", "dv")):
        assert_close(n, res["cpu"][i], dense["oracle"][i], dense["base"][i], grad=i > 0)
    if vs_torch and q.dtype == torch.float64:
        assert (res["cpu"][0] - res["torch"][0]).abs().max() < 1e-12
        for a, b in zip(res["cpu"][1:], res["torch"][1:]):
            assert (a - b).abs().max() < 1e-5 * max(1.0, b.abs().max().item())
    assert not torch.allclose(res["cpu"][0], fn(q, k, v, "cpu", 0.0), atol=1e-3)


WINDOW_CASES = {
    "causal_window": dict(window=(6, 0), causal=True),
    "bidirectional": dict(window=(4, 5)),
    "globals": dict(window=(3, 3), global_tokens=4),
    "causal_globals": dict(window=(5, 0), causal=True, global_tokens=3),
    "full_gqa": dict(),
    "softcap": dict(window=(7, 7), softcap=2.0),
}


@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", sorted(WINDOW_CASES))
def test_window_matches_oracle_and_torch_backend(case, dtype, p):
    kw = WINDOW_CASES[case]
    B, Hq, Hkv, S, Dh = 2, 4, 2, 45, 16
    q, k, v = _qkv(B, Hq, Hkv, S, S, Dh, dtype, seed=1)
    w = kw.get("window", (-1, -1))
    mask = window_mask(B, S, S, w[0], w[1], kw.get("causal", False), kw.get("global_tokens", 0))

    def fn(q_, k_, v_, be, p_):
        return window_attention(q_, k_, v_, dropout_p=p_, backend=be, **kw)
    _check(fn, q, k, v, mask, Dh ** -0.5, p, softcap=kw.get("softcap"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_window_varlen_offset_and_empty_sample(dtype):
    """seqlens with Lq != Lk (bottom-right alignment), a sample with no keys (0, no NaN),
    non-contiguous (B, S, H, D) inputs."""
    B, Hq, Sq, Sk, Dh, p = 3, 2, 19, 30, 8, 0.3
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2)
               for t in _qkv(B, Hq, Hq, Sq, Sk, Dh, dtype, seed=2))
    assert not q.is_contiguous()
    sq, sk = torch.tensor([19, 7, 4]), torch.tensor([30, 22, 0])
    mask = window_mask(B, Sq, Sk, 5, 2, False, 2, sq, sk)

    def fn(q_, k_, v_, be, p_):
        return window_attention(q_, k_, v_, window=(5, 2), global_tokens=2, seqlens_q=sq,
                                seqlens_k=sk, dropout_p=p_, backend=be)
    _check(fn, q, k, v, mask, Dh ** -0.5, p)
    torch.manual_seed(0)
    out = fn(q, k, v, "cpu", p)
    assert torch.isfinite(out).all() and (out[2] == 0).all() and (out[1, :, 7:] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_window_key_bounds_and_key_mask(dtype):
    B, Hq, S, Dh, p = 2, 4, 33, 8, 0.25
    q, k, v = _qkv(B, Hq, 1, S, S, Dh, dtype, seed=3)
    i = torch.arange(S)
    lo = torch.stack([(i - 9).clamp(min=0), torch.zeros(S, dtype=torch.long)])
    hi = torch.stack([i + 1, torch.maximum(i + 1, torch.full_like(i, 12))])  # prefix-LM
    hi[0, 5] = lo[0, 5]  # a row that sees nothing
    km = torch.ones(B, S, dtype=torch.bool)
    km[0, 3] = km[1, 14:19] = False
    mask = bounds_mask(lo, hi, km)

    def fn(q_, k_, v_, be, p_):
        return window_attention(q_, k_, v_, key_bounds=(lo, hi), key_mask=km, dropout_p=p_,
                                backend=be)
    _check(fn, q, k, v, mask, Dh ** -0.5, p)
    torch.manual_seed(0)
    assert (fn(q, k, v, "cpu", p)[0, :, 5] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_window_several_key_chunks(dtype):
    """Rows that see more than one key chunk (1024 keys) and dk/dv tasks over more than one
    query chunk (256 rows): the chunked online softmax, delta from rowsum(dO * O) (fp32) or
    from a second sweep (bf16), each with the mask of its chunk's absolute key indices."""
    B, H, S, Dh, p = 1, 2, 1100, 8, 0.2
    q, k, v = _qkv(B, H, 1, S, S, Dh, dtype, seed=4)
    mask = window_mask(B, S, S, -1, 0, True, 0)

    def fn(q_, k_, v_, be, p_):
        return window_attention(q_, k_, v_, causal=True, dropout_p=p_, backend=be)
    _check(fn, q, k, v, mask, Dh ** -0.5, p, vs_torch=False)


@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cross_matches_oracle_and_torch_backend(dtype, p):
    """GQA (query heads stacked per kv head: the mask must follow each row's own head and
    row), per-sample lengths both sides, a sample with no keys, softcap."""
    B, Hq, Hkv, Sq, Sk, Dh = 3, 6, 2, 29, 13, 16
    q, k, v = _qkv(B, Hq, Hkv, Sq, Sk, Dh, dtype, seed=5)
    sq, sk = torch.tensor([29, 17, 9]), torch.tensor([13, 6, 0])
    mask = with_lengths(B, Sq, Sk, sq, sk)[:, None]

    def fn(q_, k_, v_, be, p_):
        return cross_attention(q_, k_, v_, seqlens_q=sq, seqlens_k=sk, softcap=3.0,
                               dropout_p=p_, backend=be)
    _check(fn, q, k, v, mask, Dh ** -0.5, p, softcap=3.0)
    torch.manual_seed(0)
    out = fn(q, k, v, "cpu", p)
    assert torch.isfinite(out).all() and (out[2] == 0).all() and (out[1, :, 17:] == 0).all()


def test_cross_many_units():
    """Long stacked query rows split over several work units and chunks (each unit's rows
    start mid-head): the mask still follows (head, row)."""
    B, Hq, Hkv, Sq, Sk, Dh, p = 1, 4, 1, 700, 50, 8, 0.4
    q, k, v = _qkv(B, Hq, Hkv, Sq, Sk, Dh, torch.float64, seed=6)
    mask = with_lengths(B, Sq, Sk)[:, None]

    def fn(q_, k_, v_, be, p_):
        return cross_attention(q_, k_, v_, dropout_p=p_, backend=be)
    _check(fn, q, k, v, mask, Dh ** -0.5, p)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_one_hot_values_show_the_mask_and_kept_fraction(p):
    """v = I: out[b, h, i, j] = P_ij · keep_ij / (1 − p) exactly, so the kept set of the cpu
    kernel is read off its output: it must equal D.mask of the drawn seed element for element
    (a wrong row, column or head hash fails), and its share must be 1 - p (6 sd)."""
    B, H, S = 2, 3, 128
    q, k, _ = _qkv(B, H, H, S, S, S, torch.float64, seed=7)  # D = S: v = I fits
    q = q * 0.3  # every weight well above 0
    v = torch.eye(S, dtype=torch.float64).expand(B, H, S, S).contiguous()
    P = window_attention(q, k, v, backend="cpu")
    for fn in (lambda: window_attention(q, k, v, dropout_p=p, backend="cpu"),
               lambda: cross_attention(q, k, v, dropout_p=p, backend="cpu")):
        torch.manual_seed(21)
        out = fn()
        assert (P > 0).all()
        ratio = out / P
        kept = (ratio - 1 / (1 - p)).abs() < 1e-9
        assert (kept | (out == 0)).all()
        torch.manual_seed(21)
        assert torch.equal(kept, D.mask(D.draw_seed(), B, H, S, S, p))
        n = kept.numel()
        assert abs(kept.double().mean().item() - (1 - p)) < 6 * math.sqrt(p * (1 - p) / n)


def _direct(p, seed, dtype=torch.float64):
    """The C++ ops called directly with an explicit seed vs the reference's functions."""
    q, k, v = _qkv(2, 2, 1, 21, 26, 8, dtype, seed=8)
    dout = torch.randn_like(q)
    C = torch.ops.mmcore_C
    args = (q, k, v, None, None, 4, 3, False, 2, 0.35)
    o, lse = C.window_attention_fwd(*args, 0.0, None, None, None, p, seed)
    ro, rlse = ref.window_fwd(*args, dropout_p=p, seed=seed)
    g = C.window_attention_bwd(dout, *args[:3], o, lse, *args[3:], 0.0, None, None, None, p,
                               seed)
    rg = ref.window_bwd(dout, *args[:3], ro, rlse, *args[3:], dropout_p=p, seed=seed)
    co, clse = C.cross_attention_fwd(q, k, v, None, None, 0.35, 0.0, p, seed)
    cro, _ = ref.cross_fwd(q, k, v, None, None, 0.35, dropout_p=p, seed=seed)
    cg = C.cross_attention_bwd(dout, q, k, v, co, clse, None, None, 0.35, 0.0, p, seed)
    crg = ref.cross_bwd(dout, q, k, v, cro, None, None, None, 0.35, dropout_p=p, seed=seed)
    return (o, ro, g, rg, lse, rlse), (co, cro, cg, crg)


@pytest.mark.parametrize("seed", [(0, 0), (2 ** 31 - 1, 12345), (-7, 2 ** 40 + 3),
                                  (-(2 ** 63), 2 ** 63 - 1)])
def test_seed_bits_wrap_as_the_reference(seed):
    """Any int64 seed (negative, above 2**32): the kernel takes its low 32 bits as the
    reference's `& 0xFFFFFFFF` does."""
    s = torch.tensor(seed, dtype=torch.int64)
    (o, ro, g, rg, lse, rlse), (co, cro, cg, crg) = _direct(0.3, s)
    assert (o - ro).abs().max() < 1e-12 and (co - cro).abs().max() < 1e-12
    assert torch.equal(lse, rlse.float()) or (lse - rlse).abs().max() < 1e-6
    for a, b in zip(g + cg, rg + crg):
        assert (a - b).abs().max() < 1e-5


def test_p_near_one_drops_everything_and_zero_is_the_plain_kernel():
    """round(p · 2**32) = 2**32 (p within 2**-33 of 1): every weight dropped, out and grads 0
    (the reference's threshold); dropout_p = 0 is bit for bit the call without dropout."""
    s = torch.tensor([3, 4])
    (o, ro, g, rg, _, _), (co, cro, cg, crg) = _direct(1 - 2 ** -40, s)
    for t in (o, ro, co, cro) + g + rg + cg + crg:
        assert (t == 0).all()
    q, k, v = _qkv(1, 2, 2, 17, 17, 8, torch.float32, seed=9)
    C = torch.ops.mmcore_C
    a = C.window_attention_fwd(q, k, v, None, None, 3, 1, False, 1, 0.3)
    b = C.window_attention_fwd(q, k, v, None, None, 3, 1, False, 1, 0.3, 0.0, None, None, None,
                               0.0, None)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_bad_dropout_arguments_name_themselves():
    q, k, v = _qkv(1, 1, 1, 8, 8, 8)
    C = torch.ops.mmcore_C
    base = (q, k, v, None, None, -1, -1, False, 0, 0.3, 0.0, None, None, None)
    with pytest.raises(RuntimeError, match="dropout_seed"):
        C.window_attention_fwd(*base, 0.2, None)
    with pytest.raises(RuntimeError, match="dropout_seed"):
        C.window_attention_fwd(*base, 0.2, torch.tensor([1, 2, 3]))
    with pytest.raises(RuntimeError, match="dropout_seed"):
        C.cross_attention_fwd(q, k, v, None, None, 0.3, 0.0, 0.2, torch.tensor([1.0, 2.0]))
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(RuntimeError, match="dropout_p"):
            C.window_attention_fwd(*base, bad, torch.tensor([1, 2]))
        with pytest.raises(RuntimeError, match="dropout_p"):
            C.cross_attention_fwd(q, k, v, None, None, 0.3, 0.0, bad, torch.tensor([1, 2]))


def test_auto_serves_dropout_on_the_cpu_backend():
    """On CPU tensors, backend="auto" sends a dropout call to the C++ kernels (not the
    reference), for window and cross attention."""
    from mmcore.ops import registry
    for op in ("window_attention", "cross_attention"):
        p = registry.Problem(op, "cpu", torch.float32, head_dim=64, needs_grad=True,
                             extra={"Sq": 128, "Sk": 128, "window": (-1, -1), "dropout": True})
        assert registry.select(op, p).backend == "cpu"


def test_opcheck_on_the_cpu_backend():
    """The custom ops (schema, fake kernel, autograd registration) with dropout_p / seed on
    the cpu backend (what torch.compile traces)."""
    q, k, v = (t.requires_grad_() for t in _qkv(1, 4, 2, 12, 12, 8, seed=10))
    seed = D.draw_seed()
    torch.library.opcheck(torch.ops.mmcore.window_attention_fwd.default,
                          (q, k, v, None, None, 3, 3, False, 1, 0.25, "cpu", 0.0, None, None,
                           None, 0.2, seed))
    torch.library.opcheck(torch.ops.mmcore.cross_attention_fwd.default,
                          (q, k, v, None, torch.tensor([7]), 0.25, "cpu", 0.0, 0.2, seed))
