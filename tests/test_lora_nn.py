"""mmcore.nn.LoRALinear and the peft format against peft 0.21 itself.

The tolerance rule of docs/design.md throughout: oracle = the float64 composition
x Wᵀ + b + s (x Aᵀ) Bᵀ (or a float64 copy of the peft model), base = peft in the input dtype.
LoRA B is always random (peft's zero init would hide every LoRA-path bug)."""
import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kit import assert_close
from kit_peft import K, N, Holder, Toy, randomize as _randomize
from mmcore.nn import (LoRALinear, adapter_batch, add_lora, disable_adapters, load_adapter,
                       save_adapter, set_adapter)

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402


def _peft_layer(bias=True, r=8, alpha=16, rslora=False, dtype=torch.float32, seed=0, **kw):
    torch.manual_seed(seed)
    m = Holder(bias=bias, dtype=dtype)
    pm = get_peft_model(m, LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"],
                                      use_rslora=rslora, **kw), autocast_adapter_dtype=False)
    _randomize(pm, seed + 1)
    return pm, pm.base_model.model.proj


def _ours_from(peft_layer):
    """A LoRALinear built from a copy of the base layer, loading peft's layer state dict as is."""
    ours = LoRALinear(copy.deepcopy(peft_layer.base_layer), adapter_name=None)
    for n in peft_layer.lora_A:  # every adapter, in peft's order
        p = peft_layer.lora_dropout[n].p if isinstance(peft_layer.lora_dropout[n],
                                                        nn.Dropout) else 0.0
        ours.add_adapter(n, r=peft_layer.r[n], lora_alpha=peft_layer.lora_alpha[n],
                         use_rslora=peft_layer.use_rslora[n], lora_dropout=p,
                         dtype=peft_layer.lora_A[n].weight.dtype)
    ours.load_state_dict(peft_layer.state_dict())
    return ours


def _oracle(x, W, b, terms, dy):
    """float64: y = x Wᵀ + b + Σ s (x Aᵀ) Bᵀ; terms = [(A, B, s, row_mask or None)].
    Returns y and the grads of x and of every A and B."""
    x64 = x.detach().double().requires_grad_()
    y = x64 @ W.detach().double().t()
    if b is not None:
        y = y + b.detach().double()
    leaves = [x64]
    for A, B, s, rows in terms:
        a64 = A.detach().double().requires_grad_()
        b64 = B.detach().double().requires_grad_()
        t = (x64 @ a64.t()) @ b64.t() * s
        if rows is not None:
            t = t * rows.double()[..., None]
        y = y + t
        leaves += [a64, b64]
    return (y, *torch.autograd.grad(y, leaves, dy.double()))


def _grads(y, leaves, dy):
    return torch.autograd.grad(y, leaves, dy)


# --------------------------------------------------------------------- single adapter vs peft


@pytest.mark.parametrize("bias,rslora,r,lead", [
    (True, False, 8, (2, 13)), (False, False, 1, (1,)), (True, True, 16, (31,)),
    (False, True, 5, (3, 1, 7))])
def test_forward_and_grads_equal_peft(bias, rslora, r, lead):
    pm, pl = _peft_layer(bias=bias, r=r, alpha=12, rslora=rslora, seed=r)
    ours = _ours_from(pl)
    assert ours.scaling["default"] == pl.scaling["default"]
    assert list(ours.state_dict()) == list(pl.state_dict())
    x = torch.randn(*lead, K)
    dy = torch.randn(*lead, N)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    y = ours(xs[0])
    yp = pl(xs[1])
    got = _grads(y, [xs[0], ours.lora_A["default"].weight, ours.lora_B["default"].weight], dy)
    base = _grads(yp, [xs[1], pl.lora_A["default"].weight, pl.lora_B["default"].weight], dy)
    ref = _oracle(x, pl.base_layer.weight, pl.base_layer.bias,
                  [(pl.lora_A["default"].weight, pl.lora_B["default"].weight,
                    pl.scaling["default"], None)], dy)
    assert_close("y", y, ref[0], yp)
    for n, g, r_, b_ in zip(("dx", "dA", "dB"), got, ref[1:], base):
        assert_close(n, g, r_, b_, grad=True)
    # frozen base: no gradient flows to W or b
    assert not ours.base_layer.weight.requires_grad


