"""What each mode trains (LoRA with peft's three bias modes, BitFit, full, frozen encoder +
head), checked against peft's own choice; the trainable-parameter report; AdamW state for the
trainable parameters only; the peft-format adapter a LoRA run writes loads in peft with equal
outputs."""
import json
import os

import pytest
import torch

from kit_train import labelled_jsonl, tiny_model_dir
from mmcore.train import TrainConfig, apply_mode, train, trainable_report
from mmcore.train.optim import build_optimizer
from mmcore.train.tasks import get_task


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    model = tiny_model_dir(str(d / "model"))
    return {"model": model, "train": labelled_jsonl(str(d / "train.jsonl"), 24, seed=0),
            "val": labelled_jsonl(str(d / "val.jsonl"), 8, seed=1), "dir": d}


def _model(tiny, **kw):
    cfg = TrainConfig(model=tiny["model"], pooling="attention", window=8, labels=["neg", "pos"],
                      **kw)
    torch.manual_seed(0)
    return get_task("classification")(cfg).build_model(), cfg


def _names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


HEAD = {"pool.proj.weight", "pool.proj.bias", "pool.score.weight", "head.weight", "head.bias"}


@pytest.mark.parametrize("bias", ["none", "lora_only", "all"])
def test_lora_modes_match_peft(tiny, bias):
    """The trainable set of mode="lora" equals what peft's get_peft_model marks trainable for
    the same LoraConfig (target_modules, bias, modules_to_save = the head)."""
    from peft import LoraConfig, get_peft_model

    m, _ = _model(tiny)
    apply_mode(m, "lora", target_modules=["q", "v"], r=4, lora_alpha=8, bias=bias)
    ours = _names(m)
    p, _ = _model(tiny)
    pm = get_peft_model(p, LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], bias=bias,
                                      modules_to_save=["pool", "head"]))
    theirs = set()
    for n, t in pm.named_parameters():
        if not t.requires_grad:
            continue
        n = n.removeprefix("base_model.model.").replace(".modules_to_save.default", "")
        theirs.add(n)
    assert ours == theirs
    assert HEAD <= ours
    lora = {n for n in ours if ".lora_" in n}
    assert len(lora) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    biases = {n for n in ours - HEAD if n.endswith("bias")}
    if bias == "none":
        assert not biases
    elif bias == "lora_only":
        assert biases == {f"encoder.layers.{i}.attn.{w}.base_layer.bias" for i in (0, 1)
                          for w in "qv"}
    else:
        assert "encoder.ln.bias" in biases and "encoder.layers.1.ff2.bias" in biases


def test_lora_bias_gets_gradient_through_the_fused_op(tiny):
    """bias="lora_only": the base bias of a LoRA layer is trained through mmcore.lora_linear's
    bias gradient (before issue 13 the op had none)."""
    m, _ = _model(tiny)
    apply_mode(m, "lora", target_modules=["q", "v"], r=4, bias="lora_only")
    ids = torch.randint(1000, 5000, (2, 12))
    out = m(ids, torch.tensor([12, 7]), labels=torch.tensor([0, 1]))
    out["loss"].backward()
    g = m.encoder.layers[0].attn.q.base_layer.bias.grad
    assert g is not None and g.abs().sum() > 0


@pytest.mark.parametrize("mode", ["bitfit", "full", "head"])
def test_other_modes(tiny, mode):
    m, _ = _model(tiny)
    apply_mode(m, mode)
    ours = _names(m)
    every = {n for n, _ in m.named_parameters()}
    if mode == "full":
        assert ours == every
    elif mode == "head":
        assert ours == HEAD
    else:
        assert ours == HEAD | {n for n in every if n.endswith(".bias")}


def test_report_like_peft(tiny):
    """Same numbers as peft's print_trainable_parameters for the same config."""
    from peft import LoraConfig, get_peft_model

    m, _ = _model(tiny)
    apply_mode(m, "lora", target_modules=["q", "v"], r=4, bias="all")
    p, _ = _model(tiny)
    pm = get_peft_model(p, LoraConfig(r=4, target_modules=["q", "v"], bias="all",
                                      modules_to_save=["pool", "head"]))
    tr, total = pm.get_nb_trainable_parameters()
    line = trainable_report(m)
    assert line.startswith(f"trainable params: {tr:,} || all params: ")
    d = trainable_report(m, as_dict=True)
    assert d["trainable"] == tr and d["lora"] + d["bias"] + d["head"] == tr
    # peft counts its modules_to_save copies too; ours holds the head once
    head = sum(t.numel() for n, t in m.named_parameters() if n in HEAD)
    assert d["total"] == total - head


def test_optimizer_state_only_for_trainable(tiny):
    m, cfg = _model(tiny)
    apply_mode(m, "lora", target_modules=["q", "v"], r=4, bias="lora_only")
    opt = build_optimizer(m, cfg)
    m(torch.randint(1000, 5000, (2, 9)), torch.tensor([9, 4]),
      labels=torch.tensor([0, 1]))["loss"].backward()
    opt.step()
    by_id = {id(p): n for n, p in m.named_parameters()}
    have = {by_id[id(p)] for p in opt.state}
    assert have == _names(m)
    assert all(g["fused"] for g in opt.param_groups)  # fused AdamW on this torch's CPU
    names = [n for g in opt.param_groups for n in g["param_names"]]
    assert sorted(names) == sorted(_names(m))
    decay = {n for g in opt.param_groups if g["weight_decay"] > 0 for n in g["param_names"]}
    assert all(not n.endswith("bias") for n in decay)


def test_adapter_checkpoint_loads_in_peft_and_mmcore(tiny, tmp_path):
    """A LoRA run with bias="all" writes peft's adapter format: peft's PeftModel rebuilds a
    model whose outputs equal the trained one's."""
    from peft import PeftModel


    cfg = TrainConfig(model=tiny["model"], train_file=tiny["train"], val_file=tiny["val"],
                      pooling="attention", window=8, mode="lora", lora_r=4, lora_bias="all",
                      lr=5e-2, head_lr=5e-2, max_steps=3, batch_size=4, progress=False,
                      load_best=False, threads=1, out_dir=str(tmp_path / "run"))
    threads = torch.get_num_threads()
    try:
        res = train(cfg)
    finally:
        torch.set_num_threads(threads)
    ck = os.path.join(cfg.out_dir, "checkpoints", "step-000003", "adapter")
    ac = json.load(open(os.path.join(ck, "adapter_config.json")))
    assert ac["peft_type"] == "LORA" and ac["bias"] == "all"
    assert ac["modules_to_save"] == ["pool", "head"] and res["state"]["step"] == 3
    trained, _ = _model(tiny)
    apply_mode(trained, "lora", target_modules=["q", "v"], r=4, bias="all")
    from safetensors.torch import load_file

    from mmcore.train.checkpoint import model_key

    sd = {model_key(k): v for k, v in load_file(os.path.join(ck, "adapter_model.safetensors"))
          .items()}
    assert not trained.load_state_dict(sd, strict=False).unexpected_keys
    assert any(v.abs().sum() > 0 for k, v in sd.items() if "lora_B" in k)  # it trained
    ids = torch.randint(1000, 5000, (3, 15))
    lengths = torch.tensor([15, 11, 6])
    base1, _ = _model(tiny)
    pm = PeftModel.from_pretrained(base1, ck)
    for m in (trained, pm):
        m.eval()
    with torch.no_grad():
        want = trained(ids, lengths)["logits"]
        got = pm(input_ids=ids, lengths=lengths)["logits"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
