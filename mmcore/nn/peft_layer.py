"""peft's own ``lora.Linear`` layers on the fused ``mmcore.ops.lora_linear``.

``convert_peft_model(model)`` changes only the class of each peft ``lora.Linear`` (on a plain
float ``nn.Linear`` base) to :class:`FusedLoraLinear`, a subclass of peft's ``lora.Linear``
that overrides ``forward`` and nothing else.  Parameters, buffers, state-dict keys, adapters
and every peft method stay peft's, so the whole ``PeftModel`` / ``LoraModel`` API keeps its
behaviour: ``save_pretrained`` (same file), ``load_adapter`` / ``add_adapter`` /
``delete_adapter`` / ``set_adapter``, ``disable_adapter()``, ``merge_adapter`` /
``unmerge_adapter`` / ``merge_and_unload``, ``modules_to_save``, ``adapter_names=`` batches,
``copy.deepcopy`` and pickling.  Layers that peft creates later on a converted model
(``add_adapter`` / ``load_adapter`` with new targets) are fused too.

A forward call goes to the op when it is one of the cases the op computes exactly:

* adapters enabled and none merged; the active adapters (summed along the rank), or a mixed
  batch ``adapter_names=[...]`` (per-sample adapters -> the op's ``adapter_ids``; names this
  layer lacks and ``"__base__"`` -> base only, as peft);
* plain LoRA for the adapters used: no DoRA or other variant, no ``lora_bias``, A and B plain
  ``nn.Linear``, dropout an ``nn.Identity`` or an ``nn.Dropout`` that is off (eval mode, p = 0);
* a frozen base (no gradient wanted for its weight or bias), x of the base weight's dtype and
  device, no extra forward arguments, no hooks on the base layer.

Anything else runs peft's own forward, unchanged.  LoRA weights in another dtype than x (peft's
fp32 adapters on a bf16 model) are cast to x's dtype for the op, which accumulates in fp32;
gradients reach the parameters in their own dtype.  ``unconvert_peft_model`` restores peft's
class.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import nn

from ..ops import lora_linear
from .call_stats import CallStats
from .lora import _plain_float_weight, concat_adapters, stack_adapters

_BACKEND_ATTR = "_mmcore_backend"
_HOOK_ATTR = "_create_new_module"  # LoraModel's factory of new LoRA layers (a staticmethod)
_CLS = None


def _peft_linear():
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError:  # no peft: nothing can be a peft layer
        return None
    return Linear


def fused_class():
    """The FusedLoraLinear class (a subclass of peft's lora.Linear), or None without peft."""
    global _CLS
    if _CLS is None:
        base = _peft_linear()
        if base is None:
            return None
        _CLS = type("FusedLoraLinear", (base,), {
            "__module__": __name__, "__qualname__": "FusedLoraLinear",
            "__doc__": "peft's lora.Linear whose forward runs mmcore.ops.lora_linear where "
                       "the op computes the call exactly (see mmcore.nn.peft_layer).",
            "forward": _forward})
    return _CLS


def __getattr__(name):  # PEP 562: pickle finds FusedLoraLinear by name without peft imported
    if name == "FusedLoraLinear":
        cls = fused_class()
        if cls is not None:
            return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------- forward


STATS = CallStats()  # peft layers' eager calls: on the op / on peft's forward (with reasons)


def _forward(self, x, *args, **kwargs):
    """peft's lora.Linear.forward, through mmcore.ops.lora_linear where it is exact."""
    plan = _plan(self, x, args, kwargs)
    counting = not torch.compiler.is_compiling()  # a traced counter recompiles every call
    if isinstance(plan, str):
        if counting:
            STATS.fallback(plan)
        return _peft_linear().forward(self, x, *args, **kwargs)
    base = self.base_layer
    backend = self.__dict__.get(_BACKEND_ATTR, "auto")
    names, ids = plan
    if counting:
        STATS.op_calls += 1
    if ids is None:
        la, lb, s = concat_adapters(self, names, x.dtype)
        return lora_linear(x, base.weight, base.bias, la, lb, s, backend=backend)
    A, B, s = stack_adapters(self, names, x.dtype)
    return lora_linear(x, base.weight, base.bias, A, B, s, adapter_ids=ids, backend=backend)


def _adapter_why_not(self, name) -> Optional[str]:
    """None if adapter `name` is plain LoRA with its dropout off for this call (what the op
    computes), else why not."""
    kinds = _adapter_kinds(self, name)
    if kinds:
        return kinds[0]
    a, b = self.lora_A[name], self.lora_B[name]
    if a.bias is not None or b.bias is not None:
        return "lora_A / lora_B with a bias"
    if a._forward_hooks or b._forward_hooks or a._forward_pre_hooks or b._forward_pre_hooks:
        return "hooks on lora_A / lora_B"
    d = self.lora_dropout[name]
    if type(d) is nn.Dropout and d.training and d.p > 0:
        return "LoRA dropout while training"
    return None


def _plan(self, x, args, kwargs):
    """-> (adapter names, adapter_ids or None) for the op, or the reason (a str) to run
    peft's own forward."""
    if args or any(k != "adapter_names" for k in kwargs):
        return "extra forward arguments"
    if self.disable_adapters:
        return "adapters disabled"
    if self.merged:
        return "adapters merged"
    base = self.base_layer
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        return "x is not a tensor with a feature dim"
    why = _why_not(self)
    if why is not None:
        return why
    if base._forward_hooks or base._forward_pre_hooks or hasattr(base, "_hf_hook"):
        return "hooks on the base layer"
    w, b = base.weight, base.bias
    if x.dtype != w.dtype or x.device != w.device:
        return "x's dtype / device differ from the base weight's"
    if torch.is_grad_enabled() and (w.requires_grad or (b is not None and b.requires_grad)):
        return "trainable base weight or bias"  # the op gives no gradient to the base layer
    mixed = kwargs.get("adapter_names")
    if mixed is None:
        names = [a for a in self.active_adapters if a in self.lora_A]
    else:
        if x.dim() < 2 or len(mixed) != x.shape[0]:
            return "adapter_names do not match x's batch"  # peft raises its own error
        used = set(mixed)
        names = [a for a in self.lora_A if a in used]  # insertion order
    if not names:
        return "no active adapter"
    for n in names:
        why = _adapter_why_not(self, n)
        if why is not None:
            return why
        p = self.lora_A[n].weight
        if p.device != w.device:
            return "adapter on another device"
        if p.dtype != x.dtype and not getattr(self, "cast_input_dtype_enabled", True):
            return "adapter dtype differs and input casting is disabled"
    if mixed is None:
        return names, None
    index = {n: i for i, n in enumerate(names)}
    ids = torch.tensor([index.get(a, -1) for a in mixed], dtype=torch.long, device=x.device)
    return names, ids


# ---------------------------------------------------------------------- convert / unconvert


def _why_not(mod) -> Optional[str]:
    """Why a peft lora.Linear is left as it is (None: it is converted)."""
    if not isinstance(mod.base_layer, nn.Linear) or type(mod.base_layer) is not nn.Linear \
            or not _plain_float_weight(mod.base_layer):
        return (f"base layer is {type(mod.base_layer).__name__}, not an nn.Linear with a "
                f"plain float weight")
    if getattr(mod, "fan_in_fan_out", False):
        return "fan_in_fan_out=True (Conv1D-style weight)"
    if mod.lora_A and all(_adapter_kinds(mod, a) for a in mod.lora_A):
        kinds = sorted({k for a in mod.lora_A for k in _adapter_kinds(mod, a)})
        return f"no adapter the op can serve ({', '.join(kinds)})"
    return None


def _adapter_kinds(mod, a):
    kinds = []
    if a in getattr(mod, "lora_variant", {}):
        kinds.append(f"LoRA variant {type(mod.lora_variant[a]).__name__} (e.g. DoRA)")
    if getattr(mod, "lora_bias", {}).get(a):
        kinds.append("lora_bias=True")
    d = mod.lora_dropout[a]
    if type(d) not in (nn.Identity, nn.Dropout):
        kinds.append(f"dropout {type(d).__name__}")
    if type(mod.lora_A[a]) is not nn.Linear or type(mod.lora_B[a]) is not nn.Linear:
        kinds.append("A/B not nn.Linear")
    return kinds


def _create_and_fuse(lora_config, adapter_name, target, *, backend="auto", **kwargs):
    """LoraModel._create_new_module, then the new layer is converted (installed per model)."""
    from peft.tuners.lora.model import LoraModel
    new = LoraModel._create_new_module(lora_config, adapter_name, target, **kwargs)
    _fuse(new, backend)
    return new


def _fuse(mod, backend) -> Optional[str]:
    base = _peft_linear()
    if base is None or type(mod) is not base:
        return None if type(mod) is fused_class() else "not a peft lora.Linear"
    why = _why_not(mod)
    if why is None:
        mod.__class__ = fused_class()
        mod.__dict__[_BACKEND_ATTR] = backend
    return why


def convert_peft_model(peft_model: nn.Module, backend: str = "auto") -> dict:
    """Route, in place, every peft ``lora.Linear`` of a peft model (a ``PeftModel``, a
    ``LoraModel``, or any module holding peft LoRA layers) through ``mmcore.ops.lora_linear``.

    Only the layers' class changes (to :class:`FusedLoraLinear`, a subclass of peft's
    ``lora.Linear`` overriding ``forward``): tensors, keys and peft's whole API are untouched,
    and calls the op cannot serve exactly run peft's own forward (see the module docstring).
    LoRA layers peft adds later to this model are converted as they are created.  Layers left
    as they are: other LoRA layer types (Embedding, Conv, ParamWrapper, quantised bases),
    ``fan_in_fan_out``, and layers none of whose adapters the op can serve (e.g. DoRA only).
    Returns {"converted": [names], "skipped": {name: reason}}.
    """
    if not isinstance(peft_model, nn.Module):
        raise TypeError(f"peft_model must be a torch.nn.Module, got {type(peft_model).__name__}")
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    base = _peft_linear()
    if base is None:
        return {"converted": [], "skipped": {}}
    from peft.tuners.lora.layer import LoraLayer
    from peft.tuners.lora.model import LoraModel

    from ..patch.versions import check
    check("peft")
    converted, skipped = [], {}
    for name, mod in peft_model.named_modules():
        if isinstance(mod, LoraModel):
            mod.__dict__[_HOOK_ATTR] = functools.partial(_create_and_fuse, backend=backend)
        if not isinstance(mod, LoraLayer):
            continue
        if type(mod) is fused_class():
            mod.__dict__[_BACKEND_ATTR] = backend
            converted.append(name)
            continue
        if type(mod) is not base:
            skipped[name] = f"{type(mod).__name__} LoRA layer (only lora.Linear is converted)"
            continue
        why = _fuse(mod, backend)
        if why is None:
            converted.append(name)
        else:
            skipped[name] = why
    return {"converted": converted, "skipped": skipped}


def unconvert_peft_model(peft_model: nn.Module) -> list:
    """Undo :func:`convert_peft_model`: peft's own class back on every converted layer.
    Returns the names of the layers restored."""
    cls = fused_class()
    if cls is None:
        return []
    from peft.tuners.lora.model import LoraModel
    names = []
    for name, mod in peft_model.named_modules():
        if isinstance(mod, LoraModel):
            hook = mod.__dict__.get(_HOOK_ATTR)
            if isinstance(hook, functools.partial) and hook.func is _create_and_fuse:
                del mod.__dict__[_HOOK_ATTR]
        if type(mod) is cls:
            mod.__class__ = _peft_linear()
            mod.__dict__.pop(_BACKEND_ATTR, None)
            mod.__dict__.pop("_mmcore_stack", None)
            names.append(name)
    return names


def is_fused(mod) -> bool:
    """Is `mod` a peft lora.Linear converted by convert_peft_model?"""
    cls = fused_class()
    return cls is not None and type(mod) is cls


__all__ = ["convert_peft_model", "unconvert_peft_model", "fused_class", "is_fused"]