def test_bf16_equals_peft():
    pm, pl = _peft_layer(r=8, dtype=torch.bfloat16, seed=3)
    ours = _ours_from(pl)
    x = torch.randn(4, 9, K).to(torch.bfloat16)
    y, yp = ours(x), pl(x)
    ref = _oracle(x, pl.base_layer.weight, pl.base_layer.bias,
                  [(pl.lora_A["default"].weight, pl.lora_B["default"].weight,
                    pl.scaling["default"], None)], torch.zeros(4, 9, N))
    assert y.dtype == torch.bfloat16
    assert_close("y bf16", y, ref[0], yp)


def test_fp32_adapters_on_bf16_base():
    """peft's autocast_adapter_dtype keeps fp32 adapters on a bf16 model; LoRALinear casts
    them to x's dtype for the fused op and gradients still reach the fp32 parameters."""
    torch.manual_seed(0)
    pm = get_peft_model(Holder(dtype=torch.bfloat16),
                        LoraConfig(r=4, lora_alpha=8, target_modules=["proj"]))
    _randomize(pm, 5)
    pl = pm.base_model.model.proj
    assert pl.lora_A["default"].weight.dtype == torch.float32
    ours = _ours_from(pl)  # fp32 adapters, as peft's
    x = torch.randn(6, K).to(torch.bfloat16)
    y, yp = ours(x), pl(x)
    ref = _oracle(x, pl.base_layer.weight, pl.base_layer.bias,
                  [(pl.lora_A["default"].weight, pl.lora_B["default"].weight, 2.0, None)],
                  torch.zeros(6, N))
    assert_close("y", y, ref[0], yp)
    g = torch.autograd.grad(y.float().sum(), ours.lora_B["default"].weight)[0]
    assert g.dtype == torch.float32 and g.abs().sum() > 0


def test_two_active_adapters_sum_like_peft():
    pm, pl = _peft_layer(r=4, alpha=8, seed=7)
    pm.add_adapter("b", LoraConfig(r=6, lora_alpha=3, target_modules=["proj"]))
    _randomize(pm, 8)
    pl.set_adapter(["default", "b"])
    ours = _ours_from(pl)
    ours.set_adapter(["default", "b"])
    x = torch.randn(5, K)
    dy = torch.randn(5, N)
    y, yp = ours(x), pl(x)
    terms = [(pl.lora_A[n].weight, pl.lora_B[n].weight, pl.scaling[n], None)
             for n in ("default", "b")]
    ref = _oracle(x, pl.base_layer.weight, pl.base_layer.bias, terms, dy)
    assert_close("y", y, ref[0], yp)
    got = _grads(y, [ours.lora_B["b"].weight, ours.lora_A["default"].weight], dy)
    base = _grads(yp, [pl.lora_B["b"].weight, pl.lora_A["default"].weight], dy)
    assert_close("dB_b", got[0], ref[5], base[0], grad=True)
    assert_close("dA_default", got[1], ref[2], base[1], grad=True)


# --------------------------------------------------------------------- multi-adapter batches


def _multi(seed=11):
    """A peft layer with three adapters of different ranks and alphas, and our copy."""
    pm, pl = _peft_layer(r=4, alpha=8, seed=seed)
    pm.add_adapter("b", LoraConfig(r=8, lora_alpha=4, target_modules=["proj"]))
    pm.add_adapter("c", LoraConfig(r=2, lora_alpha=7, target_modules=["proj"], use_rslora=True))
    _randomize(pm, seed + 1)
    ours = _ours_from(pl)
    return pm, pl, ours


