"""peft's LoRA adapter format without peft: load, save, and in-place conversion.

On disk (what ``PeftModel.save_pretrained`` writes and ``PeftModel.from_pretrained`` reads):

    <dir>/adapter_config.json        {"peft_type": "LORA", "r", "lora_alpha", "target_modules",
                                      "rank_pattern", "alpha_pattern", "use_rslora", ...}
    <dir>/adapter_model.safetensors  base_model.model.<module path>.lora_A.weight  (r, K)
                                     base_model.model.<module path>.lora_B.weight  (N, r)
                                     (no adapter name in the keys) + modules_to_save weights

Only safetensors is read: pickle checkpoints (adapter_model.bin, or a pickle/zip renamed to
.safetensors) are refused, since unpickling runs arbitrary code.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from typing import Optional

import torch
from torch import nn

from .lora import LoRALinear, _plain_float_weight, _set_submodule, lora_modules

logger = logging.getLogger("mmcore.nn")

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth",
                 "adapter_model.pkl", "pytorch_model.bin")
_LORA_KEY = re.compile(r"^(?P<path>.*?)\.?(?P<which>lora_A|lora_B)\.weight$")

# LoraConfig fields whose non-default values change the math: refused, not ignored
_UNSUPPORTED = {
    "use_dora": False, "lora_bias": False, "fan_in_fan_out": False, "use_qalora": False,
    "layer_replication": None, "arrow_config": None, "alora_invocation_tokens": None,
    "use_bdlora": None, "velora_config": None, "monteclora_config": None,
    "kasa_config": None, "trainable_token_indices": None, "target_parameters": None,
}


def _pattern_key(patterns, key):
    """peft's get_pattern_key: the first pattern p with (.*\\.)?(p)$ matching key."""
    for p in patterns:
        if re.match(rf"(.*\.)?({p})$", key):
            return p
    return None


def _config_value(cfg, name, key, default):
    pat = cfg.get(name) or {}
    p = _pattern_key(pat.keys(), key)
    return pat[p] if p is not None else default


def _names_match(names, key):
    """peft's rule for target_modules / exclude_modules: a str is a full-match regex, a list
    matches the name itself or a dotted suffix of it."""
    if isinstance(names, str):
        return re.fullmatch(names, key) is not None
    return key in names or any(key.endswith("." + n) for n in names)


def _layer_index(cfg, key):
    """The layer index in `key` for layers_to_transform (None if there is none)."""
    patterns = cfg.get("layers_pattern")
    if not patterns:
        m = re.match(r".*?\.[^.]*\.(\d+)\.", key)
    else:
        m = None
        for p in [patterns] if isinstance(patterns, str) else patterns:
            m = re.match(rf"(?:^|.*?\.){p}\.(\d+)\.", key)
            if m:
                break
    return int(m.group(1)) if m else None


def targeted(cfg, key) -> bool:
    """Does an adapter config target the module named `key` (peft's injection rule:
    exclude_modules, modules_to_save, target_modules, layers_to_transform / layers_pattern)?"""
    excl = cfg.get("exclude_modules")
    if excl and _names_match(excl, key):
        return False
    for m in cfg.get("modules_to_save") or []:
        if re.match(rf"(^|.*\.){m}($|\..*)", key):
            return False
    target = cfg.get("target_modules")
    if target is None or target == "all-linear":
        return True  # all-linear: peft saves the expanded list; an old file may not
    if not _names_match(target, key):
        return False
    layers = cfg.get("layers_to_transform")
    if isinstance(target, str) or layers is None or layers == []:
        return True
    idx = _layer_index(cfg, key)
    return idx is not None and (idx == layers if isinstance(layers, int) else idx in layers)


def _is_real(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_regex(path, field, pattern):
    if not isinstance(pattern, str):
        raise ValueError(f"{path}: {field} must hold strings, got {pattern!r}")
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{path}: {field} holds {pattern!r}, not a valid regular expression "
                         f"({e})") from None


