"""`mmcore export RUN OUT`: a trained run as a plain Hugging Face checkpoint directory.

    OUT/config.json, OUT/model.safetensors   the text encoder with the run's training merged in
                                             (LoRA: W + (alpha/r)·B·A; BitFit / full: the trained
                                             tensors), BertModel / RobertaModel names — loads with
                                             AutoModel.from_pretrained(OUT), no mmcore needed
    OUT/tokenizer.json, ...                  the run's tokenizer files (AutoTokenizer)
    OUT/head.safetensors                     the run's head (see mmcore/train/run_dir.py)
    OUT/mmcore_run.json                      the run's run.json: labels, pooling, window and
                                             global tokens for long documents

The encoder's position table is the base's (max_position_embeddings unchanged): to read
documents longer than it as the run did, patch the loaded model with
``mmcore.patch(model, long_context=mmcore.LongContext(window=run["window"]))``.
"""
from __future__ import annotations

import json
import os
import shutil
import sys

__all__ = ["export_run", "add_export_parser", "run_export"]


def _pooler(base_dir: str) -> dict:
    """The base checkpoint's pooler tensors (untrained by the run; kept so that BertModel does
    not initialise a random one)."""
    from .models.loading import Checkpoint

    ck = Checkpoint(base_dir)
    out = {}
    for k in ck.keys():
        plain = k.split(".", 1)[1] if k.startswith(("bert.", "roberta.")) else k
        if plain.startswith("pooler.dense."):
            out[plain] = ck.get(k)
    return out


def export_run(run_dir: str, out_dir: str, *, base=None) -> dict:
    """Write run_dir's model as a Hugging Face checkpoint dir out_dir (see the module doc).
    out_dir must not exist or be empty.  Returns {"out_dir", "tensors", "files"}."""
    from safetensors.torch import save_file

    from .inference import load_run
    from .models.text_encoder import hf_name
    from .nn.lora import merge_adapters

    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise ValueError(f"export target {out_dir!r} exists and is not an empty directory")
    model = load_run(run_dir, base=base)
    m = model.manifest
    prefix = m.get("text_encoder")
    if prefix is None:
        raise ValueError(f"{run_dir}: a {m['task']} run without a text encoder; nothing to "
                         f"export as a Hugging Face model")
    enc = model.model.get_submodule(prefix[:-1]) if prefix else model.model
    merge_adapters(enc)
    sd = {}
    for k, v in enc.state_dict().items():
        if ".lora_A." in k or ".lora_B." in k:
            continue
        sd[hf_name(k.replace(".base_layer.", "."))] = v.detach().float().contiguous()
    base_dir = m["base"]["path"] if base is None else os.fspath(base)
    for k, v in _pooler(base_dir).items():
        sd.setdefault(k, v.float().contiguous())
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file(sd, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(base_dir, "config.json")) as f:
        cfg = json.load(f)
    cfg.pop("_name_or_path", None)
    arch = {"bert": "BertModel", "roberta": "RobertaModel", "xlm-roberta": "XLMRobertaModel"}
    if cfg.get("model_type") in arch:
        cfg["architectures"] = [arch[cfg["model_type"]]]
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    files = list(m["files"].get("tokenizer") or [])
    for name in files + ([m["files"]["head"]] if m["files"].get("head") else []):
        shutil.copyfile(os.path.join(run_dir, name), os.path.join(tmp, name))
    if "tokenizer_config.json" not in files and "tokenizer.json" in files:
        with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:  # AutoTokenizer's key
            json.dump({"tokenizer_class": "PreTrainedTokenizerFast",
                       "model_max_length": int(cfg.get("max_position_embeddings", 512))}, f)
    shutil.copyfile(os.path.join(run_dir, "run.json"), os.path.join(tmp, "mmcore_run.json"))
    if os.path.isdir(out_dir):
        os.rmdir(out_dir)
    os.replace(tmp, out_dir)
    return {"out_dir": out_dir, "tensors": len(sd), "files": sorted(os.listdir(out_dir))}


def add_export_parser(subparsers):
    p = subparsers.add_parser(
        "export", help="write a trained run as a plain Hugging Face checkpoint dir",
        description="Write the run's text encoder, its training merged in, as a Hugging Face "
                    "checkpoint directory (config.json, model.safetensors, tokenizer files) "
                    "that AutoModel.from_pretrained(OUT) loads without mmcore, plus the run's "
                    "head (head.safetensors) and settings (mmcore_run.json).")
    p.add_argument("run", metavar="RUN", help="run directory written by mmcore train")
    p.add_argument("out", metavar="OUT", help="directory to create (must not exist or be empty)")
    p.add_argument("--base", metavar="DIR", help="the base model dir, if it moved since training")
    return p


def run_export(args) -> int:
    try:
        res = export_run(args.run, args.out, base=args.base)
    except (ValueError, FileNotFoundError) as e:
        print(f"mmcore export: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {res['out_dir']}: {', '.join(res['files'])}")
    return 0
