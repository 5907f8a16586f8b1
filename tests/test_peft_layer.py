"""peft's own lora.Linear on mmcore.ops.lora_linear (mmcore.nn.convert_peft_model): the op serves
the plain-LoRA calls, and every PeftModel / LoraModel API keeps peft's behaviour.

Issue 17: at 34b1b06 convert_peft_model swapped peft's layers for LoRALinear, after which
save_pretrained wrote an empty adapter, add_adapter / load_adapter / delete_adapter failed,
disable_adapter() failed or left LoRA on, and merge_adapter() did nothing.  Each of those is a
test here.  Numbers follow the tolerance rule (docs/design.md) (oracle: a float64 copy of the peft model;
base: peft itself in the input dtype)."""
import copy
import io
import json
import os

import pytest
import torch
from torch import nn

from kit import assert_close
from kit_peft import Holder, Toy, randomize

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import Linear as PeftLinear  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from mmcore.nn import convert_peft_model, peft_layer, unconvert_peft_model  # noqa: E402


def _pair(seed=0, **cfg):
    """(peft model converted by mmcore, an unconverted deep copy) with random LoRA weights."""
    torch.manual_seed(seed)
    cfg = {"r": 4, "lora_alpha": 8, "target_modules": ["q", "v"], **cfg}
    pm = get_peft_model(Toy(), LoraConfig(**cfg))
    randomize(pm, seed + 1)
    ref = copy.deepcopy(pm)
    rep = convert_peft_model(pm)
    return pm, ref, rep


def _check(name, ours, ref, x, **kw):
    """ours(x) against a float64 copy of ref (the oracle), base = ref itself; counts op calls."""
    peft_layer.STATS.reset()
    with torch.no_grad():
        got = ours(x, **kw)
        base = ref(x, **kw)
        oracle = copy.deepcopy(ref).double()(x.double(), **kw)
    assert_close(name, got, oracle, base)
    return peft_layer.STATS.op_calls


def _layers(model):
    return [m for m in model.modules() if isinstance(m, PeftLinear)]


def test_convert_keeps_peft_classes_and_uses_the_op():
    pm, ref, rep = _pair(1)
    assert len(rep["converted"]) == 4 and not rep["skipped"]
    assert list(pm.state_dict()) == list(ref.state_dict())
    for m in _layers(pm):
        assert isinstance(m, PeftLinear) and peft_layer.is_fused(m)
    x = torch.randn(3, 5, 24)
    assert _check("converted", pm, ref, x) == 4  # every LoRA layer ran the op
    assert unconvert_peft_model(pm) == rep["converted"]
    assert all(type(m) is PeftLinear for m in _layers(pm))


def test_save_pretrained_writes_the_same_adapter_as_peft(tmp_path):
    """Issue 17 (most severe): after conversion, save_pretrained wrote an EMPTY adapter."""
    pm, ref, _ = _pair(2, modules_to_save=["head"])
    pm.save_pretrained(tmp_path / "mmcore")
    ref.save_pretrained(tmp_path / "peft")
    f = "adapter_model.safetensors"
    a, b = ((tmp_path / d / f).read_bytes() for d in ("mmcore", "peft"))
    assert a == b, f"{f} differs from peft's"
    # peft keeps target_modules as a set and writes it in the set's iteration order, which
    # depends on the string hash seed: compare it as a set, every other field exactly
    a, b = (json.loads((tmp_path / d / "adapter_config.json").read_text())
            for d in ("mmcore", "peft"))
    assert sorted(a.pop("target_modules")) == sorted(b.pop("target_modules"))
    assert a == b, "adapter_config.json differs from peft's"
    sd = load_file(tmp_path / "mmcore" / "adapter_model.safetensors")
    assert sum("lora_A" in k for k in sd) == 4 and any("head" in k for k in sd)


def test_training_after_conversion_is_saved_and_reloads(tmp_path):
    """Train with the op, save with peft, reload with peft: the trained adapter comes back
    (and the trained weights agree with peft's own training under the tolerance rule)."""
    pm, ref, _ = _pair(3)
    oracle = copy.deepcopy(ref).double()
    x, target = torch.randn(6, 24), torch.randn(6, 5)
    for model, xx, tt in ((pm, x, target), (ref, x, target),
                          (oracle, x.double(), target.double())):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
        for _ in range(3):
            opt.zero_grad()
            ((model(xx) - tt) ** 2).mean().backward()
            opt.step()
    trained = {k: v for k, v in pm.state_dict().items() if "lora_" in k}
    for k, v in trained.items():
        assert_close(k, v, oracle.state_dict()[k], ref.state_dict()[k], grad=True)
    pm.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "adapter_model.safetensors")
    assert len(sd) == 8
    for k, v in sd.items():
        live = k.replace(".weight", ".default.weight")
        assert torch.equal(v, trained[live])
    torch.manual_seed(3)
    back = PeftModel.from_pretrained(Toy(), tmp_path)  # the same base weights as _pair(3)
    for k, v in back.state_dict().items():
        assert torch.equal(v, pm.state_dict()[k]), k


