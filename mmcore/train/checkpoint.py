"""Checkpoints in safetensors + JSON only (never pickle), resumable bitwise on the CPU and
across world sizes (DDP and FSDP2 state is gathered to full tensors by parameter name).

    <out>/checkpoints/index.json                 {"last": [names, oldest first], "best": name,
                                                  "best_metric": v}
    <out>/checkpoints/step-000120/
        adapter/adapter_config.json              LoRA mode: peft's format (PeftModel.from_pretrained
        adapter/adapter_model.safetensors          and mmcore.nn.load_adapter read it)
        model.safetensors                        other modes: the trainable tensors by name
                                                 (full fine-tuning: every tensor)
        optimizer.safetensors                    AdamW state, "<param name>::exp_avg" ...
        rng.safetensors                          torch / numpy RNG states per rank
        trainer_state.json                       step, epoch, position in the epoch's batch
                                                 order, global batch, world size, optimizer
                                                 param groups, scheduler / grad-scaler state,
                                                 python RNG, early-stopping state, config

A checkpoint directory is written as ``<name>.tmp`` and renamed when complete, so a process
killed mid-write leaves the previous checkpoints intact.  ``keep_last`` newest checkpoints are
kept, plus the best one.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Optional

import numpy as np
import torch
from torch import nn

from . import distributed as D

PEFT_PREFIX = "base_model.model."
FORMAT = 1

__all__ = ["save_checkpoint", "load_checkpoint", "find_checkpoint", "peft_key", "model_key",
           "capture_rng", "restore_rng"]


# ---------------------------------------------------------------------- key mapping (LoRA)

_LORA = re.compile(r"\.(lora_A|lora_B)\.([^.]+)\.weight$")


def peft_key(name: str, adapter: str = "default") -> str:
    """Model parameter name -> key in peft's adapter_model.safetensors (adapter name dropped)."""
    m = _LORA.search(name)
    if m:
        if m.group(2) != adapter:
            raise ValueError(f"{name}: belongs to adapter {m.group(2)!r}, not {adapter!r}")
        name = name[:m.start()] + f".{m.group(1)}.weight"
    return PEFT_PREFIX + name


def model_key(key: str, adapter: str = "default") -> str:
    """Inverse of peft_key."""
    if not key.startswith(PEFT_PREFIX):
        raise ValueError(f"adapter key {key!r} lacks peft's {PEFT_PREFIX!r} prefix")
    k = key[len(PEFT_PREFIX):]
    return re.sub(r"\.(lora_A|lora_B)\.weight$", rf".\1.{adapter}.weight", k)


# ---------------------------------------------------------------------- RNG

def capture_rng() -> tuple:
    """(tensors, json) of this process's RNG states: torch CPU (+ CUDA), numpy, python."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64))
    ver, state, gauss = random.getstate()
    js = {"python": [ver, list(state), gauss], "numpy": [name, int(pos), int(has_gauss),
                                                         float(cached)]}
    return tensors, js


def restore_rng(tensors: dict, js: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    name, pos, has_gauss, cached = js["numpy"]
    np.random.set_state((name, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss,
                         cached))
    ver, state, gauss = js["python"]
    random.setstate((ver, tuple(state), gauss))


# ---------------------------------------------------------------------- save

def _full_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)


def _atomic_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def read_index(ckpt_root: str) -> dict:
    p = os.path.join(ckpt_root, "index.json")
    if not os.path.isfile(p):
        return {"last": [], "best": None, "best_metric": None}
    with open(p) as f:
        return json.load(f)


def save_checkpoint(ckpt_root: str, name: str, *, model: nn.Module, optimizer, scheduler,
                    scaler, state: dict, config: dict, d: D.Dist, mode: str,
                    adapter_config: Optional[dict] = None, keep_last: int = 2,
                    is_best: bool = False, best_metric=None) -> str:
    """Collective (every rank calls it); rank 0 writes.  Returns the checkpoint's path."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                         get_optimizer_state_dict)

    msd = get_model_state_dict(model, options=_full_options(ignore_frozen_params=True))
    osd = get_optimizer_state_dict(model, optimizer, options=_full_options())
    rng_t, rng_j = capture_rng()
    rngs = D.gather_objects((rng_t, rng_j), d)
    path = os.path.join(ckpt_root, name)
    if d.main:
        tmp = path + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        tensors = {k: v.detach().cpu().contiguous() for k, v in msd.items()}
        if mode == "lora":
            adir = os.path.join(tmp, "adapter")
            os.makedirs(adir)
            save_file({peft_key(k): v for k, v in tensors.items()},
                      os.path.join(adir, "adapter_model.safetensors"), metadata={"format": "pt"})
            with open(os.path.join(adir, "adapter_config.json"), "w") as f:
                json.dump(adapter_config or {}, f, indent=2, sort_keys=True)
        else:
            save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        opt_t = {}
        for pname, st in osd["state"].items():
            for k, v in st.items():
                opt_t[f"{pname}::{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
        save_file(opt_t, os.path.join(tmp, "optimizer.safetensors"))
        groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
                  for g in osd["param_groups"]]
        rng_tensors = {f"rank{r}.{k}": v.contiguous() for r, (t, _) in enumerate(rngs)
                       for k, v in t.items()}
        save_file(rng_tensors, os.path.join(tmp, "rng.safetensors"))
        ts = dict(state, format=FORMAT, world_size=d.world, mode=mode,
                  param_groups=groups, scheduler=_jsonable(scheduler.state_dict()),
                  scaler=_jsonable(scaler.state_dict()) if scaler is not None else None,
                  rng=[j for _, j in rngs], config=config)
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump(ts, f, indent=1)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
        idx = read_index(ckpt_root)
        idx["last"] = [n for n in idx["last"] if n != name] + [name]
        if is_best:
            idx["best"], idx["best_metric"] = name, best_metric
        keep = set(idx["last"][-keep_last:]) | ({idx["best"]} if idx["best"] else set())
        for n in idx["last"]:
            if n not in keep:
                shutil.rmtree(os.path.join(ckpt_root, n), ignore_errors=True)
        idx["last"] = [n for n in idx["last"] if n in keep]
        _atomic_json(os.path.join(ckpt_root, "index.json"), idx)
    D.barrier(d)
    return path


