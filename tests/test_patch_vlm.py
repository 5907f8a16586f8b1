"""The vision-language families' own masks served by window_attention's bounds mode
(mmcore.patch.hf_bounds): mllama's cross-attention and vision masks (dense 4-D, factored),
PaliGemma's prefix-LM and Gemma-3's image blocks (mask functions read as per-row key bounds)
-- logits and gradients within the tolerance rule vs eager, and every call on the op."""
import pytest
import torch

import kit_vlm as KV
import mmcore
from kit import assert_close
from mmcore.patch import hf_interface as hfi

# attention calls of one forward: (op calls) -- every one of them on the op
CALLS = {"mllama": 6,  # 3 vision layers (tile masks), 2 text self, 1 cross
         "paligemma": 3,  # 1 SigLIP layer, 2 Gemma layers (prefix-LM)
         "gemma3": 3}  # 1 SigLIP layer, 1 sliding + 1 full Gemma-3 layer (image blocks)


@pytest.mark.parametrize("name", ["mllama", "paligemma", "gemma3"])
def test_vlm_masks_on_the_op(name):
    m = KV._model(name)
    rep = mmcore.patch(m)
    kw, valid = KV.inputs(name)
    hfi.STATS.reset()
    m.train()  # a training step (dropouts are 0)
    KV.compare(name, m, kw, valid)
    # forward + the recomputation-free backward: each call counted once, none dense
    assert hfi.STATS.fallback_calls == 0, hfi.STATS.fallback_reasons
    assert hfi.STATS.op_calls == CALLS[name], hfi.STATS
    assert rep.fallback_calls == 0


@pytest.mark.parametrize("name", ["mllama", "paligemma", "gemma3"])
def test_vlm_generate_matches_eager(name):
    """Greedy generation (dynamic cache: prefill with the image / prefix pattern, then decode
    steps at an offset; left padding) gives eager's tokens and scores, every call on the op."""
    m = KV._model(name)
    mmcore.patch(m)
    kw, valid = KV.inputs(name, padding="left")
    if name == "paligemma":  # two samples: left padding and none
        kw = {k: v[:2] for k, v in kw.items()}
    gen = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
               output_logits=True, pad_token_id=0)
    kw64 = {k: (v.double() if v.is_floating_point() else v) for k, v in kw.items()}
    hfi.STATS.reset()
    with torch.no_grad():
        got = m.generate(**kw, **gen)
        st = hfi.STATS.as_dict()
        base = KV._model(name).generate(**kw, **gen)
        oracle = KV.oracle_model(name).generate(**kw64, **gen)
    assert torch.equal(got.sequences, oracle.sequences)
    assert torch.equal(base.sequences, oracle.sequences)
    for step, (a, b, o) in enumerate(zip(got.logits, base.logits, oracle.logits)):
        assert_close(f"{name}.generate.logits[{step}]", a, o, b)
    assert st["fallback_calls"] == 0, st
    assert st["op_calls"] > 0


def _attention(module):
    return [mod for _, mod in module.named_modules()
            if "Attention" in type(mod).__name__ and hasattr(mod, "config")]


# (family, sub-model of model.model patched alone, its attention calls in one forward)
SUB_MODELS = [("gemma3", "vision_tower", 1), ("gemma3", "language_model", 2),
              ("mllama", "vision_model", 3), ("mllama", "language_model", 3)]


@pytest.mark.parametrize("name, part, calls", SUB_MODELS)
def test_patch_one_sub_model_of_a_composite_model(name, part, calls):
    """mmcore.patch on one sub-model alone (the vision tower, or the text model): its attention
    runs on the op, the rest of the model stays eager (configs and modules), the whole model
    keeps the tolerance rule, and unpatch gives back the eager model exactly."""
    m = KV._model(name)
    kw, valid = KV.inputs(name)
    with torch.no_grad():
        before = m(**kw).logits
    sub = getattr(m.model, part)
    rest = [mod for mod in _attention(m) if all(mod is not s for s in _attention(sub))]
    assert _attention(sub) and rest
    rep = mmcore.patch(sub, lora=False)
    assert len(rep.replaced) == len(_attention(sub))  # (+ SigLIP's pooling head, reported left)
    assert {mod.config._attn_implementation for mod in _attention(sub)} == {"mmcore"}
    assert {mod.config._attn_implementation for mod in rest} == {"eager"}
    assert all(hfi.STATS_ATTR not in mod.__dict__ for mod in rest)
    hfi.STATS.reset()
    KV.compare(name, m, kw, valid)
    assert hfi.STATS.fallback_calls == 0, hfi.STATS.fallback_reasons
    assert hfi.STATS.op_calls == calls, hfi.STATS  # the sub-model's calls, no others
    mmcore.unpatch(sub)
    assert {mod.config._attn_implementation for mod in _attention(m)} == {"eager"}
    assert all(hfi.STATS_ATTR not in mod.__dict__ and "_mmcore_backend" not in mod.__dict__
               for mod in _attention(m))
    hfi.STATS.reset()
    with torch.no_grad():
        after = m(**kw).logits
    assert hfi.STATS.op_calls + hfi.STATS.fallback_calls == 0
    assert torch.equal(after, before)
