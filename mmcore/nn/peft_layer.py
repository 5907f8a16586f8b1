"""peft's own ``lora.Linear`` layers on the fused ``mmcore.ops.lora_linear``.

``convert_peft_model(model)`` changes only the class of each peft ``lora.Linear`` (on a plain
float ``nn.Linear`` base, or a transformers ``Conv1D`` base with ``fan_in_fan_out=True`` as in
the GPT-2 family) to :class:`FusedLoraLinear`, a subclass of peft's ``lora.Linear`` that
overrides ``forward`` (and ``_get_name``, so that its repr still starts ``lora.Linear(`` as
peft prints it; :func:`is_fused`, ``type(layer).__name__`` and ``mmcore.patch``'s report tell
the converted layers apart).  Parameters, buffers, state-dict keys, adapters
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
* for the adapters used: plain LoRA, ``lora_bias=True`` (the bias of the low-rank term,
  scaling · lora_B.bias, is folded into the op's bias argument: exact, gradients reach
  lora_B.bias), or DoRA as the only adapter of the call (``use_dora=True``: the op's
  col_scale epilogue, see below); A and B plain ``nn.Linear``, dropout an ``nn.Identity`` or
  an ``nn.Dropout`` that is off (eval mode, p = 0);
* a frozen base (no gradient wanted for its weight or bias), x of the base weight's dtype and
  device, no extra forward arguments, no hooks on the base layer.

DoRA (peft 0.22, ``peft/tuners/lora/dora.py``): peft computes, with m the magnitude vector
and the weight norm detached from the graph (DoRA paper, section 4.3),

    n = ||W + s·B A||_row  (N,), no gradient;   y = (m / n) ⊙ (x Wᵀ + s·B A x) + b

(peft writes it as base(x) + (m/n - 1) ⊙ (base(x) - b) + (m/n) ⊙ s·B A x).  Here n is
computed per call as peft does (in fp32, fp64 for fp64) and c = m / n goes to the op as its
col_scale: one fused pass, d m through the op's d col_scale, dA / dB through dy ⊙ c.  With
LoRA dropout active peft applies dropout to the whole DoRA term's input (base included), which
the op cannot express: such calls run peft's forward.

A Conv1D base (weight stored (K, N)) goes to the op as the transposed view ``weight.t()``, read
in place by every backend (no copy per call; measured on the CPU: the GEMM on the view costs
the same as on a contiguous (N, K) copy, the copy itself 3-7 % of the GEMM).

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
from .lora import concat_adapters, stack_adapters

_BACKEND_ATTR = "_mmcore_backend"
_KIND_ATTR = "_mmcore_kind"  # "Linear" / "Conv1D": the base layer kind, set at conversion
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
            "forward": _forward, "_get_name": _get_name})
    return _CLS


def __getattr__(name):  # PEP 562: pickle finds FusedLoraLinear by name without peft imported
    if name == "FusedLoraLinear":
        cls = fused_class()
        if cls is not None:
            return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _get_name(self):
    """The name in the repr: peft's ("lora." + "Linear(...)"), not the subclass's."""
    return "Linear"


# ---------------------------------------------------------------------- forward


STATS = CallStats()  # peft layers' eager calls: on the op / on peft's forward (with reasons)
# op calls by what they used beyond plain LoRA on an nn.Linear: "Conv1D", "lora_bias", "DoRA"
KIND_CALLS: dict = {}


def _count_kinds(kinds):
    for k in kinds:
        KIND_CALLS[k] = KIND_CALLS.get(k, 0) + 1


def reset_stats():
    """Zero STATS and KIND_CALLS."""
    STATS.reset()
    KIND_CALLS.clear()


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
    w = _weight(self)
    if counting:
        STATS.op_calls += 1
        kinds = ["Conv1D"] if _kind(self) == "Conv1D" else []
        if any(self.lora_bias.get(n) for n in names):
            kinds.append("lora_bias")
        if names[0] in self.lora_variant:
            kinds.append("DoRA")
        _count_kinds(kinds)
    if ids is not None:
        A, B, s = stack_adapters(self, names, x.dtype)
        return lora_linear(x, w, base.bias, A, B, s, adapter_ids=ids, backend=backend)
    la, lb, s = concat_adapters(self, names, x.dtype)
    bias = _bias(self, names, x.dtype)
    if names[0] in self.lora_variant:  # DoRA, the only adapter of the call (see _plan)
        return lora_linear(x, w, bias, la, lb, s, col_scale=_dora_scale(self, names[0], w, x),
                           backend=backend)
    return lora_linear(x, w, bias, la, lb, s, backend=backend)


def _weight(self):
    """The base weight as (N, K): nn.Linear's own, or the transposed view of Conv1D's (K, N)
    (read in place by the op: no copy)."""
    w = self.base_layer.weight
    return w.t() if _kind(self) == "Conv1D" else w


def _kind(self):
    return self.__dict__.get(_KIND_ATTR) or base_kind(self)


def _bias(self, names, dtype):
    """The base bias plus Σ scaling_a · lora_B_a.bias over the adapters with lora_bias: the
    low-rank term's bias folded into the op's (differentiable: lora_B.bias gets Σ_rows dy ·
    scaling).  None when there is neither."""
    bias = self.base_layer.bias
    for n in names:
        lb = self.lora_B[n].bias
        if self.lora_bias.get(n) and lb is not None:
            t = lb.to(dtype) * float(self.scaling[n])
            bias = t if bias is None else bias + t
    return bias


def _dora_scale(self, name, w, x):
    """DoRA's col_scale c = m / ||W + s·B A||_row (N,), the norm detached as in peft (computed
    in fp32, fp64 for fp64 x); m (the magnitude, trainable) keeps its gradient."""
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    a, b = self.lora_A[name].weight, self.lora_B[name].weight
    with torch.no_grad():
        merged = torch.addmm(w.to(cdt), b.to(cdt), a.to(cdt), alpha=float(self.scaling[name]))
        norm = torch.linalg.vector_norm(merged, dim=1)
    m = self.lora_magnitude_vector[name].weight
    return m.to(cdt) / norm


def _adapter_why_not(self, name) -> Optional[str]:
    """None if adapter `name` is plain LoRA with its dropout off for this call (what the op
    computes), else why not."""
    kinds = _adapter_kinds(self, name)
    if kinds:
        return kinds[0]
    a, b = self.lora_A[name], self.lora_B[name]
    if a.bias is not None or (b.bias is not None and not self.lora_bias.get(name)):
        return "lora_A / lora_B with a bias"
    if a._forward_hooks or b._forward_hooks or a._forward_pre_hooks or b._forward_pre_hooks:
        return "hooks on lora_A / lora_B"
    d = self.lora_dropout[name]
    if type(d) is nn.Dropout and d.training and d.p > 0:
        return "LoRA dropout while training"
    if name in self.lora_variant and self.lora_magnitude_vector[name].weight.device != \
            self.base_layer.weight.device:
        return "DoRA magnitude on another device"
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
    if any(n in self.lora_variant for n in names):
        if mixed is not None:
            return "DoRA in a mixed-adapter batch"
        if len(names) > 1:
            return "DoRA with several active adapters"
    if mixed is not None and any(self.lora_bias.get(n) for n in names):
        return "lora_bias in a mixed-adapter batch"
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


def _conv1d():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def base_kind(mod) -> Optional[str]:
    """"Linear" (a plain nn.Linear base), "Conv1D" (transformers' Conv1D, weight (K, N)) or
    None (neither: the layer is not converted)."""
    base = mod.base_layer
    if type(base) is nn.Linear:
        return "Linear"
    c1 = _conv1d()
    if c1 is not None and type(base) is c1:
        return "Conv1D"
    return None


def _why_not(mod) -> Optional[str]:
    """Why a peft lora.Linear is left as it is (None: it is converted)."""
    kind = base_kind(mod)
    base = mod.base_layer
    plain = (type(base.weight) in (nn.Parameter, torch.Tensor) and base.weight.dim() == 2
             and base.weight.dtype.is_floating_point
             and (base.bias is None or base.bias.dtype == base.weight.dtype))
    if kind is None or not plain:
        return (f"base layer is {type(base).__name__}, not an nn.Linear or Conv1D with a "
                f"plain float weight")
    if kind == "Linear" and getattr(mod, "fan_in_fan_out", False):
        return "fan_in_fan_out=True on an nn.Linear base"
    if kind == "Conv1D" and not getattr(mod, "fan_in_fan_out", False):
        return "Conv1D base with fan_in_fan_out=False"
    if mod.lora_A and all(_adapter_kinds(mod, a) for a in mod.lora_A):
        kinds = sorted({k for a in mod.lora_A for k in _adapter_kinds(mod, a)})
        return f"no adapter the op can serve ({', '.join(kinds)})"
    return None


def _is_dora(mod, a) -> bool:
    v = getattr(mod, "lora_variant", {}).get(a)
    if v is None or type(v).__name__ != "DoraLinearVariant":
        return False
    from peft.tuners.lora.variants import DoraLinearVariant
    mag = getattr(mod, "lora_magnitude_vector", {})
    return type(v) is DoraLinearVariant and a in mag and \
        type(mag[a]).__name__ == "DoraLinearLayer"


def _adapter_kinds(mod, a):
    """Why adapter `a` of `mod` can never be served by the op (empty: it can)."""
    kinds = []
    if a in getattr(mod, "lora_variant", {}) and not _is_dora(mod, a):
        kinds.append(f"LoRA variant {type(mod.lora_variant[a]).__name__}")
    d = mod.lora_dropout[a]
    if type(d) not in (nn.Identity, nn.Dropout):
        kinds.append(f"dropout {type(d).__name__}")
    if type(mod.lora_A[a]) is not nn.Linear or type(mod.lora_B[a]) is not nn.Linear:
        kinds.append("A/B not nn.Linear")
    return kinds


def _create_and_fuse(lora_config, adapter_name, target, *, backend="auto", create=None,
                     **kwargs):
    """The model class's own _create_new_module (`create`: LoraModel's, or a subclass's such as
    AdaLoraModel's), then the new layer is converted if it is a peft lora.Linear (installed
    per model)."""
    if create is None:
        from peft.tuners.lora.model import LoraModel
        create = LoraModel._create_new_module
    new = create(lora_config, adapter_name, target, **kwargs)
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
        mod.__dict__[_KIND_ATTR] = base_kind(mod)
    return why


def layer_kinds(mod) -> list:
    """What a converted layer brings to the op: its base kind ("Linear" / "Conv1D"), then
    "lora_bias" / "DoRA" when one of its adapters has it."""
    kinds = [mod.__dict__.get(_KIND_ATTR) or base_kind(mod)]
    if any(mod.lora_bias.get(a) for a in mod.lora_A):
        kinds.append("lora_bias")
    if any(_is_dora(mod, a) for a in mod.lora_A):
        kinds.append("DoRA")
    return kinds


def convert_peft_model(peft_model: nn.Module, backend: str = "auto") -> dict:
    """Route, in place, every peft ``lora.Linear`` of a peft model (a ``PeftModel``, a
    ``LoraModel``, or any module holding peft LoRA layers) through ``mmcore.ops.lora_linear``.

    Only the layers' class changes (to :class:`FusedLoraLinear`, a subclass of peft's
    ``lora.Linear`` overriding ``forward``): tensors, keys and peft's whole API are untouched,
    and calls the op cannot serve exactly run peft's own forward (see the module docstring).
    LoRA layers peft adds later to this model are converted as they are created.  Converted:
    ``lora.Linear`` on an ``nn.Linear`` or a transformers ``Conv1D`` (GPT-2 family), with plain
    LoRA, ``lora_bias=True`` and DoRA adapters.  Left as they are: other LoRA layer types
    (Embedding, Conv, ParamWrapper), quantised bases, other LoRA variants (aLoRA, ...), and
    ``fan_in_fan_out=True`` on an ``nn.Linear``.
    Returns {"converted": [names], "skipped": {name: reason}, "kinds": {kind: layers}} where
    kinds counts the converted layers per "Linear" / "Conv1D" base and those with a
    "lora_bias" / "DoRA" adapter.
    """
    if not isinstance(peft_model, nn.Module):
        raise TypeError(f"peft_model must be a torch.nn.Module, got {type(peft_model).__name__}")
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    base = _peft_linear()
    if base is None:
        return {"converted": [], "skipped": {}, "kinds": {}}
    from peft.tuners.lora.layer import LoraLayer
    from peft.tuners.lora.model import LoraModel

    from ..patch.versions import check
    check("peft")
    converted, skipped, kinds = [], {}, {}
    for name, mod in peft_model.named_modules():
        if isinstance(mod, LoraModel):
            # the class's own factory (AdaLoraModel and other subclasses create other layers)
            mod.__dict__[_HOOK_ATTR] = functools.partial(
                _create_and_fuse, backend=backend, create=getattr(type(mod), _HOOK_ATTR))
        if not isinstance(mod, LoraLayer):
            continue
        if type(mod) is fused_class():
            mod.__dict__[_BACKEND_ATTR] = backend
            converted.append(name)
            for k in layer_kinds(mod):
                kinds[k] = kinds.get(k, 0) + 1
            continue
        if type(mod) is not base:
            skipped[name] = f"{type(mod).__name__} LoRA layer (only lora.Linear is converted)"
            continue
        why = _fuse(mod, backend)
        if why is None:
            converted.append(name)
            for k in layer_kinds(mod):
                kinds[k] = kinds.get(k, 0) + 1
        else:
            skipped[name] = why
    return {"converted": converted, "skipped": skipped, "kinds": kinds}


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
            mod.__dict__.pop(_KIND_ATTR, None)
            mod.__dict__.pop("_mmcore_stack", None)
            names.append(name)
    return names


def is_fused(mod) -> bool:
    """Is `mod` a peft lora.Linear converted by convert_peft_model?"""
    cls = fused_class()
    return cls is not None and type(mod) is cls


__all__ = ["convert_peft_model", "unconvert_peft_model", "fused_class", "is_fused",
           "layer_kinds", "reset_stats"]
