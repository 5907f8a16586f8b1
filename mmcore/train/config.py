"""TrainConfig: every knob of a training run as one flat dataclass (nanoGPT / torchtune style).

A YAML or JSON file gives any subset of the fields; command-line flags override the file;
unknown keys are an error that names them.  The config is saved beside every checkpoint
(trainer_state.json), so `--resume DIR` needs nothing else.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Optional

MODES = ("lora", "bitfit", "full", "head")
LORA_BIAS = ("none", "lora_only", "all")
SCHEDULES = ("linear", "cosine", "constant")
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    # task and data
    task: str = "classification"  # a registered task, or pkg.module:Class
    model: Optional[str] = None  # BERT-family dir (config.json, safetensors, tokenizer.json)
    train_file: Optional[str] = None  # JSONL / CSV
    val_file: Optional[str] = None  # JSONL / CSV
    test_file: Optional[str] = None  # JSONL / CSV
    text_field: str = "text"  # record fields
    label_field: str = "label"
    image_field: str = "images"
    # without train_file: the generated long-document set (train, validation, test documents)
    synthetic_sizes: list = field(default_factory=lambda: [96, 32, 96])  # generated set: docs
    synthetic_tokens: list = field(default_factory=lambda: [560, 660])  # generated set: tokens
    labels: Optional[list] = None  # label names in order (default: sorted from train data)
    max_tokens: Optional[int] = None  # cut documents at this many tokens (None: read whole)
    window: int = 128  # window attention per side in long documents (0: full attention)
    pooling: str = "cls"  # cls | mean | attention
    dropout: float = 0.1  # before the head
    task_options: dict = field(default_factory=dict)  # task-specific knobs (each task's doc)
    # mode
    mode: str = "lora"  # lora | bitfit | full | head
    lora_r: int = 8  # LoRA rank
    lora_alpha: float = 16.0  # LoRA scaling = lora_alpha / lora_r
    lora_dropout: float = 0.0  # dropout on the LoRA path (peft)
    target_modules: list = field(default_factory=lambda: ["q", "v"])  # peft: names, or a regex
    lora_bias: str = "none"  # peft's bias: none | lora_only | all
    # objective
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    class_weights: Optional[list] = None  # cross-entropy weight per label
    fgm_epsilon: float = 0.0  # > 0: FGM adversarial step on the word embeddings
    # optimisation
    lr: float = 2e-4  # peak learning rate
    head_lr: Optional[float] = None  # default: lr
    weight_decay: float = 0.01  # AdamW (not on biases / LayerNorm)
    betas: tuple = (0.9, 0.999)
    adam_eps: float = 1e-8  # AdamW epsilon
    fused: Optional[bool] = None  # None: fused AdamW where torch has it for the device
    schedule: str = "linear"  # linear | cosine | constant, after the warm-up
    warmup_steps: int = 0  # linear warm-up from 0
    warmup_ratio: float = 0.0  # warm-up as a fraction of the steps
    epochs: int = 3  # passes over the training data (unless max_steps)
    max_steps: Optional[int] = None  # optimizer steps (overrides epochs)
    batch_size: int = 8  # per process and micro-batch; global = batch_size·world·grad_accum
    grad_accum: int = 1  # micro-batches per optimizer step
    max_grad_norm: Optional[float] = 1.0  # gradient clipping (null: none)
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; a GradScaler for fp16)
    # evaluation, stopping, checkpoints
    eval_every: int = 0  # steps; 0 = at the end of each epoch
    eval_metric: str = "accuracy"  # for early stopping and the best checkpoint
    eval_mode: str = "max"  # max | min
    patience: Optional[int] = None  # evaluations without improvement before stopping
    save_every: int = 0  # steps; 0 = at each evaluation
    keep_last: int = 2  # newest checkpoints kept (plus the best)
    load_best: bool = True  # test with the best checkpoint's weights
    out_dir: str = "mmcore-train"  # metrics, curves, report, checkpoints
    # run
    seed: int = 0  # data order, initialisation, dropout
    threads: Optional[int] = None  # torch CPU threads (default: torch's)
    device: str = "cpu"  # cpu | cuda
    fsdp: bool = False  # FSDP2 (fully_shard) instead of DDP under torchrun
    bucket: bool = True  # length-bucketed batches
    log_every: int = 10  # steps between train rows of metrics.jsonl
    progress: bool = True  # progress bar (loss, lr, tokens/s)
    eval_batch_size: Optional[int] = None  # default: batch_size
    backend: str = "auto"  # mmcore op backend for the model

    def __post_init__(self):
        self.validate()

    def validate(self, sources: Optional[dict] = None) -> "TrainConfig":
        """Check and normalise every field (types, ranges, finiteness, enums) in place.

        sources: field -> where its value came from ("--lr", "run.yaml line 3", ...), used in
        the message of the ValueError; fields not in it are named "TrainConfig.<field>"."""
        sources = sources or {}
        for f in dataclasses.fields(self):
            where = sources.get(f.name) or f"TrainConfig.{f.name}"
            setattr(self, f.name, check_field(f.name, getattr(self, f.name), where))

        def src(name):
            return sources.get(name) or f"TrainConfig.{name}"

        lo, hi = self.synthetic_tokens
        if lo > hi:
            raise ValueError(f"{src('synthetic_tokens')}: the range [{lo}, {hi}] is empty "
                             f"(give min,max with min <= max)")
        if self.class_weights is not None and self.labels is not None \
                and len(self.class_weights) != len(self.labels):
            raise ValueError(f"{src('class_weights')}: {len(self.class_weights)} weights for "
                             f"{len(self.labels)} labels {self.labels}")
        return self

    # ------------------------------------------------------------------ (de)serialisation

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict, sources: Optional[dict] = None,
                  origin: str = "config") -> "TrainConfig":
        """A TrainConfig from a mapping; sources (field -> where it came from) names the origin
        of a bad value in the error; unknown keys are an error naming them (and `origin`)."""
        if not isinstance(d, dict):
            raise ValueError(f"{origin}: must be a mapping of config keys, got "
                             f"{type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(str(k) for k in d if k not in names)
        if bad:
            import difflib

            hints = [f"{b!r} -> {m[0]!r}?" for b in bad
                     for m in [difflib.get_close_matches(b, names, n=1)] if m]
            raise ValueError(f"{origin}: unknown config keys {bad}"
                             + (f" (did you mean: {', '.join(hints)})" if hints else ""))
        sources = dict(sources or {})
        # each value is checked against its own source before the dataclass sees it
        checked = {k: check_field(k, v, sources.get(k) or f"{origin}: {k}") for k, v in d.items()}
        obj = cls.__new__(cls)
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING \
                else f.default
            setattr(obj, f.name, checked.get(f.name, default))
        return obj.validate({k: sources.get(k) or f"{origin}: {k}" for k in d})

    def replace(self, **kw) -> "TrainConfig":
        return self.from_dict({**self.to_dict(), **kw})


def read_config_file(path: str, with_sources: bool = False):
    """A YAML (.yaml / .yml) or JSON file -> dict of TrainConfig fields (with_sources: and
    {key: "<path> line N (key)"} for error messages)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config {path!r}: no such file")
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--config {path}: cannot be read as UTF-8 text ({e})") from None
    if path.endswith((".yaml", ".yml")):
        from .._optional import require

        yaml = require("yaml", feature=f"--config {path}")
        try:
            d = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"--config {path}: not valid YAML ({e})") from None
    else:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--config {path}: not valid JSON ({e})") from None
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise ValueError(f"--config {path}: must hold a mapping of config keys, got "
                         f"{type(d).__name__}")
    if with_sources:
        lines = key_lines(path, text)
        return d, {k: lines.get(k, f"{path} ({k})") for k in d if isinstance(k, str)}
    return d


