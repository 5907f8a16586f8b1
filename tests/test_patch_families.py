"""mmcore.patch on tiny random models of every family (saved as safetensors and loaded back):
forward outputs and gradients of a training step within the tolerance rule (docs/design.md)
(oracle: unpatched model in float64; base: unpatched eager in float32), the report, unpatch,
and the exact fallbacks."""
import pytest
import torch

import kit_patch as K
import mmcore
from kit import assert_close
from mmcore.ops.registry import implementations
from mmcore.patch import hf_interface as hfi
from mmcore.patch.families import FAMILIES as FAMILY_CLASSES

FAMILIES = ["bert", "roberta", "xlm-roberta", "modernbert", "clip", "siglip", "mistral",
            "qwen2", "llama", "gemma3"]


def cpu_backends():
    """window_attention backends that serve every window problem of a model on CPU tensors,
    with gradients (torch, cpu C++, interpreted triton; not sdpa, which takes dense and
    offset-0 causal windows only, nor flex, which has no CPU backward)."""
    from mmcore.ops.registry import Problem

    p = Problem("window_attention", "cpu", torch.float32, head_dim=16, needs_grad=True,
                global_tokens=1, seqlens=True,
                extra={"Sq": 11, "Sk": 11, "window": (3, 3), "causal": False, "aligned": False})
    return [i.backend for i in implementations("window_attention") if not i.refuse(p)]


@pytest.mark.parametrize("family", FAMILIES)
def test_family_forward_and_grads(family):
    m, kind = K.load(family)
    rep = mmcore.patch(m)
    assert rep.replaced and all("mmcore" in w for _, w in rep.replaced)
    n_attn = sum(1 for _, mod in m.named_modules() if type(mod).__name__ in
                 FAMILY_CLASSES)
    assert len(rep.replaced) == n_attn
    hfi.STATS.reset()
    m.train()  # a training step (dropouts are 0 in these configs)
    K.compare(family, m, kind, K.inputs(kind, padding="left" if kind == "decoder" else "right"))
    assert hfi.STATS.op_calls > 0 and hfi.STATS.fallback_calls == 0, hfi.STATS.fallback_reasons
    # the report counts this model's calls (the compare() references are unpatched models)
    assert rep.runtime.op_calls == hfi.STATS.op_calls and rep.fallback_calls == 0
    assert f"{rep.runtime.op_calls} attention calls on the mmcore op, 0 on the dense" in str(rep)


@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b != "torch"] or ["torch"])
@pytest.mark.parametrize("family", ["bert", "mistral"])
def test_family_other_cpu_backends(family, backend):
    m, kind = K.load(family)
    mmcore.patch(m, backend=backend)
    kw = K.inputs(kind, B=2, S=11, padding="left" if kind == "decoder" else "right")
    K.compare(family, m, kind, kw)


def test_module_tree_and_weights_kept_and_unpatch():
    m, kind = K.load("qwen2")
    names = [n for n, _ in m.named_modules()]
    params = {n: p for n, p in m.named_parameters()}
    impl = m.config._attn_implementation
    kw = K.inputs(kind)
    ref = m(**kw).logits
    rep = mmcore.patch(m)
    assert m.config._attn_implementation == "mmcore"
    assert [n for n, _ in m.named_modules()] == names
    assert all(p is params[n] for n, p in m.named_parameters())
    assert "model.layers.0.self_attn" in rep.replaced_names
    mmcore.unpatch(m)
    assert m.config._attn_implementation == impl
    assert not any(hasattr(mod, "_mmcore_backend") for mod in m.modules())
    assert torch.equal(m(**kw).logits, ref)
    mmcore.unpatch(m)  # idempotent


def test_gemma2_patched_with_softcap_on_the_op():
    """Issue 26: Gemma2 (attention logit softcapping) was left on HF's implementation; it is
    patched now, the cap going to the op's softcap: forward and gradients equal eager."""
    from mmcore.patch import hf_interface as hfi
    m, kind = K.load("gemma2")
    rep = mmcore.patch(m)
    assert not rep.left and len(rep.replaced) == 2, rep
    assert m.config._attn_implementation == "mmcore"
    hfi.STATS.reset()
    K.compare("gemma2", m, kind, K.inputs(kind, B=2, S=13, padding="left"))
    assert hfi.STATS.op_calls == 2 and hfi.STATS.fallback_calls == 0, hfi.STATS


