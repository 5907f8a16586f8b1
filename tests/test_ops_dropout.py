"""Attention dropout (``dropout_p``) of window_attention / cross_attention on the backends that
declare it (registry.OpImpl.supports_dropout): validation, exactness against the float64
oracle with the backend's own mask (every mask mode), determinism under torch.manual_seed,
statistics of the mask, gradcheck with a fixed mask, and patched HF models in train mode."""
import copy
import math

import pytest

import torch

from kit import assert_close, attention_dense, bounds_mask, window_mask, with_lengths
from mmcore.ops import cross_attention, registry, window_attention
from mmcore.ops.reference import dropout as D

def _declaring(dtype):
    return [i.backend for i in registry.implementations("window_attention")
            if i.supports_dropout and not i.refuse(registry.Problem(
                "window_attention", "cpu", dtype, head_dim=16, extra={"dropout": True}))]


# (the triton backend too where TRITON_INTERPRET=1 lets it serve CPU tensors, as in CI)
DROPOUT_BACKENDS = _declaring(torch.float32)
DROPOUT_BACKENDS_F64 = _declaring(torch.float64)  # the float64 tests (triton: fp32 at most)
# (backend, reference path): the torch backend on both of its paths, any other once
BACKEND_PATHS = [pytest.param(b, path, id=f"{path}-{b}" if path != "-" else b)
                 for b in DROPOUT_BACKENDS
                 for path in (("batched", "chunked") if b == "torch" else ("-",))]
BACKEND_PATHS_F64 = [p for p in BACKEND_PATHS if p.values[0] in DROPOUT_BACKENDS_F64]


@pytest.fixture(params=["batched", "chunked"])
def ref_path(request, monkeypatch):
    """Runs a test on both paths of the torch backend: the whole-problem one for small calls
    (reference/batched.py) and the chunked one (budget 0); checks the path was taken.
    "-" (another backend, through BACKEND_PATHS): nothing to select or check."""
    if request.param == "-":
        yield request.param
        return
    from mmcore.ops.reference import batched
    calls = []
    real = batched.forward
    monkeypatch.setattr(batched, "forward", lambda *a: calls.append(1) or real(*a))
    if request.param == "chunked":
        monkeypatch.setattr(batched, "BUDGET", 0)
    yield request.param
    assert bool(calls) == (request.param == "batched"), (request.param, len(calls))


def test_reference_backends_declare_dropout():
    """The parametrized tests below run on every declaring backend: never on none."""
    assert "torch" in DROPOUT_BACKENDS
    assert registry.get("window_attention", "triton").supports_dropout
    assert registry.get("cross_attention", "triton").supports_dropout
    assert registry.get("cross_attention", "torch").supports_dropout
    from mmcore.ops.backends import _loaders
    if _loaders.cpp_error("window_attention_fwd") is None:  # the C++ kernels serve it too
        assert "cpu" in DROPOUT_BACKENDS
        assert registry.get("cross_attention", "cpu").supports_dropout


