"""peft LoRA layers under mmcore.patch: peft's lora.Linear keeps its class's API, its forward
runs mmcore.ops.lora_linear (mmcore.nn.convert_peft_model), and unpatch restores peft's class."""
import copy

import pytest
import torch

import kit_patch as K
import mmcore
from kit import assert_close

peft = pytest.importorskip("peft")


def _peft_llama(dropout=0.0):
    from peft import LoraConfig, get_peft_model
    m, _ = K.load("llama")
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                     lora_dropout=dropout, init_lora_weights=False)
    torch.manual_seed(3)
    return get_peft_model(m, cfg)


@pytest.mark.parametrize("route", ["wrap", "auto"])
def test_peft_lora_patched_matches(route):
    from mmcore.nn import peft_layer
    pm = _peft_llama()
    base = copy.deepcopy(pm)
    oracle = copy.deepcopy(pm).double()
    rep = mmcore.patch(pm, lora_route=route)
    lora_names = [n for n, _ in rep.replaced if "lora" in _.lower() or "LoRA" in _]
    assert len(lora_names) == 2 * 3  # q, v, down in 2 layers
    kw = K.inputs("decoder", B=2, S=13, padding="right")
    valid = kw["attention_mask"].bool()
    res = {}
    peft_layer.STATS.reset()
    for name, m in (("ours", pm), ("base", base), ("oracle", oracle)):
        m.train()
        logits = m(**kw).logits
        (logits[valid].float().pow(2).mean() if name != "oracle"
         else logits[valid].pow(2).mean()).backward()
        grads = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
        res[name] = (logits[valid], grads)
    assert peft_layer.STATS.op_calls == 6 and peft_layer.STATS.fallback_calls == 0
    assert_close("peft.logits", res["ours"][0], res["oracle"][0], res["base"][0])
    names = sorted(res["oracle"][1])
    assert names and all("lora_" in n for n in names)  # only adapters train
    for n in names[:2] + names[-2:]:
        assert_close(f"peft.grad[{n}]", res["ours"][1][n], res["oracle"][1][n],
                     res["base"][1][n], grad=True)
    mmcore.unpatch(pm)
    from peft.tuners.lora import Linear
    assert sum(type(mod) is Linear for mod in pm.modules()) == 6


def test_peft_lora_wrap_falls_back_to_peft_for_dropout_and_disabled():
    pm = _peft_llama(dropout=0.5)
    ref = copy.deepcopy(pm)
    mmcore.patch(pm, lora_route="wrap", attention=False)
    kw = K.inputs("decoder", B=1, S=7, padding="none")
    kw.pop("attention_mask")
    pm.eval()
    ref.eval()
    torch.testing.assert_close(pm(**kw).logits, ref(**kw).logits, rtol=1e-5, atol=1e-5)
    with pm.disable_adapter(), ref.disable_adapter():
        torch.testing.assert_close(pm(**kw).logits, ref(**kw).logits, rtol=1e-5, atol=1e-5)
    pm.train()
    torch.manual_seed(0)
    a = pm(**kw).logits
    torch.manual_seed(0)
    ref.train()
    b = ref(**kw).logits
    torch.testing.assert_close(a, b)  # dropout while training: peft's own forward, same RNG