def _jsonable(o):
    if isinstance(o, dict):
        return {k: _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, torch.Tensor):
        return o.item() if o.numel() == 1 else o.tolist()
    return o


# ---------------------------------------------------------------------- load

def find_checkpoint(path: str) -> str:
    """A checkpoint dir, a run's out dir (its newest checkpoint) or a checkpoints dir."""
    if os.path.isfile(os.path.join(path, "trainer_state.json")):
        return path
    for root in (os.path.join(path, "checkpoints"), path):
        idx = read_index(root)
        if idx["last"]:
            return os.path.join(root, idx["last"][-1])
    raise FileNotFoundError(f"--resume {path!r}: no checkpoint there (expected a "
                            f"trainer_state.json, or checkpoints/index.json under it)")


def read_state(path: str) -> dict:
    with open(os.path.join(path, "trainer_state.json")) as f:
        ts = json.load(f)
    if ts.get("format") != FORMAT:
        raise ValueError(f"{path}: checkpoint format {ts.get('format')!r}, this mmcore reads "
                         f"{FORMAT}")
    return ts


def load_checkpoint(path: str, *, model: nn.Module, optimizer, scheduler, scaler,
                    d: D.Dist) -> dict:
    """Load weights, optimizer, scheduler, scaler and (same world size) RNG states in place.
    Returns trainer_state.json's dict."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    ts = read_state(path)
    if ts["mode"] == "lora":
        raw = load_file(os.path.join(path, "adapter", "adapter_model.safetensors"))
        msd = {model_key(k): v for k, v in raw.items()}
    else:
        msd = load_file(os.path.join(path, "model.safetensors"))
    want = {n for n, p in D.unwrap(model).named_parameters() if p.requires_grad}
    if set(msd) != want:
        missing, extra = sorted(want - set(msd)), sorted(set(msd) - want)
        raise ValueError(f"{path}: checkpoint tensors do not match the trainable parameters "
                         f"(mode / target_modules changed?): missing {missing[:5]}, "
                         f"unexpected {extra[:5]}")
    opts = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, msd, options=opts)
    flat = load_file(os.path.join(path, "optimizer.safetensors"))
    state = {}
    for k, v in flat.items():
        pname, _, stat = k.rpartition("::")
        state.setdefault(pname, {})[stat] = v
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else dict(g)
              for g in ts["param_groups"]]
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups},
                             options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(ts["scheduler"])
    if scaler is not None and ts.get("scaler"):
        scaler.load_state_dict(ts["scaler"])
    if ts["world_size"] == d.world:
        rt = load_file(os.path.join(path, "rng.safetensors"))
        mine = {k.split(".", 1)[1]: v for k, v in rt.items() if k.startswith(f"rank{d.rank}.")}
        restore_rng(mine, ts["rng"][d.rank])
    return ts
