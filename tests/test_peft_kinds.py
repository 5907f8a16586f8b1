"""peft LoRA layers beyond plain LoRA on an nn.Linear, on mmcore.ops.lora_linear (issue 26
item 4): transformers' Conv1D bases (GPT-2 family, fan_in_fan_out), lora_bias=True (the
low-rank term's bias folded into the op's bias) and DoRA (the op's col_scale epilogue),
forward and gradients against a float64 copy of peft's own model (the oracle; base: peft in
the input dtype, the tolerance rule of tests/kit.py).  Calls the op cannot express run
peft's forward and are counted; converted layers print peft's repr."""
import copy

import pytest
import torch

from kit import assert_close
from kit_peft import C1Toy, Toy, randomize

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402

from mmcore.nn import convert_peft_model, peft_layer  # noqa: E402


def _pair(model, seed=0, **cfg):
    torch.manual_seed(seed)
    cfg = {"r": 4, "lora_alpha": 8, **cfg}
    pm = get_peft_model(model, LoraConfig(**cfg))
    randomize(pm, seed + 1)
    ref = copy.deepcopy(pm)
    rep = convert_peft_model(pm)
    return pm, ref, rep


def _fwd_bwd(pm, ref, x, name, **kw):
    """Forward and every gradient (x and the trainable parameters) of pm against peft in
    float64 (oracle) and peft itself (base); returns (op calls, kind calls)."""
    oracle = copy.deepcopy(ref).double()
    g = torch.Generator().manual_seed(5)
    out = {}
    peft_layer.reset_stats()
    for tag, m, xx in (("ours", pm, x), ("base", ref, x), ("oracle", oracle, x.double())):
        xx = xx.clone().requires_grad_()
        y = m(xx, **kw)
        dy = torch.randn(y.shape, generator=g).to(y.dtype)
        g.manual_seed(5)
        y.backward(dy)
        out[tag] = {"y": y.detach(), "x": xx.grad,
                    **{n: p.grad for n, p in m.named_parameters() if p.grad is not None}}
        if tag == "ours":
            calls, kinds = peft_layer.STATS.op_calls, dict(peft_layer.KIND_CALLS)
    assert sorted(out["ours"]) == sorted(out["oracle"])
    for k in out["oracle"]:
        assert_close(f"{name}: {k}", out["ours"][k], out["oracle"][k], out["base"][k],
                     grad=k != "y")
    return calls, kinds


C1 = dict(target_modules=["c_fc", "c_proj"], fan_in_fan_out=True)
LIN = dict(target_modules=["q", "v"])


def test_conv1d_layers_convert_and_match_peft():
    pm, ref, rep = _pair(C1Toy(), 1, **C1)
    assert sorted(rep["converted"]) == ["base_model.model.c_fc", "base_model.model.c_proj"]
    assert rep["kinds"] == {"Conv1D": 2} and not rep["skipped"]
    calls, kinds = _fwd_bwd(pm, ref, torch.randn(3, 5, 24), "Conv1D")
    assert calls == 2 and kinds == {"Conv1D": 2}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_conv1d_half_on_cpu(dtype):
    """Conv1D in bf16 / fp16 on the CPU (peft's adapters in fp32: x cast for the op)."""
    pm, ref, rep = _pair(C1Toy(dtype), 2, **C1)
    assert rep["kinds"] == {"Conv1D": 2}
    x = torch.randn(4, 7, 24).to(dtype)
    calls, kinds = _fwd_bwd(pm, ref, x, f"Conv1D {dtype}")
    assert calls == 2 and kinds == {"Conv1D": 2}


def test_conv1d_weight_reaches_the_op_uncopied(monkeypatch):
    pm, _, _ = _pair(C1Toy(), 3, **C1)
    seen = []
    real = peft_layer.lora_linear

    def spy(x, w, *a, **k):
        seen.append(w)
        return real(x, w, *a, **k)

    monkeypatch.setattr(peft_layer, "lora_linear", spy)
    with torch.no_grad():
        pm(torch.randn(2, 24))
    c_fc = pm.base_model.model.c_fc.base_layer
    assert seen[0].data_ptr() == c_fc.weight.data_ptr() and seen[0].shape == (19, 24)


@pytest.mark.parametrize("model,cfg", [(Toy, LIN), (C1Toy, C1)], ids=["Linear", "Conv1D"])
def test_lora_bias_folds_into_the_op_bias(model, cfg):
    pm, ref, rep = _pair(model(), 4, lora_bias=True, init_lora_weights=False, **cfg)
    kind = "Linear" if model is Toy else "Conv1D"
    n = len(rep["converted"])
    assert n in (2, 4) and rep["kinds"] == {kind: n, "lora_bias": n}
    calls, kinds = _fwd_bwd(pm, ref, torch.randn(3, 4, 24), "lora_bias")
    assert calls == n and kinds.get("lora_bias") == n
    # the bias gradient reaches lora_B.bias (checked against the oracle above; not zero)
    b = next(p for k, p in pm.named_parameters() if k.endswith("lora_B.default.bias"))
    assert b.grad is not None and b.grad.abs().sum() > 0


