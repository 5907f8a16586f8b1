"""Gemma-2 under mmcore.patch / attn_implementation="mmcore" (issue 26 item 3): its attention
logit softcapping (on the op's ``softcap``) and its sliding-window layers on the op, forward
and backward, within the tolerance rule (docs/design.md: fp64 oracle, fp32 eager base); and
the attention weights, which a patched model returns from mmcore's dense path when
``output_attentions=True`` is asked for, as HF's eager implementation (Gemma-2's default)
does.  The tiny config (kit_patch.build("gemma2")): layers [sliding w=5, full], cap 2.0 on
scores up to ~8, so both the window and the cap change the outputs."""
import pytest
import torch

import kit_patch as K
import mmcore
from mmcore.patch import hf_interface as hfi

S = 13  # > the sliding window (5): the window cuts keys in the sliding layer


@pytest.mark.parametrize("padding", ["none", "right", "left"])
def test_gemma2_patched_matches_eager_forward_and_backward(padding):
    m, kind = K.load("gemma2")
    rep = mmcore.patch(m)
    assert not rep.left and len(rep.replaced) == 2, rep
    hfi.STATS.reset()
    m.train()  # gradients of a training step (attention dropout is 0 in the config)
    K.compare("gemma2", m, kind, K.inputs(kind, B=3, S=S, padding=padding))
    assert hfi.STATS.op_calls == 2 and hfi.STATS.fallback_calls == 0, hfi.STATS


def test_gemma2_softcap_and_window_matter():
    """The comparison above can fail: the same weights without the cap, or with the sliding
    layer made full, give other logits (far beyond the tolerance)."""
    m, kind = K.load("gemma2")
    kw = K.inputs(kind, B=2, S=S, padding="none")
    with torch.no_grad():
        want = m(**kw).logits
        m.config.attn_logit_softcapping = None
        for layer in m.model.layers:
            layer.self_attn.attn_logit_softcapping = None
        assert (m(**kw).logits - want).abs().max() > 1e-2
    m, _ = K.load("gemma2")
    with torch.no_grad():
        m.model.layers[0].self_attn.sliding_window = None
        m.config.layer_types = ["full_attention", "full_attention"]
        assert (m(**kw).logits - want).abs().max() > 1e-2


def test_gemma2_loaded_with_attn_implementation_mmcore():
    m, kind = K.load("gemma2", "mmcore")
    assert m.config._attn_implementation == "mmcore"
    hfi.STATS.reset()
    K.compare("gemma2", m, kind, K.inputs(kind, B=2, S=S, padding="right"))
    assert hfi.STATS.op_calls == 2 and hfi.STATS.fallback_calls == 0, hfi.STATS


@pytest.mark.parametrize("padding", ["none", "right", "left"])
def test_gemma2_output_attentions_returns_the_eager_weights(padding):
    """output_attentions=True in the forward: every layer's weights (B, H, S, S), equal to
    eager's, from mmcore's dense path (counted with its reason); without it the op serves the
    calls and no weights are formed."""
    m, kind = K.load("gemma2")
    base, _ = K.load("gemma2")
    mmcore.patch(m)
    kw = K.inputs(kind, B=3, S=S, padding=padding)
    hfi.STATS.reset()
    with torch.no_grad():
        out = m(**kw, output_attentions=True)
        want = base(**kw, output_attentions=True)
    assert hfi.STATS.op_calls == 0
    assert hfi.STATS.fallback_reasons == {hfi.WEIGHTS_REASON: 2}, hfi.STATS
    assert len(out.attentions) == 2 and out.attentions[0].shape == (3, 4, S, S)
    torch.testing.assert_close(out.attentions, want.attentions)
    torch.testing.assert_close(out.logits, want.logits)
    # the sliding layer's weights are 0 outside the window (sample 0: no padding; padded
    # rows, which see no key, get eager's uniform row)
    q, k = torch.arange(S)[:, None], torch.arange(S)[None, :]
    assert (out.attentions[0][0][:, (k <= q - 5) | (k > q)] == 0).all()
    assert (out.attentions[1][0][:, k > q] == 0).all()
    hfi.STATS.reset()
    with torch.no_grad():
        plain = m(**kw)
    assert plain.attentions is None
    assert hfi.STATS.op_calls == 2 and hfi.STATS.fallback_calls == 0, hfi.STATS


def test_output_attentions_weights_on_the_dense_path_for_any_family():
    """The rule is the attention function's, not Gemma-2's: a patched Llama that was on eager
    attention, asked for the weights, returns eager's."""
    m, kind = K.load("llama")
    base, _ = K.load("llama")
    mmcore.patch(m)
    kw = K.inputs(kind, B=2, S=11, padding="right")
    hfi.STATS.reset()
    with torch.no_grad():
        out = m(**kw, output_attentions=True)
        want = base(**kw, output_attentions=True)
    assert hfi.STATS.op_calls == 0 and hfi.STATS.fallback_calls == len(out.attentions) > 0
    torch.testing.assert_close(out.attentions, want.attentions)


def test_output_attentions_on_a_model_that_was_on_sdpa_stays_on_the_op(caplog):
    """A model patched from sdpa does what sdpa does: the calls stay on the op, the weights are
    None (with one warning), the outputs equal eager's; unpatching restores it."""
    import logging
    from mmcore.patch import families as fam
    m, kind = K.load("llama")
    fam._set_impl(m.config, "sdpa")  # as loaded with attn_implementation="sdpa"
    mmcore.patch(m)
    kw = K.inputs(kind, B=2, S=11, padding="right")
    hfi.STATS.reset()
    hfi._warned_no_weights.clear()
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="mmcore.patch"):
        out = m(**kw, output_attentions=True)
    assert hfi.STATS.op_calls == m.config.num_hidden_layers and hfi.STATS.fallback_calls == 0
    assert all(a is None for a in (out.attentions or (None,)))
    assert any("does not return attention weights" in r.message for r in caplog.records)
    with torch.no_grad():
        plain = m(**kw)
    assert torch.equal(out.logits, plain.logits)  # the same op calls, weights or not
    K.compare("llama", m, kind, kw, grads=False)  # and those equal eager's (tolerance rule)
    mmcore.unpatch(m)
    assert not any(hfi.EAGER_WEIGHTS_ATTR in mod.__dict__ for mod in m.modules())