def test_gradients_reach_lora_like_peft():
    pm, ref, _ = _pair(4)
    oracle = copy.deepcopy(ref).double()
    x = torch.randn(2, 7, 24)
    dy = torch.randn(2, 7, 5)
    grads = {}
    for name, m, xx in (("ours", pm, x), ("base", ref, x), ("oracle", oracle, x.double())):
        xx = xx.clone().requires_grad_()
        m(xx).backward(dy.to(xx.dtype))
        grads[name] = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
        grads[name]["x"] = xx.grad
    names = sorted(grads["oracle"])
    assert names == sorted(grads["ours"]) and sum("lora_" in n for n in names) == 8
    for n in names:
        assert_close(f"grad[{n}]", grads["ours"][n], grads["oracle"][n], grads["base"][n],
                     grad=True)


def test_add_load_delete_set_adapter(tmp_path):
    """Issue 17: add_adapter / load_adapter / delete_adapter raised 'Target module ... is not
    supported' after conversion."""
    pm, ref, _ = _pair(5)
    other = LoraConfig(r=3, lora_alpha=6, target_modules=["q", "head"])  # "head": a new target
    for m in (pm, ref):
        m.add_adapter("other", other)
    randomize(ref, 6)
    pm.load_state_dict(ref.state_dict())
    assert peft_layer.is_fused(pm.base_model.model.head)  # created after conversion: fused too
    x = torch.randn(4, 24)
    for m in (pm, ref):
        m.set_adapter("other")
    assert _check("other", pm, ref, x) == 3
    ref.save_pretrained(tmp_path)
    for m in (pm, ref):
        m.load_adapter(tmp_path / "other", adapter_name="again")
        m.set_adapter("again")
    assert _check("loaded", pm, ref, x) == 3
    for m in (pm, ref):
        m.delete_adapter("other")
    assert "other" not in pm.base_model.model.blocks[0]["q"].lora_A
    assert pm.peft_config.keys() == ref.peft_config.keys()
    assert _check("after delete", pm, ref, x) == 3


def test_disable_adapter_gives_the_base_model():
    """Issue 17: disable_adapter() raised 'No adapter layers found', or (modules_to_save) kept
    the LoRA term on."""
    pm, ref, _ = _pair(7, modules_to_save=["head"])
    x = torch.randn(4, 24)
    with torch.no_grad():
        lora_on = ref(x)
    with pm.disable_adapter(), ref.disable_adapter():
        assert _check("disabled", pm, ref, x) == 0
        with torch.no_grad():
            assert not torch.allclose(pm(x), lora_on)  # the LoRA term (and head copy) is off
    assert _check("enabled again", pm, ref, x) == 4


def test_merge_unmerge_and_unload():
    """Issue 17: merge_adapter() did nothing (merged_adapters stayed [])."""
    pm, ref, _ = _pair(8)
    x = torch.randn(4, 24)
    w0 = pm.base_model.model.blocks[0]["q"].base_layer.weight.clone()
    pm.merge_adapter()
    ref.merge_adapter()
    q = pm.base_model.model.blocks[0]["q"]
    assert q.merged_adapters == ["default"] and not torch.equal(q.base_layer.weight, w0)
    assert _check("merged", pm, ref, x) == 0  # base layer only: the delta is in the weight
    pm.unmerge_adapter()
    ref.unmerge_adapter()
    assert q.merged_adapters == []
    assert _check("unmerged", pm, ref, x) == 4
    merged = pm.merge_and_unload()
    assert not _layers(merged)
    with torch.no_grad():
        assert_close("merge_and_unload", merged(x), copy.deepcopy(ref).double()(x.double()),
                     ref(x))