def test_output_attentions_config_left():
    import transformers as T
    cfg, cls, _ = K.build("bert")
    cfg.output_attentions = True
    m = cls._from_config(cfg, attn_implementation="eager")
    rep = mmcore.patch(m)
    assert not rep.replaced and all("output_attentions" in r for _, r in rep.left)
    assert isinstance(cfg, T.BertConfig)


def _torch_only_dropout(monkeypatch):
    """The registry as where only the torch reference serves dropout (CUDA tensors, or a CPU
    build without mmcore._C): the C++ cpu kernels stop declaring it."""
    from mmcore.ops import registry
    for op in ("window_attention", "cross_attention"):
        monkeypatch.setattr(registry.get(op, "cpu"), "supports_dropout", False)
    registry.clear_cache()
    monkeypatch.setattr(registry, "_PLANS", {})  # and again once the test is done


def test_attention_dropout_training_on_the_op_under_auto_where_rows_are_narrow(monkeypatch):
    """Under "auto" a dropout call goes to the op whenever auto's backend for it serves dropout
    at full speed (the C++ cpu kernels on CPU tensors): Mistral's sliding window 6 over 32
    tokens and over 12 tokens are both on the op.  Where auto would land on the torch backend
    (2-2.5x the dense path's time for equal work) the op takes it only where its rows see at
    most DROPOUT_OP_MAX_SHARE of the keys: 32 tokens on the op, 12 dense with the reason."""
    cfg, cls, _ = K.build("mistral")
    cfg.attention_dropout = 0.3
    m = cls._from_config(cfg, attn_implementation="eager")
    mmcore.patch(m)
    m.train()
    layers = cfg.num_hidden_layers
    q12 = torch.empty(2, cfg.num_attention_heads, 12, cfg.head_dim or 8)
    if hfi.auto_dropout_backend(q12) == "cpu":  # mmcore._C built: the C++ kernels serve it
        assert hfi.dropout_dense_reason("auto", 12, 12, q12) is None
        for S in (32, 12):
            hfi.STATS.reset()
            m(input_ids=torch.randint(3, K.V, (2, S)))
            assert hfi.STATS.op_calls == layers and hfi.STATS.fallback_calls == 0, hfi.STATS
        _torch_only_dropout(monkeypatch)
    assert hfi.auto_dropout_backend(q12) == "torch"
    hfi.STATS.reset()
    m(input_ids=torch.randint(3, K.V, (2, 32)))
    assert hfi.STATS.op_calls == layers and hfi.STATS.fallback_calls == 0, hfi.STATS
    hfi.STATS.reset()
    m(input_ids=torch.randint(3, K.V, (2, 12)))
    assert hfi.STATS.fallback_calls == layers and hfi.STATS.op_calls == 0, hfi.STATS
    assert hfi.dropout_dense_reason("auto", 6, 12) in hfi.STATS.fallback_reasons
    assert hfi.dropout_dense_reason("auto", 6, 12, q12) in hfi.STATS.fallback_reasons
    assert hfi.dropout_dense_reason("auto", 6, 32) is None
    assert hfi.dropout_dense_reason("torch", 12, 12) is None  # a named backend is honoured


@pytest.mark.parametrize("G", [0, 2])
def test_longformer_window_and_global_projections(G):
    """Longformer: window attention_window/2 each side + a global prefix whose rows use the
    query/key/value_global projections -- exact, forward and gradients."""
    m, kind = K.load("longformer")
    rep = mmcore.patch(m)
    assert len(rep.replaced) == 2 and all("longformer" in w for _, w in rep.replaced)
    kw = K.inputs(kind, B=3, S=21)
    kw["global_attention_mask"] = torch.zeros_like(kw["attention_mask"])
    kw["global_attention_mask"][:, :G] = 1
    hfi.STATS.reset()
    m.train()
    K.compare("longformer", m, kind, kw, grads=False)
    # gradients without padding: HF's Longformer gives NaN gradients in float64 when the
    # batch is padded (finfo(float64).min sums overflow in its diagonal mask), so the fp64
    # oracle only exists for unpadded batches
    kw["attention_mask"][:] = 1
    K.compare("longformer", m, kind, kw)
    assert hfi.STATS.op_calls == 4 and hfi.STATS.fallback_calls == 0