def test_multi_adapter_batch_equals_peft_mixed_batch():
    pm, pl, ours = _multi()
    names = ["b", "__base__", "c", "default", "b"]
    x = torch.randn(5, 7, K)
    dy = torch.randn(5, 7, N)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    pm.eval()  # peft allows adapter_names= only in eval mode; autograd still runs
    ours.eval()
    for n in ("default", "b", "c"):  # train all three at once
        for d in (pl.lora_A, pl.lora_B, ours.lora_A, ours.lora_B):
            d[n].weight.requires_grad_(True)
    ids = torch.tensor([ours.adapter_names.index(n) if n != "__base__" else -1 for n in names])
    y = ours(xs[0], adapter_ids=ids)
    yp = pm(xs[1], adapter_names=names)
    order = ("default", "b", "c")
    terms = [(pl.lora_A[n].weight, pl.lora_B[n].weight, pl.scaling[n],
              torch.tensor([m == n for m in names])[:, None].expand(5, 7)) for n in order]
    ref = _oracle(x, pl.base_layer.weight, pl.base_layer.bias, terms, dy)
    assert_close("y", y, ref[0], yp)
    leaves_o = [xs[0]] + [d[n].weight for n in order for d in (ours.lora_A, ours.lora_B)]
    leaves_p = [xs[1]] + [d[n].weight for n in order for d in (pl.lora_A, pl.lora_B)]
    for i, (g, b_) in enumerate(zip(_grads(y, leaves_o, dy), _grads(yp, leaves_p, dy))):
        assert_close(f"grad{i}", g, ref[1 + i], b_, grad=True)
    # names work as ids too, and per-sequence ids equal the same ids per token
    with torch.no_grad():
        assert torch.equal(ours(x, adapter_ids=names), y.detach())
        assert torch.equal(ours(x, adapter_ids=ids[:, None].expand(5, 7)), y.detach())


def test_multi_adapter_per_token_and_base_rows():
    """Per-token ids (-1 = base) equal running each token with its own adapter alone."""
    pm, pl, ours = _multi(seed=21)
    ours.eval()
    x = torch.randn(3, 6, K)
    ids = torch.randint(-1, 3, (3, 6))
    with torch.no_grad():
        y = ours(x, adapter_ids=ids)
        want = torch.empty_like(y)
        for i in range(3):
            for t in range(6):
                a = int(ids[i, t])
                if a < 0:
                    want[i, t] = F.linear(x[i, t], ours.weight, ours.bias)
                else:
                    ours.set_adapter(ours.adapter_names[a])
                    want[i, t] = ours(x[i, t])
    terms = [(ours.lora_A[n].weight, ours.lora_B[n].weight, ours.scaling[n], ids == j)
             for j, n in enumerate(ours.adapter_names)]
    ref = _oracle(x, ours.weight, ours.bias, terms, torch.zeros_like(y))[0]
    assert_close("y", y, ref, want)
    with pytest.raises(ValueError, match="adapter_ids"):
        ours(x, adapter_ids=torch.full((3,), 3))
    with pytest.raises(ValueError, match="unknown adapter"):
        ours(x, adapter_ids=["nope", "b", "c"])


# --------------------------------------------------------------------- merge / unmerge


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_unmerge_round_trip(dtype):
    pm, pl = _peft_layer(r=8, alpha=16, dtype=dtype, seed=31)
    ours = _ours_from(pl)
    W0 = pl.base_layer.weight.detach().clone()
    x = torch.randn(4, 11, K).to(dtype)
    with torch.no_grad():
        yp = pl(x)  # peft, unmerged: the base of the rule
        ours.merge()
        assert ours.merged_adapters == ["default"]
        ym = ours(x)
        ours.unmerge()
        assert ours.merged_adapters == []
        pl.merge()
        pl.unmerge()
    ref = _oracle(x, W0, pl.base_layer.bias, [(pl.lora_A["default"].weight,
                                               pl.lora_B["default"].weight,
                                               pl.scaling["default"], None)],
                  torch.zeros(4, 11, N))[0]
    assert_close("merged forward", ym, ref, yp)
    # round trip: ours vs the original weight, base = peft's own merge/unmerge round trip
    assert_close("W round trip", ours.base_layer.weight, W0, pl.base_layer.weight)
    assert torch.equal(ours(x).detach(), LoRALinear.forward(ours, x).detach())


