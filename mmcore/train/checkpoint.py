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


def _read_json(p: str, what: str) -> dict:
    """A JSON file's object; ValueError naming the file when it is unreadable, not JSON, or
    not a JSON object."""
    try:
        with open(p, encoding="utf-8") as f:
            v = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{p}: damaged {what}: not valid JSON ({e})") from None
    except IsADirectoryError:
        raise ValueError(f"{p}: is a directory, expected the {what}") from None
    if not isinstance(v, dict):
        raise ValueError(f"{p}: damaged {what}: expected a JSON object, got "
                         f"{type(v).__name__}")
    return v


def _plain_name(n) -> bool:
    return isinstance(n, str) and n not in ("", ".", "..") and "/" not in n and "\\" not in n


def read_index(ckpt_root: str) -> dict:
    """checkpoints/index.json, checked: {"last": [names], "best": name | null,
    "best_metric": number | null}; ValueError naming the file otherwise."""
    p = os.path.join(ckpt_root, "index.json")
    if not os.path.isfile(p):
        return {"last": [], "best": None, "best_metric": None}
    idx = _read_json(p, "checkpoint index")
    last, best = idx.get("last"), idx.get("best")
    if not isinstance(last, list) or not all(_plain_name(n) for n in last):
        raise ValueError(f"{p}: damaged checkpoint index: 'last' must be a list of checkpoint "
                         f"names, got {last!r:.80}")
    if best is not None and not _plain_name(best):
        raise ValueError(f"{p}: damaged checkpoint index: 'best' must be a checkpoint name or "
                         f"null, got {best!r:.80}")
    bm = idx.get("best_metric")
    if bm is not None and (isinstance(bm, bool) or not isinstance(bm, (int, float))):
        raise ValueError(f"{p}: damaged checkpoint index: 'best_metric' must be a number or "
                         f"null, got {bm!r:.80}")
    return {"last": list(last), "best": best, "best_metric": bm}


def save_checkpoint(ckpt_root: str, name: str, *, model: nn.Module, optimizer, scheduler,
                    scaler, state: dict, config: dict, d: D.Dist, mode: str,
                    adapter_config: Optional[dict] = None, keep_last: int = 2,
                    is_best: bool = False, best_metric=None) -> str:
    """Collective (every rank calls it); rank 0 writes.  Returns the checkpoint's path."""
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
            _save({peft_key(k): v for k, v in tensors.items()},
                  os.path.join(adir, "adapter_model.safetensors"))
            with open(os.path.join(adir, "adapter_config.json"), "w") as f:
                json.dump(adapter_config or {}, f, indent=2, sort_keys=True)
        else:
            _save(tensors, os.path.join(tmp, "model.safetensors"))
        opt_t = {}
        for pname, st in osd["state"].items():
            for k, v in st.items():
                opt_t[f"{pname}::{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
        _save(opt_t, os.path.join(tmp, "optimizer.safetensors"))
        groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
                  for g in osd["param_groups"]]
        rng_tensors = {f"rank{r}.{k}": v.contiguous() for r, (t, _) in enumerate(rngs)
                       for k, v in t.items()}
        _save(rng_tensors, os.path.join(tmp, "rng.safetensors"))
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
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--resume {path!r}: no such directory")
    if os.path.isfile(os.path.join(path, "trainer_state.json")):
        return path
    for root in (os.path.join(path, "checkpoints"), path):
        idx = read_index(root)
        if idx["last"]:
            ck = os.path.join(root, idx["last"][-1])
            if not os.path.isfile(os.path.join(ck, "trainer_state.json")):
                raise ValueError(f"{os.path.join(root, 'index.json')}: its newest checkpoint "
                                 f"{idx['last'][-1]!r} has no trainer_state.json (deleted or "
                                 f"damaged)")
            return ck
    raise FileNotFoundError(f"--resume {path!r}: no checkpoint there (expected a "
                            f"trainer_state.json, or checkpoints/index.json under it)")


_STATE_INTS = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "global_batch": 1,
               "world_size": 1, "tokens": 0, "bad_evals": 0}
_STATE_TYPES = {"param_groups": list, "scheduler": dict, "rng": list, "config": dict}


def read_state(path: str) -> dict:
    """<checkpoint>/trainer_state.json, checked (format, the counters, the sections a resume
    reads); ValueError naming the file and the field otherwise."""
    p = os.path.join(path, "trainer_state.json")
    if not os.path.isfile(p):
        raise FileNotFoundError(f"{p}: no such file")
    ts = _read_json(p, "trainer state")
    if ts.get("format") != FORMAT:
        raise ValueError(f"{p}: checkpoint format {ts.get('format')!r}, this mmcore reads "
                         f"{FORMAT}")
    for k, lo in _STATE_INTS.items():
        v = ts.get(k)
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ValueError(f"{p}: damaged trainer state: {k!r} must be an int >= {lo}, got "
                             f"{v!r:.80}")
    for k, t in _STATE_TYPES.items():
        if not isinstance(ts.get(k), t):
            raise ValueError(f"{p}: damaged trainer state: {k!r} must be a JSON "
                             f"{'object' if t is dict else 'list'}, got {ts.get(k)!r:.80}")
    if ts.get("mode") not in ("lora", "bitfit", "full", "head"):
        raise ValueError(f"{p}: damaged trainer state: unknown mode {ts.get('mode')!r:.40}")
    if not all(isinstance(g, dict) for g in ts["param_groups"]):
        raise ValueError(f"{p}: damaged trainer state: param_groups must be objects")
    if len(ts["rng"]) != ts["world_size"]:
        raise ValueError(f"{p}: damaged trainer state: {len(ts['rng'])} RNG states for "
                         f"world_size {ts['world_size']}")
    return ts