def test_longformer_output_attentions_on_the_op():
    """output_attentions=True is served by the op (the weights recomputed from its lse;
    tests/test_patch_longformer_attentions.py has the full checks)."""
    m, kind = K.load("longformer")
    ref, _ = K.load("longformer")
    mmcore.patch(m)
    kw = K.inputs(kind, B=2, S=16)
    kw["global_attention_mask"] = torch.zeros_like(kw["attention_mask"])
    kw["global_attention_mask"][:, 5] = 1
    hfi.STATS.reset()
    out = m(**kw, output_attentions=True)
    assert hfi.STATS.op_calls == 2 and hfi.STATS.fallback_calls == 0, hfi.STATS.as_dict()
    want = ref(**kw, output_attentions=True)
    valid = kw["attention_mask"].bool()
    torch.testing.assert_close(out.last_hidden_state[valid], want.last_hidden_state[valid])
    torch.testing.assert_close(out.attentions, want.attentions)
    torch.testing.assert_close(out.global_attentions, want.global_attentions)
    mmcore.unpatch(m)
    assert not any("forward" in x.__dict__ for x in m.modules())


def test_siglip_pooling_head_reported():
    m, _ = K.load("siglip")
    rep = mmcore.patch(m)
    assert any(n.endswith("head.attention") for n in rep.left_names)


_LAST_REPORT = []


def _served_case(family, kw, valid=None, backend="auto"):
    """mmcore (patched) vs the unpatched model: the tolerance rule on the valid rows, and the
    number of op calls / dense fallbacks."""
    m, kind = K.load(family)
    _LAST_REPORT[:] = [mmcore.patch(m, backend=backend)]
    base, _ = K.load(family)
    oracle = K.load(family, "sdpa")[0].double()
    hfi.STATS.reset()
    with torch.no_grad():
        out = m(**kw).logits
        stats = hfi.STATS.as_dict()
        ref = oracle(**kw).logits
        b = base(**kw).logits
    if valid is not None:
        out, ref, b = out[valid], ref[valid], b[valid]
    assert_close(family, out, ref, b)
    return stats


def test_packed_sequences_served_by_the_op():
    """Issue 17: position_ids restarting inside a row (packed sequences) took the dense path;
    now each segment is attended on its own by the op (causal, and sliding window)."""
    ids = torch.randint(3, K.V, (2, 14))
    pos = torch.cat([torch.arange(6), torch.arange(8)])[None].expand(2, -1).clone()
    pos[1] = torch.cat([torch.arange(3), torch.arange(9), torch.arange(2)])
    for family in ("llama", "mistral"):  # full causal; sliding window 6 (segments longer)
        st = _served_case(family, {"input_ids": ids, "position_ids": pos, "use_cache": False})
        assert st["op_calls"] == 2 and st["fallback_calls"] == 0, st


def test_holey_padding_served_by_the_op():
    """Issue 17: a padding mask with holes took the dense path ("not one contiguous run");
    causal full attention is exact on the compacted tokens."""
    ids = torch.randint(3, K.V, (3, 12))
    am = torch.ones(3, 12, dtype=torch.long)
    am[0, 3] = 0  # a hole
    am[1, :2] = 0  # left padding and a hole
    am[1, 7:9] = 0
    am[2, 10:] = 0  # right padding
    st = _served_case("llama", {"input_ids": ids, "attention_mask": am}, am.bool())
    assert st["op_calls"] == 2 and st["fallback_calls"] == 0, st


