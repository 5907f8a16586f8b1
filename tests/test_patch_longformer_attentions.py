"""Longformer with output_attentions=True on the op (mmcore.patch.longformer): HF's banded
``attentions`` (B, H, S, G_max + 2w + 1) and ``global_attentions`` (B, H, S, G_max) recomputed
from the op's lse, vs a dense fp64 oracle built from the mask (layer level) and vs HF's own
forward (model level: outputs, attentions, global attentions, gradients) -- prefix layout,
global tokens anywhere, left / holey padding, dropout while training."""
import math

import pytest
import torch

import kit_patch as K
import mmcore
from kit import assert_close
from mmcore.patch import hf_interface as hfi


# ------------------------------------------------------------------ dense fp64 oracle
def _dense_oracle(layer, hs, am):
    """LongformerSelfAttention's math in float64 with the (S, S) mask built explicitly.

    hs (B, S, E), am (B, S) in HF's -10000 / 0 / +10000 form -> (out (B, S, E), attn_probs
    (B, S, H, G + 2w + 1), global_attn_probs (B, H, G, S) or None); rows of padding tokens
    are 0, rows of global tokens 0 in attn_probs, empty global slots 1 / S."""
    lay = {n: getattr(layer, n) for n in ("query", "key", "value", "query_global",
                                          "key_global", "value_global")}
    x = hs.detach().double()
    B, S, E = x.shape
    H, D, w = layer.num_heads, layer.head_dim, layer.one_sided_attn_window_size

    def proj(n):
        lin = lay[n]
        return (x @ lin.weight.double().T + lin.bias.double()).view(B, S, H, D).transpose(1, 2)

    q, k, v, qg, kg, vg = (proj(n) for n in ("query", "key", "value", "query_global",
                                             "key_global", "value_global"))
    valid, glob = am >= 0, am > 0
    local = valid & ~glob
    i = torch.arange(S)
    near = (i[:, None] - i[None]).abs() <= w  # (S, S)
    allow = (near[None] & local[:, None, :]) | glob[:, None, :]  # (B, S, S) for local rows
    s = (q @ k.transpose(-1, -2)) / math.sqrt(D)
    p = torch.softmax(s.masked_fill(~allow[:, None], float("-inf")), -1)
    p = torch.where(local[:, None, :, None], p, torch.zeros((), dtype=p.dtype))
    sg = (qg @ kg.transpose(-1, -2)) / math.sqrt(D)
    pg = torch.softmax(sg.masked_fill(~valid[:, None, None, :], float("-inf")), -1)
    out = torch.where(glob[:, None, :, None], pg @ vg, p @ v)
    out = torch.where(valid[:, None, :, None], out, torch.zeros((), dtype=out.dtype))
    n_g = glob.sum(1)
    G = int(n_g.max())
    band = torch.zeros(B, H, S, 2 * w + 1, dtype=p.dtype)
    for d in range(-w, w + 1):
        for r in range(S):
            j = r + d
            if 0 <= j < S:
                band[:, :, r, w + d] = torch.where(local[:, j, None], p[:, :, r, j], 0.0)
    gcols = torch.zeros(B, H, S, G, dtype=p.dtype)
    gprobs = torch.full((B, H, G, S), 1.0 / S, dtype=p.dtype)
    for b in range(B):
        for c, t in enumerate(torch.nonzero(glob[b]).flatten().tolist()):
            gcols[b, :, :, c] = p[b, :, :, t]
            gprobs[b, :, c] = pg[b, :, t]
    probs = torch.cat([gcols, band], -1).transpose(1, 2)
    return out.transpose(1, 2).reshape(B, S, E), probs, (gprobs if G else None)