def _check_fields(path, cfg):
    """Types and ranges of the LoraConfig fields load_adapter reads: a clear error naming the
    file and the field, never a raw TypeError / re.error or a NaN adapter."""
    def bad(field, want):
        raise ValueError(f"{path}: {field} must be {want}, got {cfg[field]!r}")
    if "peft_type" in cfg and not isinstance(cfg["peft_type"], str):
        bad("peft_type", "a string")
    if "r" in cfg and (not isinstance(cfg["r"], int) or isinstance(cfg["r"], bool)
                       or cfg["r"] < 1):
        bad("r", "a positive int")
    if "lora_alpha" in cfg and not (_is_real(cfg["lora_alpha"])
                                    and math.isfinite(cfg["lora_alpha"])):
        bad("lora_alpha", "a finite number")
    if "lora_dropout" in cfg and not (_is_real(cfg["lora_dropout"])
                                      and 0 <= cfg["lora_dropout"] < 1):
        bad("lora_dropout", "a number in [0, 1)")
    if "use_rslora" in cfg and not isinstance(cfg["use_rslora"], bool):
        bad("use_rslora", "true or false")
    for field, ok, want in (("rank_pattern", lambda v: isinstance(v, int)
                             and not isinstance(v, bool) and v >= 1, "a positive int"),
                            ("alpha_pattern", lambda v: _is_real(v) and math.isfinite(v),
                             "a finite number")):
        pat = cfg.get(field)
        if pat is None:
            continue
        if not isinstance(pat, dict):
            bad(field, "an object {pattern: value}")
        for k, v in pat.items():
            _check_regex(path, field, k)
            if not ok(v):
                raise ValueError(f"{path}: {field}[{k!r}] must be {want}, got {v!r}")
    for field in ("target_modules", "exclude_modules", "modules_to_save", "layers_pattern"):
        v = cfg.get(field)
        if v is None:
            continue
        if isinstance(v, str) and field != "modules_to_save":
            _check_regex(path, field, v)
        elif isinstance(v, list) and all(isinstance(t, str) for t in v):
            if field == "modules_to_save":
                for t in v:
                    _check_regex(path, field, t)
        else:
            bad(field, "a list of module names" + ("" if field == "modules_to_save"
                                                   else " or a regular expression"))
    lt = cfg.get("layers_to_transform")
    if lt is not None and not (isinstance(lt, int) and not isinstance(lt, bool)) and not (
            isinstance(lt, list) and all(isinstance(i, int) and not isinstance(i, bool)
                                         for i in lt)):
        bad("layers_to_transform", "an int or a list of ints")


def _read_config(directory):
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"directory {directory!r} has no {CONFIG_NAME} (not a peft "
                                f"adapter directory)")
    with open(path) as f:
        try:
            cfg = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise ValueError(f"{path}: not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: must hold a JSON object (peft's LoraConfig fields), got "
                         f"{type(cfg).__name__} {cfg!r:.80}")
    _check_fields(path, cfg)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type is {cfg.get('peft_type')!r}; only 'LORA' adapters "
                         f"can be loaded into LoRALinear")
    for k, ok in _UNSUPPORTED.items():
        v = cfg.get(k, ok)
        if v not in (ok, None, False, {}, []) and v != ok:
            raise ValueError(f"{path}: {k}={v!r} is not supported by mmcore's LoRALinear "
                             f"(plain LoRA on nn.Linear only)")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(
            ("pissa", "olora", "corda", "loftq", "mica", "lora_ga")):
        # these inits rewrite the base weight: the adapter alone does not fit the original base
        raise ValueError(f"{path}: init_lora_weights={init!r} changes the base weight; convert "
                         f"the adapter to plain LoRA with peft first "
                         f"(path_initial_model_for_weight_conversion)")
    if cfg.get("bias", "none") not in ("none", "all", "lora_only"):
        raise ValueError(f"{path}: bias={cfg.get('bias')!r} is not a known peft bias mode")
    return cfg


def _read_weights(directory):
    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(path):
        pick = [n for n in _PICKLE_NAMES if os.path.isfile(os.path.join(directory, n))]
        if pick:
            raise ValueError(f"{directory!r} holds only a pickle checkpoint ({pick[0]}); mmcore "
                             f"refuses pickle files (loading them can run arbitrary code). "
                             f"Convert it to {WEIGHTS_NAME} with a trusted peft install "
                             f"(PeftModel.save_pretrained(..., safe_serialization=True)).")
        raise FileNotFoundError(f"directory {directory!r} has no {WEIGHTS_NAME}")
    # the loader parses the header first and names a pickle / zip only once that fails: a
    # valid safetensors file may start with the byte 0x80 (a header length of 128 mod 256)
    from ..models.loading import read_safetensors

    try:
        return read_safetensors(path)
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e})") from None