def test_lora_bias_two_adapters_and_mixed_batch():
    pm, ref, _ = _pair(Toy(), 5, lora_bias=True, init_lora_weights=False, **LIN)
    cfg = LoraConfig(r=3, lora_alpha=9, lora_bias=True, init_lora_weights=False, **LIN)
    for m in (pm, ref):
        m.add_adapter("b", cfg)
    randomize(ref, 6)
    pm.load_state_dict(ref.state_dict())
    for m in (pm, ref):
        m.base_model.set_adapter(["default", "b"])
    calls, kinds = _fwd_bwd(pm, ref, torch.randn(3, 24), "two lora_bias adapters")
    assert calls == 4 and kinds == {"lora_bias": 4}
    pm.eval()
    ref.eval()
    peft_layer.reset_stats()
    with torch.no_grad():
        x = torch.randn(3, 24)
        names = ["b", "__base__", "default"]
        assert_close("mixed", pm(x, adapter_names=names),
                     copy.deepcopy(ref).double()(x.double(), adapter_names=names),
                     ref(x, adapter_names=names))
    assert peft_layer.STATS.fallback_reasons == {"lora_bias in a mixed-adapter batch": 4}


@pytest.mark.parametrize("model,cfg", [(Toy, LIN), (C1Toy, C1)], ids=["Linear", "Conv1D"])
def test_dora_on_the_op(model, cfg):
    """DoRA: c = m / ||W + s·BA|| (detached) as the op's col_scale; d m, dA, dB, dx, d bias
    against peft's DoRA in float64."""
    pm, ref, rep = _pair(model(), 7, use_dora=True, **cfg)
    n = len(rep["converted"])
    kind = "Linear" if model is Toy else "Conv1D"
    assert rep["kinds"] == {kind: n, "DoRA": n} and not rep["skipped"]
    with torch.no_grad():  # a magnitude away from the initial norm: c != 1
        for k, p in pm.named_parameters():
            if "lora_magnitude_vector" in k:
                p.mul_(1 + 0.3 * torch.rand(p.shape))
        ref.load_state_dict(pm.state_dict())
    calls, kinds = _fwd_bwd(pm, ref, torch.randn(2, 6, 24), "DoRA")
    assert calls == n and kinds.get("DoRA") == n
    m = next(p for k, p in pm.named_parameters() if "lora_magnitude_vector" in k)
    assert m.grad is not None and m.grad.abs().sum() > 0


def test_dora_bf16_and_eval():
    pm, ref, _ = _pair(Toy().to(torch.bfloat16), 8, use_dora=True, **LIN)
    pm.eval()
    ref.eval()
    x = torch.randn(3, 24).to(torch.bfloat16)
    calls, _ = _fwd_bwd(pm, ref, x, "DoRA bf16")
    assert calls == 4