# ---------------------------------------------------------------------- field checks
#
# One rule per field: the config file, the command-line flags, a resumed checkpoint's config
# and the Python API all pass through check_field(), so a bad value gets the same message
# whatever its source; `where` names the source ("--lr", "run.yaml line 3 (lr)", ...).

_INT_MAX = 2**31 - 1


def _bad(where, what, v):
    return ValueError(f"{where}: must be {what}, got {v!r}")


def _int(lo=0, hi=_INT_MAX, optional=False):
    def check(v, where):
        if v is None and optional:
            return None
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            what = f"an int in [{lo}, {hi}]" + (" or null" if optional else "")
            raise _bad(where, what, v)
        return v
    return check


def _float(lo=None, hi=None, lo_open=False, hi_open=False, optional=False):
    def check(v, where):
        if v is None and optional:
            return None
        x = v
        if isinstance(x, str):  # YAML reads 1e-4 as a string
            try:
                x = float(x)
            except ValueError:
                x = None
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or \
                (lo is not None and (x <= lo if lo_open else x < lo)) or \
                (hi is not None and (x >= hi if hi_open else x > hi)):
            rng = ""
            if lo is not None or hi is not None:
                rng = " in " + ("(" if lo_open else "[") + f"{lo if lo is not None else '-inf'}, " \
                      + f"{hi if hi is not None else 'inf'}" + (")" if hi_open or hi is None
                                                                 else "]")
            raise _bad(where, "a finite number" + rng + (" or null" if optional else ""), v)
        return float(x)
    return check