def _layer_inputs(S, B, padding, globals_at, E=32, seed=0):
    """hs (B, S, E) and HF's layer mask (-10000 pad / 0 local / +10000 global)."""
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(B, S, E, generator=g)
    am = torch.zeros(B, S)
    lens = [S, S - 5, S // 2][:B]
    for b, n in enumerate(lens):
        if padding == "right":
            am[b, n:] = -10000.0
        elif padding in ("left", "holey"):
            am[b, :S - n] = -10000.0
    if padding == "holey":
        am[0, S // 3] = -10000.0
        am[1, S - 3:S - 1] = -10000.0
    for b, pos in enumerate(globals_at):
        for t in pos:
            if am[b, t] == 0:
                am[b, t] = 10000.0
    return hs, am


def _call(layer, hs, am):
    return layer(hs, attention_mask=am, is_index_masked=am < 0, is_index_global_attn=am > 0,
                 is_global_attn=bool((am > 0).any()), output_attentions=True)


LAYOUTS = {  # (padding, global positions per sample)
    "prefix": ("right", [[0, 1], [0, 1], [0, 1]]),
    "prefix-none": ("right", [[], [], []]),
    "anywhere-none-padded": ("left", [[], [], []]),
    "anywhere-left": ("left", [[7, 23], [20], []]),
    "anywhere-holey": ("holey", [[8, 13, 23], [11, 12], [15]]),
    "anywhere-unpadded": ("none", [[0, 9, 23], [4, 5, 17], [2, 12, 13]]),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layer_attentions_vs_dense_oracle(layout):
    padding, glob = LAYOUTS[layout]
    m, _ = K.load("longformer")
    layer = m.encoder.layer[0].attention.self
    base = K.load("longformer")[0].encoder.layer[0].attention.self
    mmcore.patch(m)
    hs, am = _layer_inputs(24, 3, padding, glob, seed=len(layout))
    hfi.STATS.reset()
    got = _call(layer, hs, am)
    assert hfi.STATS.op_calls == 1 and hfi.STATS.fallback_calls == 0, hfi.STATS
    want = _call(base, hs, am)
    out64, probs64, gprobs64 = _dense_oracle(base, hs, am)
    assert len(got) == len(want) == (3 if gprobs64 is not None else 2)
    valid = am >= 0
    assert_close(f"{layout}.out", got[0][valid], out64[valid], want[0][valid])
    assert got[1].shape == want[1].shape and got[1].dtype == want[1].dtype == torch.float32
    assert_close(f"{layout}.attn_probs", got[1], probs64, want[1])
    # zeros exactly where HF has zeros (padding / global rows, masked and out-of-range keys)
    assert torch.equal(got[1] == 0, want[1] == 0)
    if gprobs64 is not None:
        assert got[2].shape == want[2].shape and got[2].dtype == want[2].dtype
        slot_ok = torch.arange(got[2].shape[2])[None] < (am > 0).sum(1)[:, None]  # (B, G)
        sel = slot_ok[:, None, :, None].expand(got[2].shape)
        assert_close(f"{layout}.global_attn_probs", got[2][sel], gprobs64[sel], want[2][sel])
        assert torch.equal(got[2][~sel], want[2][~sel])  # HF's empty slots: 1 / S
        assert torch.equal(got[2] == 0, want[2] == 0)


def test_layer_attentions_wide_window_and_short_sequence():
    """w = 12 > S / 2 (band wider than the sequence: HF pads S to 2w itself), 1 head dim
    block, a global token at the end."""
    cfg, cls, _ = K.build("longformer")
    cfg.attention_window = 24
    torch.manual_seed(3)
    m = cls._from_config(cfg, attn_implementation="eager").eval()
    base = cls._from_config(cfg, attn_implementation="eager").eval()
    base.load_state_dict(m.state_dict())
    mmcore.patch(m)
    layer, blayer = m.encoder.layer[1].attention.self, base.encoder.layer[1].attention.self
    hs, am = _layer_inputs(24, 3, "right", [[23], [0], []], seed=5)
    got, want = _call(layer, hs, am), _call(blayer, hs, am)
    out64, probs64, gprobs64 = _dense_oracle(blayer, hs, am)
    assert got[1].shape == (3, 24, 4, 1 + 25)
    assert_close("wide.attn_probs", got[1], probs64, want[1])
    assert torch.equal(got[1] == 0, want[1] == 0)


# ------------------------------------------------------------------ model level vs HF
def _model_case(padding, glob, B=3, S=21, seed=2):
    kw = K.inputs("encoder", B=B, S=S, padding=padding, seed=seed)
    gm = torch.zeros_like(kw["attention_mask"])
    for b, pos in enumerate(glob):
        gm[b, pos] = 1
    kw["global_attention_mask"] = gm * kw["attention_mask"]
    return kw


MODEL_CASES = {
    "prefix": ("right", [[0, 1], [0, 1], [0, 1]]),
    "no-globals": ("right", [[], [], []]),
    "anywhere-left": ("left", [[7, 20], [19], []]),
    "anywhere-holey": ("holey", [[9, 12, 20], [10], [14, 15]]),
}


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_model_output_attentions_on_the_op(case):
    padding, glob = MODEL_CASES[case]
    m, _ = K.load("longformer")
    rep = mmcore.patch(m)
    base, _ = K.load("longformer")
    oracle = K.load_oracle("longformer")
    kw = _model_case(padding, glob)
    hfi.STATS.reset()
    got = m(**kw, output_attentions=True)
    assert hfi.STATS.op_calls == 2 and hfi.STATS.fallback_calls == 0, hfi.STATS.as_dict()
    assert rep.runtime.op_calls == 2
    want = base(**kw, output_attentions=True)
    ref = oracle(**kw, output_attentions=True)
    valid = kw["attention_mask"].bool()
    assert_close(f"{case}.hidden", got.last_hidden_state[valid], ref.last_hidden_state[valid],
                 want.last_hidden_state[valid])
    assert len(got.attentions) == len(want.attentions) == 2
    for n, (a, b, o) in enumerate(zip(got.attentions, want.attentions, ref.attentions)):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert_close(f"{case}.attentions[{n}]", a, o, b)
        assert torch.equal(a == 0, b == 0)
    if want.global_attentions is None:
        assert got.global_attentions is None
        return
    G = want.global_attentions[0].shape[-1]
    slot_ok = torch.arange(G)[None] < kw["global_attention_mask"].sum(1)[:, None]
    for n, (a, b, o) in enumerate(zip(got.global_attentions, want.global_attentions,
                                      ref.global_attentions)):
        assert a.shape == b.shape and a.dtype == b.dtype
        sel = slot_ok[:, None, None, :].expand(a.shape)
        assert_close(f"{case}.global_attentions[{n}]", a[sel], o[sel], b[sel])
        assert torch.equal(a[~sel], b[~sel])  # empty slots: HF's 1 / S


def test_model_return_dict_false_tuple_structure():
    m, _ = K.load("longformer")
    mmcore.patch(m)
    base, _ = K.load("longformer")
    for glob in ([[0], [3], [5]], [[], [], []]):
        kw = _model_case("right", glob, S=16)
        got = m(**kw, output_attentions=True, output_hidden_states=True, return_dict=False)
        want = base(**kw, output_attentions=True, output_hidden_states=True, return_dict=False)
        assert len(got) == len(want)
        for a, b in zip(got, want):
            if isinstance(b, tuple):
                assert len(a) == len(b) and all(x.shape == y.shape for x, y in zip(a, b))
            else:
                assert a.shape == b.shape


def test_config_output_attentions_patched_not_left():
    cfg, cls, _ = K.build("longformer")
    cfg.output_attentions = True
    torch.manual_seed(0)
    m = cls._from_config(cfg, attn_implementation="eager").eval()
    rep = mmcore.patch(m)
    assert len(rep.replaced) == 2 and not rep.left, rep.left
    hfi.STATS.reset()
    out = m(**_model_case("right", [[0], [0], [0]], S=16))
    assert out.attentions is not None and out.global_attentions is not None
    assert hfi.STATS.op_calls == 2 and hfi.STATS.fallback_calls == 0


def test_model_gradients_through_the_attentions():
    """HF's attentions are differentiable: a loss on hidden states + attentions + global
    attentions gives HF's parameter gradients (no padding: HF's fp64 gradients are NaN with
    padding)."""
    res = {}
    kw = _model_case("none", [[0, 9, 20], [4, 5, 17], [2, 12, 13]])
    for name in ("patched", "base", "oracle"):
        if name == "oracle":
            m = K.load_oracle("longformer")
        else:
            m, _ = K.load("longformer")
            if name == "patched":
                mmcore.patch(m)
        hfi.STATS.reset()
        o = m(**kw, output_attentions=True)
        if name == "patched":
            assert hfi.STATS.op_calls == 2 and hfi.STATS.fallback_calls == 0
        g = torch.Generator().manual_seed(11)
        loss = 0
        for t in (o.last_hidden_state,) + o.attentions + o.global_attentions:
            loss = loss + (t * torch.randn(t.shape, generator=g, dtype=torch.float64)
                           .to(t.dtype)).sum()
        loss.backward()
        res[name] = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    names = [n for n in res["oracle"] if "attention.self" in n and n.endswith("weight")]
    assert any("query.weight" in n for n in names) and any("key_global" in n for n in names)
    for n in names:
        assert_close(f"grad[{n}]", res["patched"][n], res["oracle"][n], res["base"][n],
                     grad=True)


def test_attentions_gradient_flows_to_queries_and_keys():
    """The recomputed weights carry the softmax's full gradient (lse included): a loss on
    the attentions alone gives HF's gradients of the query / key projections."""
    kw = _model_case("none", [[0, 20], [3, 4], [1, 9]])
    grads = []
    for patched in (True, False):
        m, _ = K.load("longformer")
        if patched:
            mmcore.patch(m)
        o = m(**kw, output_attentions=True)
        g = torch.Generator().manual_seed(5)
        loss = sum((a * torch.randn(a.shape, generator=g)).sum() for a in o.attentions)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()
                      if p.grad is not None and "layer.1.attention.self" in n})
    assert set(grads[0]) == set(grads[1]) and any("query.weight" in n for n in grads[0])
    for n, g in grads[1].items():
        torch.testing.assert_close(grads[0][n], g, rtol=1e-4, atol=1e-5, msg=n)


# ------------------------------------------------------------------ dropout while training
def _band_to_dense(probs, am, w):
    """attn_probs (B, S, H, G + 2w + 1) -> (B, H, S, S) dense weights over the keys."""
    B, S, H, C = probs.shape
    G = C - 2 * w - 1
    dense = torch.zeros(B, H, S, S, dtype=torch.float64)
    p = probs.double().transpose(1, 2)
    for b in range(B):
        for c, t in enumerate(torch.nonzero(am[b] > 0).flatten().tolist()):
            dense[b, :, :, t] += p[b, :, :, c]
    for d in range(-w, w + 1):
        for r in range(S):
            if 0 <= r + d < S:
                dense[:, :, r, r + d] += p[:, :, r, G + w + d]
    return dense


def _dropout_backends():
    """The CPU backends of window_attention that declare dropout (the weights' dropout mask
    is rebuilt from the reference hash: each of them must reproduce it)."""
    from mmcore.ops import registry
    return [i.backend for i in registry.implementations("window_attention")
            if i.supports_dropout and "cpu" in i.devices and i.available() is None]


def test_dropout_backends_include_the_reference():
    assert "torch" in _dropout_backends()


@pytest.mark.parametrize("backend", _dropout_backends())
@pytest.mark.parametrize("layout", ["prefix", "anywhere-holey", "prefix-none"])
def test_dropout_attentions_are_the_ops_dropped_weights(layout, backend):
    """Training with attention dropout (each backend that serves it): the returned
    weights are the dropped ones the op used -- the layer's output is exactly them times
    the values -- and a kept weight is the un-dropped one / (1 - p)."""
    padding, glob = LAYOUTS[layout]
    cfg, cls, _ = K.build("longformer")
    cfg.attention_probs_dropout_prob = 0.3
    torch.manual_seed(0)
    m = cls._from_config(cfg, attn_implementation="eager").train()
    mmcore.patch(m, backend=backend)
    layer = m.encoder.layer[0].attention.self
    hs, am = _layer_inputs(24, 3, padding, glob, seed=7)
    hfi.STATS.reset()
    torch.manual_seed(1)
    got = _call(layer, hs, am)
    assert hfi.STATS.op_calls == 1 and hfi.STATS.fallback_calls == 0, hfi.STATS.as_dict()
    torch.manual_seed(1)
    again = _call(layer, hs, am)
    assert all(torch.equal(a, b) for a, b in zip(got, again))
    B, S, E = hs.shape
    H, D, w = layer.num_heads, layer.head_dim, layer.one_sided_attn_window_size
    x = hs.double()
    v = (x @ layer.value.weight.double().T + layer.value.bias.double()).view(B, S, H, D)
    vg = (x @ layer.value_global.weight.double().T + layer.value_global.bias.double()
          ).view(B, S, H, D)
    dense = _band_to_dense(got[1], am, w)  # (B, H, S, S)
    out = (dense @ v.transpose(1, 2)).transpose(1, 2)  # (B, S, H, D)
    glob_t = am > 0
    if len(got) == 3:
        og = got[2].double() @ vg.transpose(1, 2)  # (B, H, G, D)
        for b in range(B):
            for c, t in enumerate(torch.nonzero(glob_t[b]).flatten().tolist()):
                out[b, t] = og[b, :, c]
    valid = am >= 0
    err = (got[0].double().view(B, S, H, D) - out)[valid].abs().max().item()
    assert err < 1e-5, err
    # some weights dropped, kept ones scaled by 1 / (1 - p)
    layer.eval()
    clean = _call(layer, hs, am)
    layer.train()
    on = clean[1] > 0
    ratio = got[1][on] / clean[1][on]
    assert (ratio == 0).float().mean() > 0.1
    kept = ratio[ratio > 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / 0.7))


def test_attentions_memory_is_banded():
    """S = 2048, w = 4: no op of the patched layer allocates anything near an (S, S) score
    matrix (B·H·S² fp32 = 64 MiB); the largest single allocation is O(B·H·S·(w + G)·D)."""
    from torch.profiler import ProfilerActivity, profile
    m, _ = K.load("longformer")
    mmcore.patch(m)
    layer = m.encoder.layer[0].attention.self
    S = 2048
    hs, am = torch.randn(1, S, 32), torch.zeros(1, S)
    am[0, [5, 1000]] = 10000.0
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = _call(layer, hs, am)
    assert out[1].shape == (1, S, 4, 2 + 9) and out[2].shape == (1, 4, 2, S)
    biggest = max(e.cpu_memory_usage for e in prof.events())
    assert 0 < biggest <= 2 * 1024 * 1024, biggest  # 1/32 of the (S, S) scores
