"""What a run trains: LoRA (peft-style targets and bias modes), BitFit, full fine-tuning, or a
frozen encoder with a trainable head — and a peft-like report of the trainable parameters.

A model declares its head with an attribute ``head_modules`` (names of sub-modules that are
always trained, peft's ``modules_to_save``); everything else is "the encoder".

    apply_mode(model, "lora", target_modules=["q", "v"], r=8, lora_alpha=16, bias="lora_only")
    print(trainable_report(model))
    # trainable params: 152,066 || all params: 22,865,282 || trainable%: 0.6650
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

from ..nn import LoRALinear, add_lora, lora_modules
from .config import LORA_BIAS, MODES

__all__ = ["apply_mode", "trainable_report", "trainable_parameters", "head_modules",
           "lora_bias_names"]


def head_modules(model: nn.Module) -> list:
    """The model's always-trained sub-module names (``model.head_modules``, default none)."""
    names = list(getattr(model, "head_modules", []) or [])
    for n in names:
        model.get_submodule(n)  # raises with the name when missing
    return names


def _in(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def lora_bias_names(model: nn.Module, bias: str) -> list:
    """Parameter names peft's ``bias=`` makes trainable: "all" -> every ``*.bias``;
    "lora_only" -> the bias of each LoRA-wrapped layer (``<path>.base_layer.bias``)."""
    if bias not in LORA_BIAS:
        raise ValueError(f"bias must be one of {LORA_BIAS}, got {bias!r}")
    if bias == "none":
        return []
    if bias == "all":
        return [n for n, _ in model.named_parameters() if n == "bias" or n.endswith(".bias")]
    return [(f"{n}." if n else "") + "base_layer.bias" for n, m in lora_modules(model)
            if m.base_layer.bias is not None]


def apply_mode(model: nn.Module, mode: str, *, target_modules=("q", "v"), r: int = 8,
               lora_alpha: float = 16.0, lora_dropout: float = 0.0, bias: str = "none",
               backend: str = "auto") -> dict:
    """Set requires_grad for `mode` in place (and wrap LoRA targets in ``LoRALinear``).

    lora:   every LoRA A/B of the matched nn.Linear layers (peft's target_modules rule: a list
            of names / name suffixes, or a full-match regex), plus peft's `bias` choice, plus
            the head; nothing else.
    bitfit: every ``*.bias`` of the model (Ben Zaken et al. 2022) plus the head.
    full:   every parameter.
    head:   the head only (frozen encoder).
    Returns {"mode", "trainable": [names], "lora_modules": [names]}."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    heads = head_modules(model)
    wrapped = []
    if mode == "lora":
        if bias not in LORA_BIAS:
            raise ValueError(f"lora_bias must be one of {LORA_BIAS}, got {bias!r}")
        inner = [n for n, _ in model.named_modules() if n and _in(n, heads)]
        targets = target_modules
        if inner and not isinstance(targets, str):  # never wrap the head's own layers
            targets = _exclude(model, list(targets), heads)
        wrapped = add_lora(model, targets, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                           backend=backend)
    for n, p in model.named_parameters():
        p.requires_grad_(mode == "full" or _in(n, heads))
    if mode == "lora":
        for _, m in lora_modules(model):
            m.set_adapter(m.active_adapters)  # active adapters trainable (peft's rule)
        names = set(lora_bias_names(model, bias))
    elif mode == "bitfit":
        names = {n for n, _ in model.named_parameters() if n == "bias" or n.endswith(".bias")}
    else:
        names = set()
    for n, p in model.named_parameters():
        if n in names:
            p.requires_grad_(True)
    return {"mode": mode, "trainable": [n for n, p in model.named_parameters()
                                        if p.requires_grad], "lora_modules": wrapped}


def _exclude(model, targets, heads):
    """peft target names -> the full names of matching nn.Linear outside the head."""
    from ..nn.lora import _matches

    out = [n for n, m in model.named_modules()
           if n and isinstance(m, (nn.Linear, LoRALinear)) and not _in(n, heads)
           and _matches(n, targets)]
    if not out:
        raise ValueError(f"target_modules {targets!r} matched no nn.Linear outside the head "
                         f"{heads}")
    return out


def trainable_parameters(model: nn.Module) -> list:
    """[(name, parameter)] that require grad, in model order (the optimizer's parameters)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def trainable_report(model: nn.Module, as_dict: bool = False):
    """peft's print_trainable_parameters line, plus a breakdown by kind (lora / bias / head /
    other).  as_dict=True returns the numbers instead."""
    heads = head_modules(model)
    total = trainable = 0
    kinds = {"lora": 0, "bias": 0, "head": 0, "other": 0}
    for n, p in model.named_parameters():
        k = p.numel()
        total += k
        if not p.requires_grad:
            continue
        trainable += k
        if _in(n, heads):
            kinds["head"] += k
        elif ".lora_A." in n or ".lora_B." in n:
            kinds["lora"] += k
        elif n.endswith(".bias") or n == "bias":
            kinds["bias"] += k
        else:
            kinds["other"] += k
    pct = 100.0 * trainable / max(total, 1)
    if as_dict:
        return {"trainable": trainable, "total": total, "percent": pct, **kinds}
    parts = ", ".join(f"{k} {v:,}" for k, v in kinds.items() if v)
    return (f"trainable params: {trainable:,} || all params: {total:,} || "
            f"trainable%: {pct:.4f}" + (f"  ({parts})" if parts else ""))