def _qkv(B, Hq, Hkv, Sq, Sk, D_, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    return mk(B, Hq, Sq, D_), mk(B, Hkv, Sk, D_), mk(B, Hkv, Sk, D_)


def _check(fn, q, k, v, mask, scale, p, softcap=None, seed=11):
    """fn(q, k, v) (the op with dropout_p=p) vs the float64 oracle / float32 base built with
    the mask regenerated from the seed the op draws after torch.manual_seed(seed)."""
    B, Hq, Sq, _ = q.shape
    Sk = k.shape[2]
    torch.manual_seed(seed)
    keep = D.mask(D.draw_seed(), B, Hq, Sq, Sk, p)
    assert 0 < keep.float().mean() < 1
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
    torch.manual_seed(seed)
    out = fn(qg, kg, vg)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad(out, (qg, kg, vg), dout)
    res = {}
    for name, dt in (("oracle", torch.float64), ("base", q.dtype)):
        ts = [t.detach().clone().to(dt).requires_grad_() for t in (q, k, v)]
        o = attention_dense(*ts, mask, scale, dt, softcap, keep, p)[0]
        res[name] = (o, *torch.autograd.grad(o, ts, dout.to(dt)))
    assert_close("out", out, res["oracle"][0], res["base"][0])
    for n, gr, i in zip(("dq", "dk", "dv"), grads, (1, 2, 3)):
        assert_close(n, gr, res["oracle"][i], res["base"][i], grad=True)
    # the dropout did something: the output differs from the no-dropout one
    assert not torch.allclose(out, fn.__wrapped__(q, k, v), atol=1e-3)


WINDOW_CASES = {
    "band": dict(window=(3, 2)),
    "causal_window": dict(window=(4, 0), causal=True),
    "globals": dict(window=(2, 2), global_tokens=3),
    "causal_globals": dict(window=(3, 0), causal=True, global_tokens=2),
    "full": dict(),
    "softcap": dict(window=(5, 5), softcap=1.5),
}


@pytest.mark.parametrize("backend,ref_path", BACKEND_PATHS, indirect=["ref_path"])
@pytest.mark.parametrize("case", sorted(WINDOW_CASES))
def test_window_dropout_matches_oracle(backend, ref_path, case):
    kw = WINDOW_CASES[case]
    B, Hq, Hkv, S, Dh, p = 2, 4, 2, 23, 16, 0.3
    q, k, v = _qkv(B, Hq, Hkv, S, S, Dh, seed=1)
    w = kw.get("window", (-1, -1))
    mask = window_mask(B, S, S, w[0], w[1], kw.get("causal", False), kw.get("global_tokens", 0))
    scale = Dh ** -0.5

    def fn(q_, k_, v_, p_=p):
        return window_attention(q_, k_, v_, dropout_p=p_, backend=backend, **kw)
    fn.__wrapped__ = lambda *t: fn(*t, p_=0.0)
    _check(fn, q, k, v, mask, scale, p, softcap=kw.get("softcap"))


@pytest.mark.parametrize("backend,ref_path", BACKEND_PATHS, indirect=["ref_path"])
def test_window_dropout_seqlens_offset(backend, ref_path):
    """Per-sample lengths (Lq != Lk: bottom-right alignment), a sample with no keys."""
    B, Hq, Sq, Sk, Dh, p = 3, 2, 9, 14, 8, 0.45
    q, k, v = _qkv(B, Hq, Hq, Sq, Sk, Dh, seed=2)
    sq, sk = torch.tensor([9, 5, 4]), torch.tensor([14, 11, 0])
    mask = window_mask(B, Sq, Sk, 4, 1, False, 2, sq, sk)

    def fn(q_, k_, v_, p_=p):
        return window_attention(q_, k_, v_, window=(4, 1), global_tokens=2, seqlens_q=sq,
                                seqlens_k=sk, dropout_p=p_, backend=backend)
    fn.__wrapped__ = lambda *t: fn(*t, p_=0.0)
    _check(fn, q, k, v, mask, Dh ** -0.5, p)
    torch.manual_seed(0)
    out = fn(q, k, v)
    assert torch.isfinite(out).all() and (out[2] == 0).all() and (out[1, :, 5:] == 0).all()


@pytest.mark.parametrize("backend,ref_path", BACKEND_PATHS, indirect=["ref_path"])
def test_window_dropout_key_bounds_key_mask(backend, ref_path):
    B, Hq, S, Dh, p = 2, 2, 17, 8, 0.2
    q, k, v = _qkv(B, Hq, 1, S, S, Dh, seed=3)
    i = torch.arange(S)
    lo = torch.stack([(i - 5).clamp(min=0), torch.zeros(S, dtype=torch.long)])
    hi = torch.stack([i + 1, torch.maximum(i + 1, torch.full_like(i, 6))])  # prefix-LM
    hi[0, 3] = lo[0, 3]  # a row that sees nothing
    km = torch.ones(B, S, dtype=torch.bool)
    km[0, 2] = km[1, 9:11] = False
    mask = bounds_mask(lo, hi, km)

    def fn(q_, k_, v_, p_=p):
        return window_attention(q_, k_, v_, key_bounds=(lo, hi), key_mask=km, dropout_p=p_,
                                backend=backend)
    fn.__wrapped__ = lambda *t: fn(*t, p_=0.0)
    _check(fn, q, k, v, mask, Dh ** -0.5, p)
    torch.manual_seed(0)
    assert (fn(q, k, v)[0, :, 3] == 0).all()


@pytest.mark.parametrize("backend,ref_path", BACKEND_PATHS, indirect=["ref_path"])
def test_cross_dropout_matches_oracle(backend, ref_path):
    B, Hq, Hkv, Sq, Sk, Dh, p = 2, 4, 1, 11, 7, 16, 0.35
    q, k, v = _qkv(B, Hq, Hkv, Sq, Sk, Dh, seed=4)
    sq, sk = torch.tensor([11, 6]), torch.tensor([5, 7])
    mask = with_lengths(B, Sq, Sk, sq, sk)[:, None]  # every valid row sees every valid key

    def fn(q_, k_, v_, p_=p):
        return cross_attention(q_, k_, v_, seqlens_q=sq, seqlens_k=sk, softcap=2.0,
                               dropout_p=p_, backend=backend)
    fn.__wrapped__ = lambda *t: fn(*t, p_=0.0)
    _check(fn, q, k, v, mask, Dh ** -0.5, p, softcap=2.0)


@pytest.mark.parametrize("backend,ref_path", BACKEND_PATHS_F64, indirect=["ref_path"])
def test_one_hot_values_reveal_dropped_weights(backend, ref_path):
    """v = I (Sk <= D): out[i, j] = P_ij · M_ij / (1 − p), independent of the mask helper —
    every weight is either dropped (0) or scaled by exactly 1 / (1 − p), and the kept set is
    the one D.mask regenerates from the drawn seed."""
    B, H, S, p = 1, 3, 16, 0.4
    q, k, _ = _qkv(B, H, H, S, S, 16, dtype=torch.float64, seed=5)
    v = torch.eye(S, dtype=torch.float64).expand(B, H, S, S).contiguous()
    P = window_attention(q, k, v, window=(6, 6), backend=backend)
    torch.manual_seed(21)
    out = window_attention(q, k, v, window=(6, 6), dropout_p=p, backend=backend)
    ratio = torch.where(P > 0, out / P.clamp_min(1e-300), torch.zeros_like(P))
    kept = (ratio - 1 / (1 - p)).abs() < 1e-12
    assert (kept | (ratio == 0)).all()
    assert (out[P == 0] == 0).all()
    torch.manual_seed(21)
    keep = D.mask(D.draw_seed(), B, H, S, S, p)
    assert torch.equal(kept, keep & (P > 0))


def test_dropout_zero_is_today(monkeypatch):
    """dropout_p=0 takes exactly today's path: same problem (no "dropout" key), same backend,
    bit-identical outputs and gradients."""
    import importlib
    W = importlib.import_module("mmcore.ops.window_attention")
    q, k, v = _qkv(2, 2, 2, 12, 12, 8, seed=6)
    probs = []
    real = W.problem
    monkeypatch.setattr(W, "problem", lambda *a, **kw: probs.append(real(*a, **kw)) or probs[-1])
    for backend in ("auto", "torch", "cpu"):
        outs = []
        for extra in ({}, {"dropout_p": 0.0}, {"dropout_p": 0}):
            qg = q.clone().requires_grad_()
            o = window_attention(qg, k, v, window=(3, 1), backend=backend, **extra)
            outs.append((o, torch.autograd.grad(o.sum(), qg)[0]))
        for o, g in outs[1:]:
            assert torch.equal(o, outs[0][0]) and torch.equal(g, outs[0][1])
    assert probs and all("dropout" not in p.extra for p in probs)
    c0 = cross_attention(q, k, v)
    assert torch.equal(c0, cross_attention(q, k, v, dropout_p=0.0))


@pytest.mark.parametrize("bad,err", [(-0.1, ValueError), (1.0, ValueError),
                                     (float("nan"), ValueError), (1.5, ValueError),
                                     ("0.1", TypeError), (True, TypeError), (None, TypeError)])
def test_dropout_p_validation(bad, err):
    q, k, v = _qkv(1, 1, 1, 4, 4, 8)
    with pytest.raises(err, match="dropout_p"):
        window_attention(q, k, v, dropout_p=bad)
    with pytest.raises(err, match="dropout_p"):
        cross_attention(q, k, v, dropout_p=bad)


def test_backend_without_dropout_refuses():
    q, k, v = _qkv(1, 2, 2, 8, 8, 8)
    for name in ("sdpa",):
        with pytest.raises(registry.BackendError, match="no dropout"):
            window_attention(q, k, v, dropout_p=0.1, backend=name)
        with pytest.raises(registry.BackendError, match="no dropout"):
            cross_attention(q, k, v, dropout_p=0.1, backend=name)
    # auto picks a declaring backend
    p = registry.Problem("window_attention", "cpu", torch.float32, head_dim=8,
                         extra={"Sq": 8, "Sk": 8, "window": (-1, -1), "dropout": True})
    impls, _ = registry.plan("window_attention", p)
    assert impls and all(i.supports_dropout for i in impls)


@pytest.mark.parametrize("name", ["auto"] + DROPOUT_BACKENDS)
def test_determinism_and_lse(name):
    q, k, v = _qkv(2, 2, 2, 20, 20, 8, seed=7)
    outs = {}
    for s in (1, 1, 2):
        torch.manual_seed(s)
        o, lse = window_attention(q, k, v, window=(5, 5), dropout_p=0.5, return_lse=True,
                                  backend=name)
        outs.setdefault(s, []).append(o)
        if name != "auto":  # lse is the un-dropped softmax's, on the same backend
            _, lse0 = window_attention(q, k, v, window=(5, 5), return_lse=True, backend=name)
            assert torch.equal(lse, lse0)
    assert torch.equal(outs[1][0], outs[1][1])
    assert not torch.allclose(outs[1][0], outs[2][0])
    # two calls in a row draw different seeds
    torch.manual_seed(1)
    a = window_attention(q, k, v, window=(5, 5), dropout_p=0.5, backend=name)
    b = window_attention(q, k, v, window=(5, 5), dropout_p=0.5, backend=name)
    assert not torch.allclose(a, b)


def test_mask_statistics():
    p = 0.3
    torch.manual_seed(0)
    m = D.mask(D.draw_seed(), 2, 4, 512, 512, p).float()  # 2M elements
    n = m.numel()
    sd = math.sqrt(p * (1 - p) / n)
    assert abs(m.mean().item() - (1 - p)) < 6 * sd
    # neighbours are independent: P(both kept) = (1 - p)^2 along rows, columns, heads, batch
    q2 = (1 - p) ** 2
    for a, b in ((m[..., 1:], m[..., :-1]), (m[..., 1:, :], m[..., :-1, :]),
                 (m[:, 1:], m[:, :-1]), (m[1:], m[:-1])):
        both = (a * b).mean().item()
        assert abs(both - q2) < 6 * math.sqrt(q2 * (1 - q2) / a.numel()), both
    # different seeds: different masks, about as different as independent ones
    m2 = D.mask(D.draw_seed(), 2, 4, 512, 512, p).float()
    assert abs((m * m2).mean().item() - q2) < 6 * math.sqrt(q2 * (1 - q2) / n)
    # p is honoured at the extremes of its range
    assert D.mask((1, 2), 1, 1, 64, 64, 0.0).all()
    assert D.mask((1, 2), 1, 2, 256, 256, 0.99).float().mean().item() < 0.02


def test_expectation_is_the_undropped_output():
    """E[out] over seeds = out without dropout (dropout is unbiased: kept / (1 - p))."""
    q, k, v = _qkv(1, 2, 2, 6, 6, 4, dtype=torch.float64, seed=8)
    ref = window_attention(q, k, v, window=(2, 2))
    torch.manual_seed(0)
    n = 1500
    outs = torch.stack([window_attention(q, k, v, window=(2, 2), dropout_p=0.25)
                        for _ in range(n)])
    mean, sd = outs.mean(0), outs.std(0)
    assert ((mean - ref).abs() <= 5 * sd / math.sqrt(n) + 1e-12).all()


@pytest.mark.parametrize("backend,ref_path", BACKEND_PATHS_F64, indirect=["ref_path"])
def test_gradcheck_fixed_mask(backend, ref_path):
    q, k, v = _qkv(1, 2, 1, 6, 7, 4, dtype=torch.float64, seed=9)
    scale = torch.tensor(0.7, dtype=torch.float64)

    def win(q_, k_, v_, s_):
        torch.manual_seed(5)  # the same mask in every evaluation
        return window_attention(q_, k_, v_, window=(2, 1), global_tokens=1, scale=s_,
                                softcap=3.0, dropout_p=0.3, backend=backend)

    def cross(q_, k_, v_):
        torch.manual_seed(6)
        return cross_attention(q_, k_, v_, seqlens_k=torch.tensor([5]), dropout_p=0.4,
                               backend=backend)
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    assert torch.autograd.gradcheck(win, (*ins, scale.clone().requires_grad_()))
    assert torch.autograd.gradgradcheck(lambda *t: win(*t, 0.7), ins)
    assert torch.autograd.gradcheck(cross, ins)


# ------------------------------------------------------------------ patched HF models, training
def _dropref(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """HF eager attention (bidirectional, 4-D additive mask) with the weights dropped by the
    mask mmcore's op regenerates from a seed drawn at the same point of the RNG stream."""
    B, H, Sq, Dh = query.shape
    Sk = key.shape[2]
    w = (query @ key.transpose(-1, -2)) * (scaling if scaling is not None else Dh ** -0.5)
    if attention_mask is not None:
        w = w + attention_mask[:, :, :, :Sk]
    w = torch.softmax(w, -1, dtype=torch.float64).to(query.dtype)
    if dropout and module.training:
        keep = D.mask(D.draw_seed(), B, H, Sq, Sk, dropout, query.device)
        w = w * keep / (1 - dropout)
    return (w @ value).transpose(1, 2).contiguous(), None


def test_patched_bert_training_with_dropout_matches_eager_with_the_same_mask():
    """A patched BERT with attention dropout 0.3 in train mode: every attention call on the
    op (no dense path), and with the same seeds its outputs and gradients equal HF eager's
    attention dropping the same weights (float64: exact up to rounding)."""
    import kit_patch as K
    import mmcore
    from mmcore.patch import hf_interface as hfi
    from transformers import AttentionInterface
    AttentionInterface.register("mmcore_test_dropref", _dropref)
    cfg, cls, _ = K.build("bert")
    cfg.attention_probs_dropout_prob = 0.3
    cfg.hidden_dropout_prob = 0.1  # other dropouts draw from the same generator in both runs
    torch.manual_seed(0)
    # separate config objects: mmcore.patch switches the config of the model it patches
    ref = cls._from_config(copy.deepcopy(cfg),
                           attn_implementation="mmcore_test_dropref").double().train()
    m = cls._from_config(copy.deepcopy(cfg), attn_implementation="eager").double().train()
    m.load_state_dict(ref.state_dict())
    mmcore.patch(m, backend="torch")  # "auto" keeps full-width dropout rows on the dense path
    ids = torch.randint(3, K.V, (3, 13))
    am = torch.ones(3, 13, dtype=torch.long)
    # no padding: with padding the interface may pack or gather the valid tokens, and the op's
    # mask then comes from other (sample, row, column) coordinates than eager's (the same
    # distribution, another draw); padded batches are checked in test_patch_families
    res = []
    for model in (ref, m):
        hfi.STATS.reset()
        torch.manual_seed(42)
        out = model(input_ids=ids, attention_mask=am).last_hidden_state
        loss = (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).sum()
        loss.backward()
        res.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                   if p.grad is not None}, hfi.STATS.as_dict()))
        assert torch.isfinite(loss)
    (o_ref, g_ref, st_ref), (o_mm, g_mm, st) = res
    assert st_ref["op_calls"] == 0 and st_ref["fallback_calls"] == 0, st_ref  # really HF's
    assert st["op_calls"] == cfg.num_hidden_layers and st["fallback_calls"] == 0, st
    valid = am.bool()
    assert (o_mm - o_ref)[valid].abs().max() < 1e-10
    for n, g in g_ref.items():
        assert (g_mm[n] - g).abs().max() < 1e-9 * max(1.0, g.abs().max().item()), n
    # and the dropout did something: eval mode (no dropout) gives another output
    m.eval()
    with torch.no_grad():
        o_eval = m(input_ids=ids, attention_mask=am).last_hidden_state
    assert (o_eval - o_mm)[valid].abs().max() > 1e-3


