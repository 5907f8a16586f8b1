"""TrainConfig: every knob of a training run as one flat dataclass (nanoGPT / torchtune style).

A YAML or JSON file gives any subset of the fields; command-line flags override the file;
unknown keys are an error that names them.  The config is saved beside every checkpoint
(trainer_state.json), so `--resume DIR` needs nothing else.
"""
from __future__ import annotations

import dataclasses
import json
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

    def validate(self) -> "TrainConfig":
        def one_of(name, allowed):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")

        one_of("mode", MODES)
        one_of("lora_bias", LORA_BIAS)
        one_of("schedule", SCHEDULES)
        one_of("precision", PRECISIONS)
        one_of("pooling", ("cls", "mean", "attention"))
        one_of("eval_mode", ("max", "min"))
        for name in ("batch_size", "grad_accum", "epochs", "lora_r", "keep_last", "log_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name in ("eval_every", "save_every", "warmup_steps", "window"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        for name in ("max_steps", "max_tokens", "patience", "threads", "eval_batch_size"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"{name} must be a positive int or null, got {v!r}")
        if self.max_tokens is not None and self.max_tokens < 3:
            raise ValueError(f"max_tokens must be >= 3 ([CLS] x [SEP]), got {self.max_tokens}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must lie in [0, 1), got {self.warmup_ratio}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must lie in [0, 1), got {self.lora_dropout}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {self.label_smoothing}")
        if self.fgm_epsilon < 0:
            raise ValueError(f"fgm_epsilon must be >= 0, got {self.fgm_epsilon}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or null, got {self.max_grad_norm}")
        if isinstance(self.target_modules, str) and "," in self.target_modules:
            self.target_modules = [t for t in self.target_modules.split(",") if t]
        self.betas = tuple(float(b) for b in self.betas)
        if len(self.betas) != 2:
            raise ValueError(f"betas must be two floats, got {self.betas}")
        return self

    # ------------------------------------------------------------------ (de)serialisation

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(k for k in d if k not in names)
        if bad:
            raise ValueError(f"unknown config keys {bad}; known: {sorted(names)}")
        return cls(**d)

    def replace(self, **kw) -> "TrainConfig":
        return self.from_dict({**self.to_dict(), **kw})


def read_config_file(path: str) -> dict:
    """A YAML (.yaml / .yml) or JSON file -> dict of TrainConfig fields."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config {path!r}: no such file")
    with open(path) as f:
        text = f.read()
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
    return d