def test_dora_cases_on_peft_forward():
    """DoRA with dropout while training (peft drops the whole DoRA term's input), with two
    active adapters, merged, disabled: peft's forward, the same results; counted."""
    pm, ref, _ = _pair(Toy(), 9, use_dora=True, lora_dropout=0.3, **LIN)
    pm.train()
    ref.train()
    x = torch.randn(4, 24)
    peft_layer.reset_stats()
    torch.manual_seed(0)
    a = pm(x)
    torch.manual_seed(0)
    b = ref(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert peft_layer.STATS.fallback_reasons == {"LoRA dropout while training": 4}
    pm.eval()
    ref.eval()
    assert _fwd_bwd(pm, ref, x, "dropout off in eval")[0] == 4

    for m in (pm, ref):
        m.add_adapter("b", LoraConfig(r=2, use_dora=True, **LIN))
        m.base_model.set_adapter(["default", "b"])
    randomize(ref, 19)
    pm.load_state_dict(ref.state_dict())
    peft_layer.reset_stats()
    _fwd_bwd(pm, ref, x, "two DoRA adapters")
    assert peft_layer.STATS.op_calls == 0
    assert peft_layer.STATS.fallback_reasons == {"DoRA with several active adapters": 4}
    for m in (pm, ref):
        m.base_model.set_adapter("default")
        m.merge_adapter()
    peft_layer.reset_stats()
    with torch.no_grad():
        assert_close("merged", pm(x), copy.deepcopy(ref).double()(x.double()), ref(x))
    assert peft_layer.STATS.fallback_reasons == {"adapters merged": 4}
    for m in (pm, ref):
        m.unmerge_adapter()
    with pm.disable_adapter(), ref.disable_adapter(), torch.no_grad():
        peft_layer.reset_stats()
        assert_close("disabled", pm(x), copy.deepcopy(ref).double()(x.double()), ref(x))
        assert peft_layer.STATS.fallback_reasons == {"adapters disabled": 4}


def test_repr_is_peft_s():
    """peft's TestLayerRepr asserts a lora.Linear's repr starts 'lora.Linear('; the converted
    class is still found by is_fused and its type name."""
    for model, cfg in ((Toy(), LIN), (C1Toy(), C1)):
        pm, ref, _ = _pair(model, 10, **cfg)
        for (n, a), (_, b) in zip(pm.named_modules(), ref.named_modules()):
            assert repr(a) == repr(b), n
            if peft_layer.is_fused(a):
                assert repr(a).startswith("lora.Linear(")
                assert type(a).__name__ == "FusedLoraLinear"


def test_gpt2_model_all_kinds():
    """A tiny GPT-2 (c_attn / c_proj / c_fc are Conv1D) with DoRA on attention and lora_bias
    on the MLP: every LoRA layer converted, the loss and its gradients as peft's."""
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16,
                     attn_implementation="eager")
    torch.manual_seed(11)
    base = GPT2LMHeadModel(cfg).eval()
    pm = get_peft_model(base, LoraConfig(r=4, target_modules=["c_attn"], use_dora=True,
                                         fan_in_fan_out=True))
    pm.add_adapter("mlp", LoraConfig(r=4, target_modules=["c_fc"], lora_bias=True,
                                     init_lora_weights=False, fan_in_fan_out=True))
    pm.base_model.set_adapter(["default", "mlp"])
    randomize(pm, 12)
    ref = copy.deepcopy(pm)
    oracle = copy.deepcopy(pm).double()
    rep = convert_peft_model(pm)
    assert rep["kinds"] == {"Conv1D": 4, "DoRA": 2, "lora_bias": 2}
    ids = torch.randint(0, 50, (2, 9))
    peft_layer.reset_stats()
    lo = pm(input_ids=ids, labels=ids).loss
    lo.backward()
    assert peft_layer.STATS.op_calls == 4 and peft_layer.STATS.fallback_calls == 0
    lr = ref(input_ids=ids, labels=ids).loss
    lr.backward()
    l64 = oracle(input_ids=ids, labels=ids).loss
    l64.backward()
    assert_close("loss", lo, l64, lr)
    for (k, p), (_, q), (_, o) in zip(pm.named_parameters(), ref.named_parameters(),
                                      oracle.named_parameters()):
        if p.requires_grad and q.grad is not None:
            assert_close(k, p.grad, o.grad, q.grad, grad=True)


def test_adalora_model_keeps_creating_its_own_layers():
    """AdaLoraModel subclasses LoraModel: after conversion, a layer created by add_adapter
    must still come from AdaLoRA's factory (the conversion hook once called LoraModel's and
    created a lora.Linear: peft's TestRequiresGrad::test_requires_grad_adalora_different_targets
    failed with mmcore)."""
    from peft import AdaLoraConfig
    from peft.tuners.adalora import SVDLinear
    pm = get_peft_model(Toy(), AdaLoraConfig(target_modules=["q"], total_step=1))
    rep = convert_peft_model(pm)
    assert not rep["converted"]  # AdaLoRA layers are not lora.Linear
    pm.add_adapter("other", AdaLoraConfig(target_modules=["v"], total_step=1,
                                          inference_mode=True))
    assert type(pm.base_model.model.blocks[0]["v"]) is SVDLinear
    # and a LoraModel still gets fused layers for new targets
    pm2, _, _ = _pair(Toy(), 20, **LIN)
    pm2.add_adapter("head", LoraConfig(r=2, target_modules=["head"]))
    assert peft_layer.is_fused(pm2.base_model.model.head)


def test_dora_conv1d_compiled_fullgraph():
    """A converted DoRA model on Conv1D bases traces whole under torch.compile(fullgraph=True)
    (the weight norm under no_grad, the col_scale op), forward and backward as peft's."""
    pm, ref, _ = _pair(C1Toy(), 21, use_dora=True, **C1)
    oracle = copy.deepcopy(ref).double()
    torch._dynamo.reset()
    f = torch.compile(pm, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 24)
    for m, xx in ((f, x), (ref, x), (oracle, x.double())):
        m(xx).pow(2).sum().backward()
    with torch.no_grad():
        assert_close("compiled DoRA", f(x), oracle(x.double()), ref(x))
    for (k, p), (_, q), (_, o) in zip(pm.named_parameters(), ref.named_parameters(),
                                      oracle.named_parameters()):
        if p.requires_grad:
            assert_close(f"compiled grad {k}", p.grad, o.grad, q.grad, grad=True)