def test_merge_bf16_math_in_fp32():
    """peft #1388: the delta is summed in fp32 and rounded once, never formed in bf16."""
    torch.manual_seed(0)
    base = nn.Linear(64, 48, dtype=torch.bfloat16)
    ours = LoRALinear(base, r=16, lora_alpha=32, init_lora_weights=False)
    W0 = base.weight.detach().clone()
    want = (W0.float() + ours.get_delta_weight("default")).to(torch.bfloat16)
    ours.merge()
    assert torch.equal(ours.base_layer.weight, want)


def test_merged_adapter_is_skipped_and_disable():
    pm, pl, ours = _multi(seed=41)
    x = torch.randn(3, K)
    with torch.no_grad():
        y0 = ours(x)
        ours.merge()
        assert torch.allclose(ours(x), y0, atol=1e-5)
        with pytest.raises(ValueError, match="merged"):
            ours(x, adapter_ids=torch.zeros(3, dtype=torch.long))
        ours.set_adapter("b")
        ours.lora_A["b"].requires_grad_(False)  # frozen (e.g. loaded for inference)
        ours.merge()
        with disable_adapters(ours):
            assert not ours.merged  # disabling unmerges, as peft
            assert torch.equal(ours(x), F.linear(x, ours.weight, ours.bias))
        assert not ours.lora_A["b"].weight.requires_grad and ours.lora_B["b"].weight.requires_grad
        ours.set_adapter("default")
        assert torch.allclose(ours(x), y0, atol=1e-6)


# --------------------------------------------------------------------- dropout


def test_dropout_only_on_lora_path():
    pm, pl = _peft_layer(r=8, alpha=16, seed=51, lora_dropout=0.5)
    ours = _ours_from(pl)
    x = torch.randn(4, 6, K)
    ours.eval(); pl.eval()
    with torch.no_grad():
        ref_eval = pl(x)
        assert torch.allclose(ours(x), ref_eval, atol=1e-5)
    ours.train(); pl.train()
    torch.manual_seed(123)
    yt = ours(x)
    torch.manual_seed(123)
    ypt = pl(x)  # peft: base(x) + B(A(drop(x))) s, one dropout call on x: the same RNG draws
    torch.manual_seed(123)
    mask = F.dropout(torch.ones_like(x), 0.5, True)
    ref = _oracle(x * mask, pl.base_layer.weight, None, [], torch.zeros(4, 6, N))[0]
    ref = ref + x.double() @ pl.base_layer.weight.double().t() \
        - (x * mask).double() @ pl.base_layer.weight.double().t() + pl.base_layer.bias.double()
    ref = ref + ((x * mask).double() @ pl.lora_A["default"].weight.double().t()
                 @ pl.lora_B["default"].weight.double().t()) * pl.scaling["default"]
    assert_close("train y", yt, ref, ypt)
    # the base term does not see the dropout: with B = 0 the output is F.linear(x) exactly
    with torch.no_grad():
        ours.lora_B["default"].weight.zero_()
    assert torch.equal(ours(x), F.linear(x, ours.weight, ours.bias))


def test_dropout_multi_adapter_training():
    """Training a mixed batch with dropout: each row gets its own adapter's term on dropped x
    (per-adapter loop, as peft), the base term sees x itself."""
    pm, pl, ours = _multi(seed=57)
    for n in ours.adapter_names:
        ours.lora_dropout[n] = nn.Dropout(0.3)
    ours.train()
    x = torch.randn(4, 5, K)
    ids = torch.tensor([2, -1, 0, 2])
    torch.manual_seed(9)
    y = ours(x, adapter_ids=ids)
    torch.manual_seed(9)
    want = F.linear(x, ours.weight, ours.bias).double()
    for i, n in enumerate(ours.adapter_names):
        rows = (ids == i).nonzero().squeeze(1)
        if rows.numel():
            xd = F.dropout(x[rows], 0.3, True).double()
            want[rows] += (xd @ ours.lora_A[n].weight.double().t()
                           @ ours.lora_B[n].weight.double().t()) * ours.scaling[n]
    assert torch.allclose(y.double(), want, atol=1e-5)
    assert torch.equal(y[1], F.linear(x, ours.weight, ours.bias)[1])


