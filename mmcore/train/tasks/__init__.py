"""Pluggable tasks: a task = model (with its head) + collate + metrics.

    from mmcore.train.tasks import Task, register_task, get_task

    @register_task("matching")
    class Matching(Task):
        def prepare(self, records): ...        # {split: [record]} -> {split: [example]}
        def build_model(self): ...             # nn.Module; forward(**inputs) -> {"loss", ...}
        def collate(self, examples): ...       # -> Batch(inputs, n_tokens)
        def outputs(self, out, batch): ...     # -> {name: (b, ...) CPU tensor} to gather
        def metrics(self, gathered): ...       # -> {"accuracy": ..., ...}

`mmcore train --task NAME` picks one.  A task module outside mmcore registers itself when
imported; `--task pkg.module:Class` imports it by path.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch import nn

from ..config import TrainConfig

__all__ = ["Task", "Batch", "register_task", "get_task", "task_names"]

_TASKS: Dict[str, type] = {}


@dataclass
class Batch:
    """One micro-batch: `inputs` are the model's forward kwargs (tensors on the CPU; the
    trainer moves them), `n_tokens` the real (unpadded) tokens, for tokens/s."""

    inputs: dict
    n_tokens: int = 0
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        first = next(iter(self.inputs.values()))
        return int(first.shape[0])


class Task:
    """Base class (and contract) of a task.  Subclasses set `name` by registering.

    Data flow: records (dicts from JSONL/CSV or a generator) -> prepare() -> examples (any
    per-example objects) -> length() for the bucketed sampler -> collate() -> Batch ->
    model(**batch.inputs) -> {"loss": 0-dim tensor, ...} -> outputs() -> gathered over the
    evaluation set and the ranks -> metrics() (and report() at the end)."""

    name = "?"

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    # data
    def prepare(self, records: Dict[str, list]) -> Dict[str, list]:
        raise NotImplementedError

    def length(self, example) -> int:
        """Tokens of an example (bucketing and tokens/s)."""
        raise NotImplementedError

    def collate(self, examples: list) -> Batch:
        raise NotImplementedError

    # model
    def build_model(self) -> nn.Module:
        """The model; set `head_modules` on it (names always trained, saved as peft's
        modules_to_save) and optionally `fsdp_units()` (sub-modules FSDP2 shards one by one)."""
        raise NotImplementedError

    # evaluation
    def outputs(self, out: dict, batch: Batch) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def metrics(self, gathered: Dict[str, torch.Tensor]) -> dict:
        raise NotImplementedError

    def report(self, gathered: Dict[str, torch.Tensor]) -> Optional[dict]:
        """Final report (e.g. classification report + confusion matrix), JSON-able."""
        return None

    def format_report(self, report: dict) -> str:
        return ""


def register_task(name: str):
    def deco(cls):
        if not (isinstance(cls, type) and issubclass(cls, Task)):
            raise TypeError(f"register_task({name!r}) needs a Task subclass")
        cls.name = name
        _TASKS[name] = cls
        return cls
    return deco


def get_task(name: str) -> type:
    """A registered task by name, or "pkg.module:Class" imported by path."""
    _builtin()
    if name in _TASKS:
        return _TASKS[name]
    if ":" in name:
        mod, _, cls = name.partition(":")
        try:
            obj = getattr(importlib.import_module(mod), cls)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"--task {name!r}: cannot import it ({e})") from None
        if not (isinstance(obj, type) and issubclass(obj, Task)):
            raise ValueError(f"--task {name!r} is not a mmcore.train.tasks.Task subclass")
        return obj
    raise ValueError(f"--task {name!r} is not a known task; have {task_names()} "
                     f"(or pass pkg.module:Class)")


def task_names() -> List[str]:
    _builtin()
    return sorted(_TASKS)


def _builtin():
    from . import classification, doc_figures, matching, retrieval, vqa  # noqa: F401