def test_mixed_adapter_batch_and_two_active_adapters():
    pm, ref, _ = _pair(9)
    cfg = LoraConfig(r=6, lora_alpha=3, target_modules=["q", "v"])
    for m in (pm, ref):
        m.add_adapter("b", cfg)
    randomize(ref, 10)
    pm.load_state_dict(ref.state_dict())
    pm.eval()
    ref.eval()
    x = torch.randn(5, 3, 24)
    names = ["b", "__base__", "default", "b", "default"]
    assert _check("mixed", pm, ref, x, adapter_names=names) == 4
    for m in (pm, ref):
        m.base_model.set_adapter(["default", "b"])  # both active: their terms are summed
    assert _check("two active", pm, ref, x) == 4


def test_fp32_adapters_on_bf16_base():
    """peft keeps fp32 adapters on a bf16 model (autocast_adapter_dtype); the op gets them cast
    to bf16 and accumulates in fp32."""
    torch.manual_seed(11)
    pm = get_peft_model(Holder(dtype=torch.bfloat16), LoraConfig(r=8, lora_alpha=16,
                                                                target_modules=["proj"]))
    randomize(pm, 12)
    assert pm.base_model.model.proj.lora_A["default"].weight.dtype == torch.float32
    ref = copy.deepcopy(pm)
    convert_peft_model(pm)
    x = torch.randn(4, 9, 37).to(torch.bfloat16)
    assert _check("bf16 base, fp32 adapters", pm, ref, x) == 1


def test_calls_the_op_cannot_serve_run_peft_forward():
    """Dropout while training, a trainable base bias (bias='all'): peft's own forward (DoRA
    is served by the op now: tests/test_peft_kinds.py)."""
    pm, ref, _ = _pair(13, lora_dropout=0.5)
    pm.train()
    ref.train()
    x = torch.randn(4, 24)
    torch.manual_seed(0)
    a = pm(x)
    torch.manual_seed(0)
    b = ref(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # the same RNG draws: same function
    pm.eval()
    assert _check("dropout, eval", pm, ref, x) == 4

    pm, ref, _ = _pair(14, bias="all")
    peft_layer.STATS.reset()
    pm(x).sum().backward()
    ref(x).sum().backward()
    assert peft_layer.STATS.op_calls == 0
    assert peft_layer.STATS.fallback_reasons == {"trainable base weight or bias": 4}
    q, rq = pm.base_model.model.blocks[0]["q"], ref.base_model.model.blocks[0]["q"]
    torch.testing.assert_close(q.base_layer.bias.grad, rq.base_layer.bias.grad)



def test_deepcopy_and_pickle_keep_the_fused_layer_independent():
    pm, ref, _ = _pair(16)
    twin = copy.deepcopy(pm)
    buf = io.BytesIO()
    torch.save(pm, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    x = torch.randn(3, 24)
    for m in (twin, loaded):
        assert all(peft_layer.is_fused(layer) for layer in _layers(m))
        assert _check("copy", m, ref, x) == 4
    with torch.no_grad():
        twin.base_model.model.blocks[0]["q"].lora_B["default"].weight.zero_()
    assert _check("original untouched", pm, ref, x) == 4


def test_patch_routes_peft_layers_and_unpatch_restores():
    import mmcore
    pm, ref, _ = _pair(17)
    unconvert_peft_model(pm)
    report = mmcore.patch(pm, attention=False)
    assert sorted(n for n, w in report.replaced if "lora" in w) == sorted(
        n for n, m in pm.named_modules() if isinstance(m, PeftLinear))
    assert _check("patched", pm, ref, torch.randn(2, 24)) == 4
    mmcore.unpatch(pm)
    assert all(type(m) is PeftLinear for m in _layers(pm))
    assert "_create_new_module" not in pm.base_model.__dict__


def test_convert_argument_errors():
    with pytest.raises(TypeError, match="peft_model"):
        convert_peft_model("not a model")
    with pytest.raises(TypeError, match="backend"):
        convert_peft_model(nn.Linear(2, 2), backend=3)


def test_compiled_fullgraph_peft_model():
    """A converted peft model traces whole under torch.compile(fullgraph=True) (the plain-LoRA
    check and the op), forward and backward, equal to peft within the tolerance rule."""
    pm, ref, _ = _pair(18)
    oracle = copy.deepcopy(ref).double()
    torch._dynamo.reset()
    f = torch.compile(pm, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 5, 24)
    with torch.no_grad():
        assert_close("compiled", f(x), oracle(x.double()), ref(x))
    f(x).pow(2).sum().backward()
    oracle(x.double()).pow(2).sum().backward()
    ref(x).pow(2).sum().backward()
    name = "base_model.model.blocks.1.v.lora_B.default.weight"
    grads = [dict(m.named_parameters())[name].grad for m in (pm, oracle, ref)]
    assert_close("compiled grad", *grads, grad=True)