def check_checkpoint_files(path: str) -> dict:
    """Validate every file a resume reads (trainer_state.json, the weights, optimizer and RNG
    safetensors headers, adapter_config.json) before anything is loaded or written.
    -> trainer_state.json's dict.  Errors name the file and what is wrong."""
    from ..models.loading import validate_safetensors

    ts = read_state(path)
    files = ["optimizer.safetensors", "rng.safetensors"]
    if ts["mode"] == "lora":
        files.append(os.path.join("adapter", "adapter_model.safetensors"))
        ac = os.path.join(path, "adapter", "adapter_config.json")
        if not os.path.isfile(ac):
            raise FileNotFoundError(f"{ac}: missing (a LoRA checkpoint needs it)")
        acd = _read_json(ac, "adapter config")
        r = acd.get("r")
        if r is not None and (not isinstance(r, int) or isinstance(r, bool) or r < 1):
            raise ValueError(f"{ac}: damaged adapter config: 'r' must be an int >= 1, got "
                             f"{r!r:.40}")
    else:
        files.append("model.safetensors")
    for name in files:
        validate_safetensors(os.path.join(path, name))
    return ts


def _digest(tensors: dict) -> str:
    """sha256 over the tensors' names, dtypes, shapes and bytes (sorted by name): written in
    the file's metadata, so flipped bytes in the data section are caught on resume."""
    import hashlib

    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _save(tensors: dict, path: str) -> None:
    from safetensors.torch import save_file

    save_file(tensors, path, metadata={"format": "pt", "mmcore_sha256": _digest(tensors)})


def _load_tensors(path: str) -> dict:
    """Every tensor of a checkpoint file through mmcore's checking loader, and the checksum
    verified when the file carries one (files of older mmcore do not)."""
    from safetensors import safe_open

    from ..models.loading import read_safetensors

    tensors = read_safetensors(path)
    with safe_open(path, framework="pt") as f:
        want = (f.metadata() or {}).get("mmcore_sha256")
    if want is not None and _digest(tensors) != want:
        raise ValueError(f"{path}: damaged checkpoint file: the tensor data does not match "
                         f"its checksum")
    return tensors


def _check_shapes(path: str, msd: dict, model: nn.Module) -> None:
    params = dict(D.unwrap(model).named_parameters())
    for k, v in msd.items():
        want = tuple(params[k].shape) if k in params else None
        if want is not None and tuple(v.shape) != want:
            hint = " (lora_r differs from the checkpoint's?)" if "lora_" in k else ""
            raise ValueError(f"{path}: tensor {k!r} has shape {tuple(v.shape)} in the "
                             f"checkpoint, the model's is {want}{hint}")
        if want is not None and v.dtype != params[k].dtype and not v.is_floating_point():
            raise ValueError(f"{path}: tensor {k!r} is {v.dtype} in the checkpoint, the "
                             f"model's is {params[k].dtype}")


def load_checkpoint(path: str, *, model: nn.Module, optimizer, scheduler, scaler,
                    d: D.Dist) -> dict:
    """Load weights, optimizer, scheduler, scaler and (same world size) RNG states in place.
    Returns trainer_state.json's dict."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    ts = check_checkpoint_files(path)
    if ts["mode"] == "lora":
        wpath = os.path.join(path, "adapter", "adapter_model.safetensors")
        raw = _load_tensors(wpath)
        try:
            msd = {model_key(k): v for k, v in raw.items()}
        except ValueError as e:
            raise ValueError(f"{wpath}: {e}") from None
    else:
        wpath = os.path.join(path, "model.safetensors")
        msd = _load_tensors(wpath)
    want = {n for n, p in D.unwrap(model).named_parameters() if p.requires_grad}
    if set(msd) != want:
        missing, extra = sorted(want - set(msd)), sorted(set(msd) - want)
        raise ValueError(f"{wpath}: checkpoint tensors do not match the trainable parameters "
                         f"(mode / target_modules changed?): missing {missing[:5]}, "
                         f"unexpected {extra[:5]}")
    _check_shapes(wpath, msd, model)
    opts = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, msd, options=opts)
    opath = os.path.join(path, "optimizer.safetensors")
    flat = _load_tensors(opath)
    state = {}
    for k, v in flat.items():
        pname, _, stat = k.rpartition("::")
        if pname not in want:
            raise ValueError(f"{opath}: optimizer state for {pname or k!r}, which is not a "
                             f"trainable parameter")
        state.setdefault(pname, {})[stat] = v
    sp = os.path.join(path, "trainer_state.json")
    try:
        groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else dict(g)
                  for g in ts["param_groups"]]
        if len(groups) != len(optimizer.param_groups):
            raise ValueError(f"{len(groups)} optimizer param groups, the optimizer has "
                             f"{len(optimizer.param_groups)} (head_lr / mode changed?)")
        set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups},
                                 options=StateDictOptions(full_state_dict=True))
        scheduler.load_state_dict(ts["scheduler"])
        if scaler is not None and ts.get("scaler"):
            scaler.load_state_dict(ts["scaler"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{sp} / {opath}: optimizer or schedule state does not fit this run "
                         f"({type(e).__name__}: {str(e)[:200]})") from None
    if ts["world_size"] == d.world:
        rpath = os.path.join(path, "rng.safetensors")
        rt = _load_tensors(rpath)
        mine = {k.split(".", 1)[1]: v for k, v in rt.items() if k.startswith(f"rank{d.rank}.")}
        try:
            restore_rng(mine, ts["rng"][d.rank])
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
            raise ValueError(f"{rpath} / {sp}: damaged RNG state ({type(e).__name__}: "
                             f"{str(e)[:160]})") from None
    return ts