def _enum(*allowed):
    def check(v, where):
        if v not in allowed or not isinstance(v, str):
            raise _bad(where, f"one of {list(allowed)}", v)
        return v
    return check


def _str(optional=False, empty=False):
    def check(v, where):
        if v is None and optional:
            return None
        if not isinstance(v, str) or (not empty and not v.strip()):
            raise _bad(where, "a non-empty string" + (" or null" if optional else ""), v)
        return v
    return check


def _bool(optional=False):
    def check(v, where):
        if v is None and optional:
            return None
        if not isinstance(v, bool):
            raise _bad(where, "true or false" + (" or null" if optional else ""), v)
        return v
    return check


def _int_list(n, lo, hi):
    def check(v, where):
        if isinstance(v, str):
            v = [x for x in v.replace(" ", "").split(",") if x]
        if not isinstance(v, (list, tuple)) or len(v) != n:
            raise _bad(where, f"{n} ints", v)
        return [_int(lo, hi)(x, f"{where} item {i}") for i, x in enumerate(v)]
    return check


def _labels(v, where):
    if v is None:
        return None
    if isinstance(v, str):
        v = [x.strip() for x in v.split(",") if x.strip()]
    if not isinstance(v, (list, tuple)) or len(v) < 2:
        raise _bad(where, "a list of at least 2 label names", v)
    out = []
    for i, x in enumerate(v):
        if isinstance(x, bool) or not isinstance(x, (str, int)) or (isinstance(x, str)
                                                                     and not x.strip()):
            raise _bad(f"{where} item {i}", "a non-empty string or an int", x)
        out.append(str(x))
    dup = sorted({x for x in out if out.count(x) > 1})
    if dup:
        raise ValueError(f"{where}: duplicate labels {dup} (labels are compared as strings)")
    return out


def _class_weights(v, where):
    if v is None:
        return None
    if isinstance(v, str):
        v = [x for x in v.replace(" ", "").split(",") if x]
    if not isinstance(v, (list, tuple)) or not v:
        raise _bad(where, "a list of finite weights >= 0, one per label", v)
    w = [_float(lo=0)(x, f"{where} item {i}") for i, x in enumerate(v)]
    if not any(x > 0 for x in w):
        raise ValueError(f"{where}: at least one class weight must be > 0, got {v!r}")
    return w


def _target_modules(v, where):
    if isinstance(v, str):
        v = [t.strip() for t in v.split(",") if t.strip()] if "," in v else v
        if isinstance(v, str):
            if not v.strip():
                raise _bad(where, "module names or a regex", v)
            return v
    if not isinstance(v, (list, tuple)) or not v or \
            not all(isinstance(t, str) and t.strip() for t in v):
        raise _bad(where, "a non-empty list of module names (or one regex string)", v)
    return list(v)


def _task_options(v, where):
    if isinstance(v, str):
        s = v.strip()
        if s.startswith("{") or s.startswith("["):
            try:
                v = json.loads(s)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not a JSON object ({e})") from None
        else:
            d = {}
            for part in filter(None, (p.strip() for p in s.split(","))):
                k, eq, val = part.partition("=")
                if not eq or not k.strip():
                    raise ValueError(f"{where}: {part!r} is not key=value")
                try:
                    d[k.strip()] = json.loads(val.strip())
                except json.JSONDecodeError:
                    d[k.strip()] = val.strip()
            v = d
    if not isinstance(v, dict):
        raise _bad(where, "a mapping of task options (JSON object or k=v,k=v; {} for none)", v)
    for k, x in v.items():
        if isinstance(x, float) and not math.isfinite(x):
            raise ValueError(f"{where}: option {k!r} must be finite, got {x!r}")
    return dict(v)


