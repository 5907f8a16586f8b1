"""Hugging Face loads what mmcore trained (issue 22): the run's adapter goes into
`PeftModel.from_pretrained(AutoModel.from_pretrained(base), RUN/adapter)`, and that model,
patched with `mmcore.patch(long_context=LongContext(<the run's window>))`, plus the run's
head.safetensors gives the logits of `mmcore predict` on documents longer than 512 tokens
(tolerance rule: oracle = the run's model in float64).  `mmcore export` writes a plain
checkpoint that AutoModel loads in a process that never imports mmcore."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from kit import assert_close
from kit_run import documents, hf_base, write_jsonl

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _train(tmp, base, **kw):
    from mmcore.train import TrainConfig, train

    n = torch.get_num_threads()
    cfg = dict(model=base, train_file=write_jsonl(tmp / "train.jsonl", documents(8, 0)),
               window=8, pooling="attention", lr=1e-2, head_lr=2e-2, lora_bias="lora_only",
               max_steps=3, batch_size=4, threads=1, progress=False, out_dir=str(tmp / "run"))
    cfg.update(kw)
    try:
        train(TrainConfig(**cfg), log=lambda s: None)
    finally:
        torch.set_num_threads(n)
    return cfg["out_dir"]


def head_logits(h, mask, head: dict, pooling: str):
    """The documented head.safetensors format: h (B, S, H), mask (B, S) -> logits (B, C)."""
    if pooling == "cls":
        pooled = h[:, 0]
    elif pooling == "mean":
        m = mask[..., None].to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1)
    else:
        s = F.linear(torch.tanh(F.linear(h, head["pool.proj.weight"], head["pool.proj.bias"])),
                     head["pool.score.weight"])  # (B, S, K)
        s = s.masked_fill(~mask.bool()[..., None], float("-inf"))
        pooled = torch.einsum("bsk,bsh->bkh", s.softmax(1), h).flatten(1)  # (B, K·H)
    return F.linear(pooled, head["head.weight"], head["head.bias"])


def _hf_inputs(texts, run_dir, pad_id):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(run_dir, "tokenizer.json"))
    tok.pad_token_id = pad_id
    return tok(texts, padding=True, truncation=False, return_tensors="pt")


@pytest.mark.parametrize("family", ["bert", "roberta", "xlm-roberta", "minilm"])
def test_peft_adapter_plus_head_equals_mmcore_predict(family, tmp_path):
    import mmcore
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModel

    from mmcore.models import default_text_model

    base = default_text_model() if family == "minilm" else \
        hf_base(str(tmp_path / "base"), family=family)
    run = _train(tmp_path, base, **({"max_steps": 2, "batch_size": 2} if family == "minilm"
                                     else {}))
    man = json.load(open(os.path.join(run, "run.json")))
    ac = json.load(open(os.path.join(run, "adapter", "adapter_config.json")))
    assert ac["base_model_name_or_path"] == os.path.abspath(base) and ac["bias"] == "lora_only"
    assert all(t.startswith("encoder.layer.") for t in ac["target_modules"])
    # documents past 512 tokens (and past the tiny bases' 128 learned positions)
    texts = [d["text"] for d in documents(3, 5, words=(560, 700))]
    ref = mmcore.load_run(run).logits(texts)
    oracle = mmcore.load_run(run, dtype=torch.float64).logits(texts)
    cfg = json.load(open(os.path.join(base, "config.json")))
    enc = _hf_inputs(texts, run, cfg.get("pad_token_id", 0))
    assert enc["input_ids"].shape[1] > 512
    model = PeftModel.from_pretrained(AutoModel.from_pretrained(base),
                                      os.path.join(run, "adapter")).eval()
    mmcore.patch(model.base_model.model, long_context=mmcore.LongContext(
        window=man["window"], global_tokens=man["global_tokens"], max_length=1024))
    with torch.no_grad():
        h = model(**enc).last_hidden_state
    logits = head_logits(h, enc["attention_mask"], load_file(os.path.join(run,
                                                                           "head.safetensors")),
                         man["pooling"])
    assert_close(f"{family}.peft+head logits", logits, oracle, ref)
    assert ref.abs().max() > 0.05  # a trained head, not zeros
    # mmcore's own peft-format loader reads the same directory into the plain HF model
    from mmcore.nn import load_adapter

    plain = AutoModel.from_pretrained(base).eval()
    rep = load_adapter(plain, os.path.join(run, "adapter"))
    assert len(rep["modules"]) == len(ac["target_modules"]) and rep["other_keys"]  # + biases
    mmcore.patch(plain, long_context=mmcore.LongContext(window=man["window"], max_length=1024))
    with torch.no_grad():
        h2 = plain(**enc).last_hidden_state
    logits2 = head_logits(h2, enc["attention_mask"],
                          load_file(os.path.join(run, "head.safetensors")), man["pooling"])
    assert_close(f"{family}.load_adapter+head logits", logits2, oracle, ref)


EXPORT_CHECK = r"""
import builtins, json, sys
real = builtins.__import__
def guard(name, *a, **k):
    if name == "mmcore" or name.startswith("mmcore."):
        raise ImportError("mmcore must not be imported here")
    return real(name, *a, **k)
builtins.__import__ = guard
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoTokenizer
out, texts, w = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
tok = AutoTokenizer.from_pretrained(out)
model = AutoModel.from_pretrained(out, attn_implementation="eager").eval()
enc = tok(texts, padding=True, return_tensors="pt")
S = enc["input_ids"].shape[1]
i, j = torch.arange(S)[:, None], torch.arange(S)[None, :]
allowed = ((i - j).abs() <= w) | (i < 1) | (j < 1)          # window + global [CLS]
m = allowed[None, None] & enc["attention_mask"].bool()[:, None, None, :]
mask = torch.zeros(m.shape).masked_fill(~m, torch.finfo(torch.float32).min)
with torch.no_grad():
    h = model(input_ids=enc["input_ids"], attention_mask=mask).last_hidden_state
save_file({"h": h.contiguous(), "mask": enc["attention_mask"]}, out + "/../hidden.safetensors")
print("mmcore" in sys.modules)
"""


def test_export_loads_in_plain_transformers(tmp_path):
    import mmcore
    from safetensors.torch import load_file

    from mmcore.cli import main

    base = hf_base(str(tmp_path / "base"))
    run = _train(tmp_path, base, pooling="mean")
    out = str(tmp_path / "export")
    assert main(["export", run, out]) == 0
    for f in ("config.json", "model.safetensors", "tokenizer.json", "head.safetensors",
              "mmcore_run.json"):
        assert os.path.isfile(os.path.join(out, f)), f
    assert main(["export", run, out]) == 2  # never over an existing export
    # short documents (< 128 positions): the window is applied as an explicit dense mask
    texts = [d["text"] for d in documents(4, 7, words=(20, 90))]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, "-c", EXPORT_CHECK, out, json.dumps(texts), "8"],
                       capture_output=True, text=True, env=dict(env, HF_HUB_OFFLINE="1"),
                       cwd=str(tmp_path), timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip().splitlines()[-1] == "False"
    got = load_file(str(tmp_path / "hidden.safetensors"))
    head = load_file(os.path.join(out, "head.safetensors"))
    logits = head_logits(got["h"], got["mask"], head, "mean")
    ref = mmcore.load_run(run).logits(texts)
    oracle = mmcore.load_run(run, dtype=torch.float64).logits(texts)
    assert_close("export logits", logits, oracle, ref)