def test_patched_longformer_training_with_dropout_on_the_op(monkeypatch):
    import kit_patch as K
    import mmcore
    from mmcore.patch import hf_interface as hfi
    cfg, cls, kind = K.build("longformer")
    cfg.attention_probs_dropout_prob = 0.2
    torch.manual_seed(0)
    m = cls._from_config(cfg, attn_implementation="eager").train()
    mmcore.patch(m, backend="torch")  # "auto": window 8 of 16 keys is dense (wider than 1/4)
    for padding, glob in (("right", [0, 1]), ("holey", [3])):
        kw = K.inputs(kind, B=2, S=16, padding=padding, seed=2)
        gm = torch.zeros_like(kw["attention_mask"])
        gm[:, glob] = 1
        kw["global_attention_mask"] = gm * kw["attention_mask"]
        hfi.STATS.reset()
        torch.manual_seed(1)
        out = m(**kw).last_hidden_state
        out.sum().backward()
        assert hfi.STATS.fallback_calls == 0, hfi.STATS.fallback_reasons
        assert hfi.STATS.op_calls == cfg.num_hidden_layers
        assert torch.isfinite(out).all()
        assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
        torch.manual_seed(1)
        again = m(**kw).last_hidden_state
        assert torch.equal(again, out)  # reproducible under the same seed
    mmcore.patch(m)  # "auto"
    from mmcore.ops.backends import _loaders
    if _loaders.cpp_error("window_attention_fwd") is None:
        # the C++ cpu kernels serve dropout at full speed: on the op
        hfi.STATS.reset()
        m(**kw).last_hidden_state.sum().backward()
        assert hfi.STATS.op_calls == cfg.num_hidden_layers, hfi.STATS
        assert hfi.STATS.fallback_calls == 0, hfi.STATS
        from mmcore.ops import registry
        for op in ("window_attention", "cross_attention"):  # as if only torch served it
            monkeypatch.setattr(registry.get(op, "cpu"), "supports_dropout", False)
        registry.clear_cache()
        monkeypatch.setattr(registry, "_PLANS", {})
    # auto landing on the torch backend: rows see 9 of 16 keys, HF's own forward with the
    # reason
    hfi.STATS.reset()
    m(**kw).last_hidden_state.sum().backward()
    assert hfi.STATS.fallback_reasons == {
        hfi.dropout_dense_reason("auto", 9, 16): cfg.num_hidden_layers}, hfi.STATS