def _threads(v, where):
    v = _int(1, _INT_MAX, optional=True)(v, where)
    n = os.cpu_count() or 1
    if v is not None and v > n:
        raise ValueError(f"{where}: {v} threads, but this machine has {n} CPUs "
                         f"(give at most {n})")
    return v


def _device(v, where):
    if not isinstance(v, str):
        raise _bad(where, "'cpu', 'cuda' or 'cuda:N'", v)
    import re

    if not re.fullmatch(r"cpu|cuda(:\d+)?", v):
        raise _bad(where, "'cpu', 'cuda' or 'cuda:N'", v)
    if v.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"{where}: {v!r} asked for, but no CUDA device is available")
        if ":" in v and int(v.split(":")[1]) >= torch.cuda.device_count():
            raise ValueError(f"{where}: {v!r}, but there are {torch.cuda.device_count()} GPUs")
    return v


def _backend(v, where):
    from ..ops.registry import BACKENDS

    if v not in ("auto",) + tuple(BACKENDS):
        raise _bad(where, f"one of {['auto', *BACKENDS]}", v)
    if v == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"{where}: backend 'cuda' needs a CUDA device; none is available "
                             f"(use auto, or cpu / torch / triton)")
    return v


def _betas(v, where):
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        raise _bad(where, "two numbers in [0, 1)", v)
    return tuple(_float(0, 1, hi_open=True)(b, f"{where} item {i}") for i, b in enumerate(v))


_RULES = {
    "task": _str(), "model": _str(optional=True), "train_file": _str(optional=True),
    "val_file": _str(optional=True), "test_file": _str(optional=True), "text_field": _str(),
    "label_field": _str(optional=True), "image_field": _str(optional=True),
    "synthetic_sizes": _int_list(3, 1, 1_000_000),
    "synthetic_tokens": _int_list(2, 552, 1_000_000),  # >= the demo's decide_after + 40
    "labels": _labels, "max_tokens": _int(3, _INT_MAX, optional=True), "window": _int(0),
    "pooling": _enum("cls", "mean", "attention"), "dropout": _float(0, 1, hi_open=True),
    "task_options": _task_options, "mode": _enum(*MODES), "lora_r": _int(1, 65536),
    "lora_alpha": _float(0, lo_open=True), "lora_dropout": _float(0, 1, hi_open=True),
    "target_modules": _target_modules, "lora_bias": _enum(*LORA_BIAS),
    "label_smoothing": _float(0, 1, hi_open=True), "class_weights": _class_weights,
    "fgm_epsilon": _float(0), "lr": _float(0, lo_open=True),
    "head_lr": _float(0, lo_open=True, optional=True), "weight_decay": _float(0),
    "betas": _betas, "adam_eps": _float(0), "fused": _bool(optional=True),
    "schedule": _enum(*SCHEDULES), "warmup_steps": _int(0), "warmup_ratio": _float(0, 1,
                                                                                 hi_open=True),
    "epochs": _int(1), "max_steps": _int(1, optional=True), "batch_size": _int(1),
    "grad_accum": _int(1), "max_grad_norm": _float(0, lo_open=True, optional=True),
    "precision": _enum(*PRECISIONS), "eval_every": _int(0), "eval_metric": _str(),
    "eval_mode": _enum("max", "min"), "patience": _int(1, optional=True),
    "save_every": _int(0), "keep_last": _int(1), "load_best": _bool(), "out_dir": _str(),
    "seed": _int(0, 2**63 - 1), "threads": _threads, "device": _device, "fsdp": _bool(),
    "bucket": _bool(), "log_every": _int(1), "progress": _bool(),
    "eval_batch_size": _int(1, optional=True), "backend": _backend,
}


def check_field(name: str, value, where: str):
    """The checked (and normalised) value of TrainConfig field `name`; ValueError naming
    `where` (the field's source) when it is not acceptable."""
    rule = _RULES.get(name)
    if rule is None:
        raise ValueError(f"{where}: unknown config key {name!r}")
    return rule(value, where)


def key_lines(path: str, text: str) -> dict:
    """Config key -> "<path> line N (key)" for the top-level keys of a YAML / JSON text (the
    first line that starts the key), so that errors point into the file."""
    import re

    out = {}
    for i, line in enumerate(text.splitlines(), 1):
        m = re.match(r'\s*[{,]?\s*"?([A-Za-z_]\w*)"?\s*:', line)
        if m and m.group(1) not in out:
            out[m.group(1)] = f"{path} line {i} ({m.group(1)})"
    return out