# --------------------------------------------------------------------- peft file format


def _toy_peft(seed, **cfg):
    torch.manual_seed(seed)
    plain = Toy()
    pm = get_peft_model(copy.deepcopy(plain), LoraConfig(target_modules=["q", "v"], **cfg))
    _randomize(pm, seed + 1)
    return plain, pm


def _model_rule(name, ours_model, peft_model, x, **kw):
    """Whole-model check: oracle = float64 copy of the peft model, base = peft fp32."""
    with torch.no_grad():
        got = ours_model(x, **kw) if kw else ours_model(x)
        base = peft_model(x, **kw)
        ref = copy.deepcopy(peft_model).double()(x.double(), **kw)
    assert_close(name, got, ref, base)


def test_peft_saved_adapter_loads_into_plain_model(tmp_path):
    plain, pm = _toy_peft(61, r=4, lora_alpha=8, modules_to_save=["head"],
                          rank_pattern={"blocks.1.v": 6}, alpha_pattern={"q": 3})
    with torch.no_grad():
        pm.base_model.model.head.modules_to_save["default"].weight.mul_(-1.5)
    pm.save_pretrained(tmp_path)
    rep = load_adapter(plain, str(tmp_path))
    assert rep["modules"] == ["blocks.0.q", "blocks.0.v", "blocks.1.q", "blocks.1.v"]
    assert rep["other_keys"] == ["head.bias", "head.weight"]
    assert plain.blocks[1]["v"].r["default"] == 6
    assert plain.blocks[0]["q"].lora_alpha["default"] == 3
    assert not plain.blocks[0]["q"].lora_A["default"].weight.requires_grad  # inference, as peft
    pm.eval()
    _model_rule("loaded", plain, pm, torch.randn(3, 5, 24))


def test_save_adapter_loads_in_peft(tmp_path):
    torch.manual_seed(71)
    model = Toy()
    plain = copy.deepcopy(model)
    add_lora(model, ["q"], r=4, lora_alpha=8, init_lora_weights=False)
    add_lora(model, ["blocks.1.v"], r=2, lora_alpha=5, init_lora_weights=False)
    _randomize(model, 72)
    cfg = save_adapter(model, str(tmp_path))
    assert cfg["rank_pattern"] and cfg["alpha_pattern"]
    pm = PeftModel.from_pretrained(plain, str(tmp_path))
    pl = pm.base_model.model
    assert pl.blocks[1]["v"].r["default"] == 2 and pl.blocks[1]["v"].lora_alpha["default"] == 5
    assert pl.blocks[0]["v"].__class__.__name__ == "Linear" and not hasattr(pl.blocks[0]["v"],
                                                                             "lora_A")
    pm.eval()
    _model_rule("saved", model, pm, torch.randn(2, 4, 24))


def test_load_adapter_round_trip_and_peft_state_dict(tmp_path):
    """save_adapter -> load_adapter gives the same model; a peft state dict loads as is."""
    plain, pm = _toy_peft(81, r=4, lora_alpha=8)
    mine = copy.deepcopy(plain)
    sd = {k[len("base_model.model."):]: v for k, v in pm.state_dict().items()}
    add_lora(mine, ["q", "v"], r=4, lora_alpha=8)
    mine.load_state_dict(sd)  # strict: peft's keys are ours
    save_adapter(mine, str(tmp_path), adapter_name="default")
    back = copy.deepcopy(plain)
    load_adapter(back, str(tmp_path), adapter_name="x")
    x = torch.randn(2, 3, 24)
    with torch.no_grad():
        assert torch.equal(back(x), mine(x))


def test_single_layer_save_load_and_bare_linear(tmp_path):
    torch.manual_seed(0)
    lin = LoRALinear(nn.Linear(K, N), r=3, lora_alpha=5, init_lora_weights=False)
    save_adapter(lin, str(tmp_path))
    other = LoRALinear(copy.deepcopy(lin.base_layer), adapter_name=None)
    assert load_adapter(other, str(tmp_path))["modules"] == [""]
    x = torch.randn(4, K)
    with torch.no_grad():
        assert torch.equal(other(x), lin(x))
    with pytest.raises(ValueError, match="bare nn.Linear"):
        load_adapter(nn.Linear(K, N), str(tmp_path))