def test_opcheck_with_dropout():
    """The custom ops' schemas, fake kernels and autograd registrations take dropout_p / seed
    (what torch.compile traces)."""
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 1, 10, 10, 8, seed=10))
    seed = D.draw_seed()
    torch.library.opcheck(torch.ops.mmcore.window_attention_fwd.default,
                          (q, k, v, None, None, 3, 3, False, 1, 0.25, "torch", 0.0, None, None,
                           None, 0.2, seed))
    torch.library.opcheck(torch.ops.mmcore.cross_attention_fwd.default,
                          (q, k, v, None, torch.tensor([7]), 0.25, "torch", 0.0, 0.2, seed))


@pytest.mark.usefixtures("ref_path")
def test_dropout_keeps_the_nan_rules():
    """NaN / Inf in padding (a hidden query row, hidden keys and values) reaches no other row,
    forward or backward, with dropout as without."""
    B, H, S, Dh = 2, 2, 10, 8
    q, k, v = _qkv(B, H, H, S, S, Dh, seed=12)
    sl = torch.tensor([10, 6])
    qp, kp, vp = q.clone(), k.clone(), v.clone()
    qp[1, :, 7] = float("nan")
    kp[1, :, 8] = float("inf")
    vp[1, :, 6:] = float("nan")
    res = []
    for t in ((q, k, v), (qp, kp, vp)):
        ts = [x.clone().requires_grad_() for x in t]
        torch.manual_seed(4)
        out = window_attention(*ts, window=(2, 2), seqlens_q=sl, seqlens_k=sl, dropout_p=0.3,
                               backend="torch")
        out.sum().backward()
        res.append([out.detach()] + [x.grad for x in ts])
    valid = torch.arange(S)[None, :] < sl[:, None]  # (B, S)
    # the poisoned call always takes the chunked path (the clean one may be batched: the
    # same mask and formulas, another summation order)
    for a, b in zip(res[0], res[1]):
        sel = valid[:, None, :, None].expand_as(a)
        assert torch.isfinite(b[sel]).all()
        torch.testing.assert_close(b[sel], a[sel], rtol=1e-5, atol=1e-6)
    assert torch.isfinite(res[1][0]).all()
