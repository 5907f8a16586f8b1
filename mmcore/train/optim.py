"""AdamW over the trainable parameters only, and warm-up + linear / cosine / constant schedules.

    opt = build_optimizer(model, cfg)          # fused AdamW where torch has it for the device
    sched = build_scheduler(opt, cfg, total_steps)

Parameter groups: the head may take its own learning rate (``head_lr``); biases and LayerNorm
weights get no weight decay (the usual BERT recipe).  Frozen parameters never reach the
optimizer, so AdamW holds state for the trainable ones only.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import TrainConfig
from .modes import head_modules

__all__ = ["build_optimizer", "build_scheduler", "lr_factor", "fused_available"]


def fused_available(device: torch.device) -> bool:
    """Does this torch have a fused AdamW kernel for the device type?"""
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices

        return torch.device(device).type in _get_fused_kernels_supported_devices()
    except ImportError:  # pragma: no cover - older torch
        return torch.device(device).type == "cuda"


def _no_decay(name: str, p: torch.Tensor) -> bool:
    return p.dim() < 2 or name.endswith(".bias") or ".ln" in name or "norm" in name.lower()


def build_optimizer(model: nn.Module, cfg: TrainConfig, device="cpu") -> torch.optim.AdamW:
    """AdamW over model's parameters that require grad, in up to four groups
    (encoder/head × decay/no-decay).  Groups carry ``param_names`` (torch's named optimizer
    state), so checkpoints key the state by parameter name."""
    heads = head_modules(model)
    groups = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        head = any(n == h or n.startswith(h + ".") for h in heads)
        lr = cfg.head_lr if head and cfg.head_lr is not None else cfg.lr
        wd = 0.0 if _no_decay(n, p) else cfg.weight_decay
        g = groups.setdefault((lr, wd), {"params": [], "param_names": [], "lr": lr,
                                         "weight_decay": wd})
        g["params"].append(p)
        g["param_names"].append(n)
    if not groups:
        raise ValueError("the model has no trainable parameters (check mode / target_modules)")
    fused = fused_available(device) if cfg.fused is None else bool(cfg.fused)
    return torch.optim.AdamW(list(groups.values()), lr=cfg.lr, betas=tuple(cfg.betas),
                             eps=cfg.adam_eps, weight_decay=cfg.weight_decay, fused=fused)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base lr after `step` optimizer steps: linear warm-up over `warmup`
    steps from 0, then constant, or linear / cosine decay to 0 at `total` (as HF's
    get_linear_schedule_with_warmup / get_cosine_schedule_with_warmup)."""
    if warmup > 0 and step < warmup:
        return step / warmup
    if schedule == "constant":
        return 1.0
    frac = (step - warmup) / max(1, total - warmup)
    frac = min(max(frac, 0.0), 1.0)
    if schedule == "linear":
        return 1.0 - frac
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * frac))
    raise ValueError(f"schedule must be linear, cosine or constant, got {schedule!r}")


class _Factor:
    """A picklable lr lambda (LambdaLR keeps it; its state is rebuilt from the config)."""

    def __init__(self, total, warmup, schedule):
        self.total, self.warmup, self.schedule = total, warmup, schedule

    def __call__(self, step):
        return lr_factor(step, self.total, self.warmup, self.schedule)


def build_scheduler(opt, cfg: TrainConfig, total_steps: int):
    """LambdaLR with warm-up (warmup_steps, or warmup_ratio · total_steps) and decay."""
    warm = cfg.warmup_steps or int(round(cfg.warmup_ratio * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(opt, _Factor(total_steps, warm, cfg.schedule))