def test_holey_padding_in_a_sliding_window_layer(monkeypatch):
    """A sliding window counts positions, holes included: compaction would shorten distances,
    so those layers run the op on the keys as they are with the padding as key_mask (issue 26;
    they took the dense path), on `auto` and on the C++ CPU kernel.  A forced backend that does
    not serve key_mask (the C++ kernel with its declaration switched off here) still takes the
    dense path there, exactly, and the patch report counts it."""
    from mmcore.ops import registry

    ids = torch.randint(3, K.V, (2, 16))
    am = torch.ones(2, 16, dtype=torch.long)
    am[0, 5:7] = 0
    # qwen2 here: layer 0 full attention, layers 1-2 sliding (max_window_layers=1)
    st = _served_case("qwen2", {"input_ids": ids, "attention_mask": am}, am.bool())
    assert st == {"op_calls": 3, "fallback_calls": 0, "fallback_reasons": {}}, st
    st = _served_case("qwen2", {"input_ids": ids, "attention_mask": am}, am.bool(), "cpu")
    assert st == {"op_calls": 3, "fallback_calls": 0, "fallback_reasons": {}}, st
    monkeypatch.setattr(registry.get("window_attention", "cpu"), "supports_key_mask", False)
    registry.clear_cache()
    st = _served_case("qwen2", {"input_ids": ids, "attention_mask": am}, am.bool(), "cpu")
    rep = _LAST_REPORT[0]
    assert rep.fallback_calls == 2 and "2x: holes in the padding" in str(rep)
    assert st["fallback_reasons"] == {"holes in the padding of a sliding-window layer": 2}, st
    assert st["op_calls"] == 1, st
    registry.clear_cache()


def test_attention_dropout_training_on_the_op(monkeypatch):
    import transformers as T
    cfg, cls, _ = K.build("bert")
    cfg.attention_probs_dropout_prob = 0.5
    m = cls._from_config(cfg, attn_implementation="eager")
    mmcore.patch(m)
    m.train()
    from mmcore.ops.backends import _loaders
    if _loaders.cpp_error("window_attention_fwd") is None:
        # "auto" on CPU: the C++ cpu kernels serve dropout at full speed, on the op
        hfi.STATS.reset()
        m(input_ids=torch.randint(3, K.V, (1, 9)))
        assert hfi.STATS.op_calls == 2 and hfi.STATS.fallback_calls == 0, hfi.STATS
        _torch_only_dropout(monkeypatch)
    # "auto" landing on the torch backend: full-width rows with dropout stay on the (faster)
    # dense path, with the reason
    hfi.STATS.reset()
    m(input_ids=torch.randint(3, K.V, (1, 9)))
    assert hfi.STATS.fallback_reasons == {hfi.dropout_dense_reason("auto", 9, 9): 2}, hfi.STATS
    # the torch backend named: on the op
    for mod in m.modules():
        if hasattr(mod, "_mmcore_backend"):
            monkeypatch.setattr(mod, "_mmcore_backend", "torch", raising=False)
    hfi.STATS.reset()
    m(input_ids=torch.randint(3, K.V, (1, 9)))
    assert hfi.STATS.op_calls == 2 and hfi.STATS.fallback_calls == 0, hfi.STATS
    # a forced backend that does not serve dropout (cpu, here without it): the dense path,
    # with the reason
    for mod in m.modules():
        if hasattr(mod, "_mmcore_backend"):
            monkeypatch.setattr(mod, "_mmcore_backend", "cpu", raising=False)
    hfi.STATS.reset()
    m(input_ids=torch.randint(3, K.V, (1, 9)))
    assert hfi.STATS.fallback_reasons == {
        "attention dropout while training (backend 'cpu' does not serve dropout)": 2}, hfi.STATS
    m.eval()
    hfi.STATS.reset()
    m(input_ids=torch.randint(3, K.V, (1, 9)))
    assert hfi.STATS.op_calls == 2 and hfi.STATS.fallback_calls == 0
    assert isinstance(cfg, T.BertConfig)


def test_patch_rejects_bad_arguments():
    m, _ = K.load("bert")
    with pytest.raises(TypeError, match="model"):
        mmcore.patch("not a model")
    with pytest.raises(TypeError, match="long_context"):
        mmcore.patch(m, long_context=128)
    with pytest.raises(ValueError, match="long_context"):
        mmcore.patch(m, attention=False, long_context=mmcore.LongContext(window=4))
    with pytest.raises(ValueError, match="window"):
        mmcore.LongContext(window=-1)
