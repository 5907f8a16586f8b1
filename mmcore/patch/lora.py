"""peft LoRA layers on the fused ``mmcore.ops.lora_linear``.

Preferred route: ``mmcore.nn.convert_peft_model`` (peft ``lora.Linear`` -> ``mmcore.nn.LoRALinear``)
when that module exists.  Otherwise (or with ``route="wrap"``) each peft ``lora.Linear`` keeps
its class, parameters and name, and gets an instance-level ``forward`` that calls
``mmcore.ops.lora_linear`` whenever the call is the plain single-adapter case, and peft's own
forward otherwise (merged / disabled / several active adapters / ``adapter_names`` / dropout
while training / mixed dtypes) -- never a different answer.
"""
from __future__ import annotations

from torch import nn

from ..ops import lora_linear

_WRAP_ATTR = "_mmcore_lora_wrapped"


def _peft_lora_linear_cls():
    try:
        from peft.tuners.lora import Linear
    except Exception:  # noqa: BLE001 - peft missing or broken: nothing to patch
        return None
    return Linear


def static_why_not(mod):
    """Why a peft lora.Linear cannot use the fused op at all (None if it can)."""
    if type(mod.base_layer) is not nn.Linear:
        return f"base layer is {type(mod.base_layer).__name__}, not nn.Linear"
    if getattr(mod, "fan_in_fan_out", False):
        return "fan_in_fan_out=True (Conv1D-style weight)"
    if getattr(mod, "lora_variant", None):
        return f"LoRA variant(s) {sorted(mod.lora_variant)} (e.g. DoRA)"
    if any(getattr(mod, "lora_bias", {}).values()):
        return "lora_bias=True"
    for a in mod.lora_A:
        if not isinstance(mod.lora_A[a], nn.Linear) or not isinstance(mod.lora_B[a], nn.Linear):
            return f"adapter {a!r} is not a pair of nn.Linear"
    return None


def _call_why_not(mod, x, args, kwargs):
    if args or kwargs:
        return "extra forward arguments"
    if mod.disable_adapters or mod.merged:
        return "adapters disabled or merged"
    act = [a for a in mod.active_adapters if a in mod.lora_A]
    if len(act) != 1:
        return "not exactly one active adapter"
    a = act[0]
    if a in getattr(mod, "lora_variant", {}):
        return "LoRA variant"
    d = mod.lora_dropout[a]
    if mod.training and isinstance(d, nn.Dropout) and d.p > 0:
        return "LoRA dropout while training"
    if not isinstance(d, (nn.Dropout, nn.Identity)):
        return "custom dropout"
    A, B = mod.lora_A[a], mod.lora_B[a]
    w = mod.base_layer.weight
    if not (x.dtype == w.dtype == A.weight.dtype == B.weight.dtype):
        return "mixed dtypes"
    if B.bias is not None or A.bias is not None:
        return "lora bias"
    return None


def _make_forward(mod, orig_forward, backend):
    def forward(x, *args, **kwargs):
        if _call_why_not(mod, x, args, kwargs) is not None:
            return orig_forward(x, *args, **kwargs)
        a = [a for a in mod.active_adapters if a in mod.lora_A][0]
        base = mod.base_layer
        return lora_linear(x, base.weight, base.bias, mod.lora_A[a].weight,
                           mod.lora_B[a].weight, float(mod.scaling[a]), backend=backend)
    return forward


def wrap(model, backend="auto"):
    """Route every eligible peft lora.Linear through the fused op.  -> (replaced, left, undo)."""
    cls = _peft_lora_linear_cls()
    replaced, left, undo = [], [], []
    if cls is None:
        return replaced, left, undo
    for name, mod in model.named_modules():
        if not isinstance(mod, cls) or getattr(mod, _WRAP_ATTR, False):
            continue
        why = static_why_not(mod)
        if why:
            left.append((name, f"peft LoRA: {why}"))
            continue
        had = "forward" in mod.__dict__
        prev = mod.__dict__.get("forward")
        mod.forward = _make_forward(mod, mod.forward, backend)
        setattr(mod, _WRAP_ATTR, True)
        undo.append((mod, had, prev))
        replaced.append((name, "peft lora.Linear forward -> mmcore.ops.lora_linear (fused)"))
    return replaced, left, undo


def unwrap(undo):
    for mod, had, prev in undo:
        if had:
            mod.forward = prev
        else:
            mod.__dict__.pop("forward", None)
        mod.__dict__.pop(_WRAP_ATTR, None)


def convert(model, backend="auto"):
    """The mmcore.nn.LoRALinear route, if available -> (replaced, left, undo) or None."""
    try:
        from ..nn import convert_peft_model  # written by the LoRA nn helper
    except Exception:  # noqa: BLE001
        return None
    cls = _peft_lora_linear_cls()
    if cls is None:
        return [], [], []
    before = {n: m for n, m in model.named_modules() if isinstance(m, cls)}
    res = convert_peft_model(model, backend=backend)
    replaced = [(n, "peft lora.Linear -> mmcore.nn.LoRALinear") for n in res.get("converted", [])]
    left = [(n, f"peft LoRA: {r}") for n, r in res.get("skipped", {}).items()]
    undo = [(n, before[n]) for n in res.get("converted", []) if n in before]
    return replaced, left, undo


def unconvert(model, undo):
    for name, mod in undo:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, mod)