def check_adapter_name(name) -> str:
    """An adapter name is a key of the LoRA layers' ModuleDicts: a non-empty string without
    '.' (torch's rule for module names); ValueError naming it otherwise."""
    if not isinstance(name, str) or not name or "." in name or name.strip() != name:
        raise ValueError(f"adapter_name must be a non-empty string without '.' or surrounding "
                         f"spaces (it names a submodule), got {name!r}")
    return name


def load_adapter(model: nn.Module, directory: str, adapter_name: str = "default", *,
                 is_trainable: bool = False, activate: bool = True,
                 dtype: Optional[torch.dtype] = None, backend: str = "auto") -> dict:
    """Load a peft LoRA adapter directory into a plain torch / HF model (or one already holding
    LoRALinear layers), wrapping each target nn.Linear in LoRALinear as needed.

    Keys are checked strictly: every LoRA key must name an nn.Linear / LoRALinear of model
    with matching shapes, A and B must come in pairs, and other keys are accepted only as
    peft's modules_to_save (copied into the model's own module) or saved biases
    (``bias="all"/"lora_only"``).  The adapter gets r from the tensors, lora_alpha and
    use_rslora from the config (rank_pattern / alpha_pattern honoured), dtype = the base
    weight's unless given.  is_trainable=False (peft's default) freezes it.
    Weights of modules the config does not target (``target_modules`` / ``exclude_modules`` /
    ``layers_to_transform`` / ``modules_to_save``) are ignored with a warning, as peft ignores
    them.  Config fields of the wrong type or range (``lora_alpha`` NaN, a ``rank_pattern``
    that is not a regex, ...) are an error naming the file and the field.
    Returns a report: {"adapter_name", "modules": [paths], "other_keys": [keys],
    "ignored": [paths], "config"}.
    """
    check_adapter_name(adapter_name)
    if dtype is not None:
        from ..models.loading import resolve_dtype

        dtype = resolve_dtype(dtype)
    cfg = _read_config(directory)
    sd = _read_weights(directory)
    pairs, other = {}, {}
    for k, v in sd.items():
        if not k.startswith(PREFIX):
            raise ValueError(f"{directory}: key {k!r} lacks peft's {PREFIX!r} prefix; not a "
                             f"peft adapter file")
        rel = k[len(PREFIX):]
        if ".lora_embedding_" in "." + rel or ".lora_magnitude_vector" in "." + rel:
            raise ValueError(f"{directory}: key {k!r} is an Embedding-LoRA / DoRA weight, which "
                             f"mmcore's LoRALinear does not support")
        m = _LORA_KEY.match(rel)
        if m and (m.group("path") + "." + m.group("which") + ".weight" == rel
                  or (not m.group("path") and rel == m.group("which") + ".weight")):
            pairs.setdefault(m.group("path"), {})[m.group("which")] = v
        elif re.search(r"(^|\.)lora_[AB]\.", rel):
            raise ValueError(f"{directory}: unexpected LoRA key {k!r} (expected "
                             f"'<module>.lora_A.weight' / '<module>.lora_B.weight')")
        else:
            other[rel] = v
    if not pairs:
        raise ValueError(f"{directory}: {WEIGHTS_NAME} holds no lora_A/lora_B weights")
    # peft injects LoRA only where the config targets (target_modules, exclude_modules,
    # layers_to_transform, modules_to_save) and ignores other weights in the file: the same here
    ignored = sorted(p for p in pairs if not targeted(cfg, p))
    if ignored:
        logger.warning("%s: weights for %s are not targeted by %s (target_modules=%r, "
                       "exclude_modules=%r); ignored, as peft does", directory, ignored,
                       CONFIG_NAME, cfg.get("target_modules"), cfg.get("exclude_modules"))
        pairs = {p: ab for p, ab in pairs.items() if p not in ignored}
        if not pairs:
            raise ValueError(f"{directory}: {CONFIG_NAME}'s target_modules "
                             f"{cfg.get('target_modules')!r} / exclude_modules "
                             f"{cfg.get('exclude_modules')!r} target none of the modules the "
                             f"weights are for ({ignored})")
    # check everything before touching the model
    plan = []
    for path, ab in pairs.items():
        if set(ab) != {"lora_A", "lora_B"}:
            miss = ({"lora_A", "lora_B"} - set(ab)).pop()
            raise ValueError(f"{directory}: module {path!r} has no {miss}.weight")
        try:
            mod = model.get_submodule(path) if path else model
        except AttributeError:
            raise ValueError(f"{directory}: the adapter targets module {path!r}, which the model "
                             f"({type(model).__name__}) does not have") from None
        if isinstance(mod, LoRALinear):
            base = mod.base_layer
            if adapter_name in mod.lora_A:
                raise ValueError(f"module {path!r} already has an adapter named "
                                 f"{adapter_name!r}; pick another adapter_name")
        elif isinstance(mod, nn.Linear) and path:
            base = mod
        elif isinstance(mod, nn.Linear):
            raise ValueError("load_adapter on a bare nn.Linear: wrap it in LoRALinear first "
                             "(LoRALinear(linear, adapter_name=None))")
        else:
            raise ValueError(f"{directory}: the adapter targets {path!r}, a "
                             f"{type(mod).__name__}; only nn.Linear is supported")
        a, b = ab["lora_A"], ab["lora_B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != base.in_features \
                or b.shape[0] != base.out_features or b.shape[1] != a.shape[0]:
            raise ValueError(f"{directory}: {path!r} lora_A {tuple(a.shape)} / lora_B "
                             f"{tuple(b.shape)} do not fit nn.Linear(in={base.in_features}, "
                             f"out={base.out_features}) (want (r, in) and (out, r))")
        r = a.shape[0]
        want_r = _config_value(cfg, "rank_pattern", path, cfg.get("r", r))
        if want_r != r:
            raise ValueError(f"{directory}: {path!r} has rank {r} in the weights but the config "
                             f"says r={want_r}")
        alpha = _config_value(cfg, "alpha_pattern", path, cfg.get("lora_alpha", 8))
        plan.append((path, mod, r, alpha))
    extras = []
    for rel, v in _plain_keys(other).items():
        mpath, _, pname = rel.rpartition(".")
        allowed = (_in_modules_to_save(cfg, mpath) or
                   (pname == "bias" and cfg.get("bias", "none") != "none"))
        if not allowed:
            raise ValueError(f"{directory}: unexpected key {PREFIX + rel!r}: not a LoRA weight, "
                             f"not in modules_to_save {cfg.get('modules_to_save')}, and bias is "
                             f"{cfg.get('bias', 'none')!r}")
        target = _find_tensor(model, rel)
        if target is None:
            raise ValueError(f"{directory}: key {PREFIX + rel!r} names no parameter or buffer of "
                             f"the model")
        if tuple(target.shape) != tuple(v.shape):
            raise ValueError(f"{directory}: {PREFIX + rel!r} has shape {tuple(v.shape)}, the "
                             f"model's tensor {tuple(target.shape)}")
        extras.append((rel, target, v))
    # apply
    names = []
    for path, mod, r, alpha in plan:
        if not isinstance(mod, LoRALinear):
            mod = LoRALinear(mod, adapter_name=None, backend=backend)
            _set_submodule(model, path, mod)
        had = bool(mod.adapter_names)
        mod.add_adapter(adapter_name, r, alpha, lora_dropout=float(cfg.get("lora_dropout", 0.0)),
                        use_rslora=bool(cfg.get("use_rslora", False)), init_lora_weights=None,
                        dtype=dtype)
        with torch.no_grad():
            mod.lora_A[adapter_name].weight.copy_(pairs[path]["lora_A"])
            mod.lora_B[adapter_name].weight.copy_(pairs[path]["lora_B"])
        if activate or not had:
            mod.set_adapter(adapter_name)
        if not is_trainable:
            mod.lora_A[adapter_name].requires_grad_(False)
            mod.lora_B[adapter_name].requires_grad_(False)
        names.append(path)
    with torch.no_grad():
        for rel, target, v in extras:
            target.copy_(v)
    return {"adapter_name": adapter_name, "modules": sorted(names),
            "other_keys": sorted(rel for rel, _, _ in extras), "ignored": ignored,
            "config": cfg}


def _plain_keys(other):
    """peft's names of non-LoRA tensors -> the plain model's: ``<m>.base_layer.bias`` (a LoRA
    layer's bias, bias="all"/"lora_only") is ``<m>.bias``; ``<m>.modules_to_save.<p>`` (the
    trained copy of a modules_to_save module) is ``<m>.<p>``; ``<m>.original_module.<p>``
    (peft's frozen original, unused by its forward) is dropped."""
    out = {}
    for rel, v in other.items():
        parts = rel.split(".")
        if "original_module" in parts[:-1]:
            continue
        plain = ".".join(p for p in parts[:-1] if p not in ("base_layer", "modules_to_save"))
        plain = (plain + "." if plain else "") + parts[-1]
        if plain in out and not torch.equal(out[plain], v):
            raise ValueError(f"the adapter holds two different tensors for {plain!r}")
        out[plain] = v
    return out


def _in_modules_to_save(cfg, mpath):
    mts = cfg.get("modules_to_save") or []
    return any(mpath == m or mpath.endswith("." + m) for m in mts)


def _find_tensor(model, rel):
    mpath, _, pname = rel.rpartition(".")
    try:
        mod = model.get_submodule(mpath) if mpath else model
    except AttributeError:
        return None
    if isinstance(mod, LoRALinear):
        mod = mod.base_layer
    t = getattr(mod, pname, None)
    return t if isinstance(t, torch.Tensor) else None


def save_adapter(model: nn.Module, directory: str, adapter_name: str = "default", *,
                 base_model_name_or_path: Optional[str] = None, task_type: Optional[str] = None,
                 modules_to_save: Optional[list] = None) -> dict:
    """Write adapter `adapter_name` of every LoRALinear in model in peft's format
    (adapter_config.json + adapter_model.safetensors) so that ``PeftModel.from_pretrained``
    (or load_adapter) reads it.  Per-module ranks / alphas that differ from the most common
    go to rank_pattern / alpha_pattern.  modules_to_save: names of other modules whose
    tensors are saved too (peft's modules_to_save, e.g. a classifier head).
    Returns the config written."""
    from safetensors.torch import save_file

    check_adapter_name(adapter_name)
    mods = [(n, m) for n, m in lora_modules(model) if adapter_name in m.lora_A]
    if not mods:
        raise ValueError(f"model has no LoRALinear holding adapter {adapter_name!r}")
    for n, m in mods:
        if adapter_name in m.merged_adapters:
            raise RuntimeError(f"adapter {adapter_name!r} is merged in {n or '<root>'}; "
                               f"unmerge() before saving")
    rs = [m.r[adapter_name] for _, m in mods]
    alphas = [m.lora_alpha[adapter_name] for _, m in mods]
    rsl = {m.use_rslora[adapter_name] for _, m in mods}
    if len(rsl) != 1:
        raise ValueError("use_rslora differs between modules; peft's config has one flag")
    r0 = max(set(rs), key=rs.count)
    a0 = max(set(alphas), key=alphas.count)
    sd = {}
    for n, m in mods:
        pre = PREFIX + (n + "." if n else "")
        sd[pre + "lora_A.weight"] = m.lora_A[adapter_name].weight.detach().cpu().contiguous()
        sd[pre + "lora_B.weight"] = m.lora_B[adapter_name].weight.detach().cpu().contiguous()
    for name in modules_to_save or []:
        sub = model.get_submodule(name)
        for k, v in sub.state_dict().items():
            sd[PREFIX + name + "." + k] = v.detach().cpu().contiguous()
    drop = [m._p(adapter_name) for _, m in mods]
    cfg = {
        "peft_type": "LORA", "task_type": task_type, "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path, "revision": None,
        "inference_mode": True, "r": r0, "lora_alpha": a0,
        "lora_dropout": max(set(drop), key=drop.count),
        "target_modules": sorted(n for n, _ in mods), "exclude_modules": None,
        "rank_pattern": {re.escape(n): r for (n, _), r in zip(mods, rs) if r != r0},
        "alpha_pattern": {re.escape(n): a for (n, _), a in zip(mods, alphas) if a != a0},
        "use_rslora": rsl.pop(), "bias": "none", "fan_in_fan_out": False,
        "modules_to_save": list(modules_to_save) if modules_to_save else None,
        "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None,
        "use_dora": False, "lora_bias": False, "layer_replication": None,
        "megatron_config": None, "megatron_core": "megatron.core", "loftq_config": {},
    }
    os.makedirs(directory, exist_ok=True)
    save_file(sd, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    return cfg
