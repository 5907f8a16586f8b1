"""mmcore.patch on tiny random models of every family (saved as safetensors and loaded back):
forward outputs and gradients of a training step within the DESIGN.md tolerance rule
(oracle: unpatched model in float64; base: unpatched eager in float32), the report, unpatch,
and the exact fallbacks."""
import pytest
import torch

import kit_patch as K
import mmcore
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


def test_gemma2_softcapping_left_and_reported():
    m, kind = K.load("gemma2")
    kw = K.inputs(kind)
    ref = m(**kw).logits
    rep = mmcore.patch(m)
    assert not rep.replaced
    assert rep.left and all("softcapping" in r for _, r in rep.left)
    assert m.config._attn_implementation == "eager"
    assert torch.equal(m(**kw).logits, ref)


def test_output_attentions_config_left():
    import transformers as T
    cfg, cls, _ = K.build("bert")
    cfg.output_attentions = True
    m = cls._from_config(cfg, attn_implementation="eager")
    rep = mmcore.patch(m)
    assert not rep.replaced and all("output_attentions" in r for _, r in rep.left)
    assert isinstance(cfg, T.BertConfig)


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


def test_longformer_scattered_globals_fall_back_exactly():
    m, kind = K.load("longformer")
    ref, _ = K.load("longformer")
    mmcore.patch(m)
    kw = K.inputs(kind, B=2, S=16)
    kw["global_attention_mask"] = torch.zeros_like(kw["attention_mask"])
    kw["global_attention_mask"][:, 5] = 1  # not a prefix: HF's own forward
    hfi.STATS.reset()
    out = m(**kw).last_hidden_state
    assert hfi.STATS.fallback_calls == 2
    torch.testing.assert_close(out, ref(**kw).last_hidden_state)
    mmcore.unpatch(m)
    assert not any("forward" in x.__dict__ for x in m.modules())


def test_siglip_pooling_head_reported():
    m, _ = K.load("siglip")
    rep = mmcore.patch(m)
    assert any(n.endswith("head.attention") for n in rep.left_names)


def _dense_fallback_case(m, kw):
    base, kind = K.load("llama")
    hfi.STATS.reset()
    out = m(**kw).logits
    assert hfi.STATS.fallback_calls > 0
    return out, base(**kw).logits


def test_packed_sequences_fall_back_exactly():
    """position_ids restarting inside a row (packed sequences) make HF build an and-mask the
    op cannot express: the dense path runs and the answer stays exact."""
    m, kind = K.load("llama")
    mmcore.patch(m)
    ids = torch.randint(3, K.V, (2, 14))
    pos = torch.cat([torch.arange(6), torch.arange(8)])[None].expand(2, -1)
    out, ref = _dense_fallback_case(m, {"input_ids": ids, "position_ids": pos,
                                        "use_cache": False})
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert any("4-D" in r for r in hfi.STATS.fallback_reasons)


def test_non_contiguous_padding_falls_back_exactly():
    m, kind = K.load("llama")
    mmcore.patch(m)
    ids = torch.randint(3, K.V, (2, 12))
    am = torch.ones(2, 12, dtype=torch.long)
    am[0, 3] = 0  # a hole
    out, ref = _dense_fallback_case(m, {"input_ids": ids, "attention_mask": am})
    valid = am.bool()
    valid[0, 3] = False
    torch.testing.assert_close(out[valid], ref[valid], rtol=1e-5, atol=1e-5)
    assert "padding is not one contiguous run per sample" in hfi.STATS.fallback_reasons


def test_attention_dropout_training_falls_back():
    import transformers as T
    cfg, cls, _ = K.build("bert")
    cfg.attention_probs_dropout_prob = 0.5
    m = cls._from_config(cfg, attn_implementation="eager")
    mmcore.patch(m)
    m.train()
    hfi.STATS.reset()
    m(input_ids=torch.randint(3, K.V, (1, 9)))
    assert hfi.STATS.fallback_reasons.get("attention dropout while training") == 2
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