def test_hf_bert_adapter_from_peft(tmp_path):
    """A peft adapter saved from a (tiny, random) HF BertModel loads into a plain BertModel."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48, vocab_size=50)
    plain = BertModel(cfg).eval()
    pm = get_peft_model(copy.deepcopy(plain), LoraConfig(r=4, lora_alpha=8,
                                                         target_modules=["query", "value",
                                                                         "dense"]))
    _randomize(pm, 1)
    pm.save_pretrained(tmp_path)
    rep = load_adapter(plain, str(tmp_path))
    assert len(rep["modules"]) == 2 * 5 + 1  # query, value, 3 dense per layer; pooler.dense
    pm.eval()
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        got = plain(ids).last_hidden_state
        base = pm(input_ids=ids).last_hidden_state
        ref = copy.deepcopy(pm).double()(input_ids=ids).last_hidden_state
    assert_close("bert", got, ref, base)


def test_pickle_refused(tmp_path):
    plain, pm = _toy_peft(91, r=4, lora_alpha=8)
    pm.save_pretrained(tmp_path, safe_serialization=False)
    assert os.path.exists(tmp_path / "adapter_model.bin")
    with pytest.raises(ValueError, match="pickle"):
        load_adapter(copy.deepcopy(plain), str(tmp_path))
    torch.save({"a": torch.zeros(1)}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="pickle"):
        load_adapter(copy.deepcopy(plain), str(tmp_path))


def test_load_adapter_strict_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    plain, pm = _toy_peft(101, r=4, lora_alpha=8)
    pm.save_pretrained(tmp_path)
    f = tmp_path / "adapter_model.safetensors"
    sd = load_file(f)

    def expect(mutated, match):
        save_file(mutated, f)
        m = copy.deepcopy(plain)
        before = {k: v.clone() for k, v in m.state_dict().items()}
        with pytest.raises(ValueError, match=match):
            load_adapter(m, str(tmp_path))
        assert not any(isinstance(x, LoRALinear) for x in m.modules())  # untouched
        assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())

    expect({k.replace("blocks.1.q", "blocks.2.q"): v for k, v in sd.items()},
           "does not have")  # targeted by "q", but the model has no blocks.2
    expect({k: v for k, v in sd.items() if not k.endswith("blocks.0.v.lora_B.weight")},
           "no lora_B")
    expect({**sd, "base_model.model.blocks.0.q.lora_A.weight": torch.zeros(4, 7)}, "do not fit")
    expect({**sd, "base_model.model.head.weight": torch.zeros(5, 24)}, "unexpected key")
    expect({k.replace("base_model.model.", ""): v for k, v in sd.items()}, "prefix")
    save_file(sd, f)
    m = copy.deepcopy(plain)
    load_adapter(m, str(tmp_path))
    with pytest.raises(ValueError, match="already has an adapter"):
        load_adapter(m, str(tmp_path))


def _edit_config(tmp_path, **fields):
    import json
    f = tmp_path / "adapter_config.json"
    cfg = json.loads(f.read_text())
    cfg.update(fields)
    f.write_text(json.dumps(cfg))


@pytest.mark.parametrize("fields", [{"target_modules": ["q"]},
                                    {"exclude_modules": ["blocks.1.q", "blocks.0.v"]},
                                    {"target_modules": "0\\.blocks\\.1\\.(q|v)"},
                                    {"layers_to_transform": [1], "layers_pattern": "blocks"}],
                         ids=["target", "exclude", "regex", "layers"])
def test_load_adapter_honours_target_and_exclude_modules(tmp_path, fields):
    """Issue 16 item 10: load_adapter applied every LoRA weight in the file, ignoring the
    config's target_modules / exclude_modules, so outputs differed from PeftModel by up to 0.91.
    peft injects only the targeted modules (and ignores the other weights): so must we."""
    torch.manual_seed(121)
    plain = nn.Sequential(Toy())  # names "0.blocks.1.q": a layer index after a dot, which
    pm = get_peft_model(copy.deepcopy(plain), LoraConfig(  # every peft version matches
        target_modules=["q", "v"], r=4, lora_alpha=8, init_lora_weights=False))
    _randomize(pm, 122)
    pm.save_pretrained(tmp_path)
    _edit_config(tmp_path, **fields)
    torch.manual_seed(0)
    ref = PeftModel.from_pretrained(copy.deepcopy(plain), str(tmp_path))
    rep = load_adapter(plain, str(tmp_path))
    lora_layers = sorted(n for n, m in ref.base_model.model.named_modules()
                         if hasattr(m, "lora_A"))
    assert rep["modules"] == lora_layers and 0 < len(rep["modules"]) < 4
    assert sorted(rep["ignored"] + rep["modules"]) == [f"0.blocks.{i}.{t}" for i in (0, 1)
                                                       for t in ("q", "v")]
    ref.eval()
    _model_rule("targeted", plain, ref, torch.randn(3, 5, 24))


@pytest.mark.parametrize("content, match", [
    ([1, 2], "JSON object"), (None, "JSON object"), (4, "JSON object"), ("x", "JSON object"),
    ({"rank_pattern": {"(": 4}}, "rank_pattern.*regular expression"),
    ({"alpha_pattern": {"q": "x"}}, "alpha_pattern.*finite number"),
    ({"rank_pattern": {"q": 0}}, "rank_pattern.*positive int"),
    ({"lora_alpha": "eight"}, "lora_alpha must be a finite number"),
    ({"lora_alpha": float("nan")}, "lora_alpha must be a finite number"),
    ({"lora_alpha": float("inf")}, "lora_alpha must be a finite number"),
    ({"lora_dropout": "abc"}, "lora_dropout must be a number in"),
    ({"lora_dropout": 1.5}, "lora_dropout must be a number in"),
    ({"r": "4"}, "r must be a positive int"),
    ({"use_rslora": "yes"}, "use_rslora must be true or false"),
    ({"target_modules": 7}, "target_modules must be"),
    ({"target_modules": "(q"}, "target_modules.*regular expression"),
    ({"exclude_modules": [1]}, "exclude_modules must be"),
    ({"layers_to_transform": "1"}, "layers_to_transform must be"),
], ids=lambda v: repr(v)[:40])
def test_load_adapter_bad_config_fields(tmp_path, content, match):
    """Issue 16 items 10 and 16: adapter_config.json holding [1, 2], null or 4 gave an
    AttributeError, rank_pattern {"(": 4} a raw re.error, lora_alpha "eight" / dropout "abc"
    raw errors, and lora_alpha NaN / Infinity was accepted (NaN outputs).  Each is now a
    ValueError naming the file and the field, before the model is touched."""
    import json
    plain, pm = _toy_peft(131, r=4, lora_alpha=8)
    pm.save_pretrained(tmp_path)
    f = tmp_path / "adapter_config.json"
    if isinstance(content, dict):
        cfg = json.loads(f.read_text())
        cfg.update(content)
        content = cfg
    f.write_text(json.dumps(content))  # NaN / Infinity written as JSON allows in Python
    m = copy.deepcopy(plain)
    with pytest.raises(ValueError, match=match) as e:
        load_adapter(m, str(tmp_path))
    assert "adapter_config.json" in str(e.value)
    assert not any(isinstance(x, LoRALinear) for x in m.modules())


# --------------------------------------------------------------------- module API


def _per_sample(model, x, names):
    """Each sample run alone with its adapter made active (or all disabled for the base)."""
    outs = []
    for i, n in enumerate(names):
        if n == "__base__":
            with disable_adapters(model):
                outs.append(model(x[i:i + 1]))
        else:
            set_adapter(model, n)
            outs.append(model(x[i:i + 1]))
    return torch.cat(outs)


def test_adapter_batch_through_a_whole_model():
    """adapter_batch(model, names): a mixed batch through a model whose forward does not pass
    adapter_ids down = each sample run with its own adapter."""
    torch.manual_seed(0)
    m = Toy()
    add_lora(m, ["q", "v"], r=4, lora_alpha=8, init_lora_weights=False)
    add_lora(m, ["q", "v"], adapter_name="b", r=3, lora_alpha=3, init_lora_weights=False)
    x = torch.randn(4, 5, 24)
    names = ["b", "__base__", "default", "b"]
    oracle = copy.deepcopy(m).double()
    with torch.no_grad():
        with adapter_batch(m, names):
            got = m(x)
        base = _per_sample(copy.deepcopy(m), x, names)
        ref = _per_sample(oracle, x.double(), names)
    assert_close("adapter_batch", got, ref, base)


def test_adapter_management():
    torch.manual_seed(0)
    lin = LoRALinear(nn.Linear(K, N), r=4, lora_alpha=4, init_lora_weights=False)
    x = torch.randn(2, K)
    with torch.no_grad():
        assert not torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))  # B random
    lin.add_adapter("b", r=3, lora_alpha=6, init_lora_weights=False)
    assert lin.active_adapters == ["default"] and lin.adapter_names == ["default", "b"]
    assert not lin.lora_A["b"].weight.requires_grad
    lin.set_adapter("b")
    assert lin.lora_A["b"].weight.requires_grad and not lin.lora_A["default"].weight.requires_grad
    with pytest.raises(ValueError, match="unknown adapter"):
        lin.set_adapter("zzz")
    with pytest.raises(ValueError, match="already exists"):
        lin.add_adapter("b")
    lin.delete_adapter("b")
    assert lin.adapter_names == ["default"] and lin.active_adapters == ["default"]
    assert "lora_A.b.weight" not in lin.state_dict()
    fresh = LoRALinear(nn.Linear(K, N), r=4)
    with torch.no_grad():  # peft init: B = 0, the layer starts as the base
        assert torch.equal(fresh(x), F.linear(x, fresh.weight, fresh.bias))
    with pytest.raises(TypeError, match="base"):
        LoRALinear(nn.Conv1d(3, 3, 1))
    with pytest.raises(ValueError, match="matched no"):
        add_lora(Toy(), ["nothing"])


# --------------------------------------------------------------------- on the device


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_equals_peft(dtype):
    """Single adapter (fwd + grads) and a mixed batch on CUDA, backend="auto"."""
    pm, pl = _peft_layer(r=16, alpha=32, dtype=dtype, seed=5)
    pm.add_adapter("b", LoraConfig(r=8, lora_alpha=8, target_modules=["proj"]))
    _randomize(pm, 6)
    pm.cuda().eval()
    ours = _ours_from(pl).cuda().eval()
    x = torch.randn(3, 77, K, device="cuda").to(dtype)
    dy = torch.randn(3, 77, N, device="cuda").to(dtype)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    y, yp = ours(xs[0]), pl(xs[1])
    A, B, s = pl.lora_A["default"].weight, pl.lora_B["default"].weight, pl.scaling["default"]
    ref = _oracle(x.cpu(), pl.base_layer.weight.cpu(), pl.base_layer.bias.cpu(),
                  [(A.cpu(), B.cpu(), s, None)], dy.cpu())
    assert_close("y", y, ref[0], yp)
    got = _grads(y, [xs[0], ours.lora_A["default"].weight, ours.lora_B["default"].weight], dy)
    base = _grads(yp, [xs[1], A, B], dy)
    for n, g, r_, b_ in zip(("dx", "dA", "dB"), got, ref[1:], base):
        assert_close(n, g, r_, b_, grad=True)
    names = ["b", "__base__", "default"]
    with torch.no_grad():
        y = ours(x, adapter_ids=names)
        yp = pm(x, adapter_names=names)
    terms = [(pl.lora_A[n].weight.cpu(), pl.lora_B[n].weight.cpu(), pl.scaling[n],
              torch.tensor([m == n for m in names])[:, None].expand(3, 77))
             for n in ("default", "b")]
    ref = _oracle(x.cpu(), pl.base_layer.weight.cpu(), pl.base_layer.bias.cpu(), terms,
                  dy.cpu())[0]
    assert_close("mixed", y, ref, yp)
