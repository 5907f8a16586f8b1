"""LoRALinear: a peft-compatible LoRA layer on top of the fused ``mmcore.ops.lora_linear``.

The attribute names and state-dict keys are those of peft's ``LoraLayer`` /``lora.Linear``::

    base_layer.weight (N, K)  base_layer.bias (N,)          frozen
    lora_A.<name>.weight (r, K)  lora_B.<name>.weight (N, r)  per adapter
    r / lora_alpha / scaling / use_rslora: dicts per adapter;  lora_dropout: ModuleDict

so a peft model's state dict (minus its ``base_model.model.`` prefix) loads as is.

Forward paths (y = x Wᵀ + b + Σ_active s_a (x A_aᵀ) B_aᵀ):
  * one or more active adapters, no dropout in play -> one fused ``lora_linear`` call (several
    active adapters are concatenated along the rank: [A_1; A_2], [s_1 B_1, s_2 B_2]);
  * training with ``lora_dropout > 0`` -> the dropout applies to x on the LoRA path only, so the
    fused op (which reads x once for both terms) cannot be used: the layer runs
    ``F.linear(x) + s·B(A(drop(x)))`` in plain PyTorch, exactly as peft does;
  * ``adapter_ids`` (per token or per sequence, ints into ``adapter_names`` or -1 = base only;
    a list of names with ``"__base__"`` also works) -> stacked adapters ``(A, r_max, K)`` /
    ``(A, N, r_max)``; ranks that differ are zero-padded to the largest (exact);
  * merged adapters are skipped (their delta is already in the weight); disabled -> base only.

LoRA weights whose dtype differs from x (e.g. fp32 adapters on a bf16 model, as peft's
``autocast_adapter_dtype`` makes them) are cast to x's dtype (differentiably) for the fused
op; the op accumulates in fp32.
"""
from __future__ import annotations

import contextlib
import math
import re
from typing import Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import lora_linear
from ..ops.lora_linear import _check_ids, _ids as _normalise_ids

BASE = "__base__"  # peft's name for "no adapter" in mixed batches


def _plain_float_weight(linear) -> bool:
    w = linear.weight
    return (type(w) in (nn.Parameter, torch.Tensor) and w.dtype.is_floating_point
            and (linear.bias is None or linear.bias.dtype == w.dtype))


def _scale(alpha, r, use_rslora):
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus named LoRA adapters (peft's LoraLayer layout).

    Args:
        base: the ``nn.Linear`` to wrap (its weight and bias are frozen in place).
        r, lora_alpha, lora_dropout, use_rslora: the first adapter's settings; scaling is
            ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA).
        adapter_name: name of the first adapter; None creates the layer with no adapter.
        init_lora_weights: True -> peft's init (A kaiming-uniform a=sqrt(5), B zeros, so the
            layer starts equal to the base); "gaussian" -> A ~ N(0, 1/r); False -> A and B
            random (kaiming) — handy for tests; None -> leave as allocated (loaders).
        backend: passed to ``mmcore.ops.lora_linear`` ("auto" picks the fastest).
    """

    def __init__(self, base: nn.Linear, r: int = 8, lora_alpha: float = 8,
                 lora_dropout: float = 0.0, use_rslora: bool = False,
                 adapter_name: Optional[str] = "default", init_lora_weights=True,
                 backend: str = "auto"):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be a torch.nn.Linear, got {type(base).__name__}")
        if not _plain_float_weight(base):
            raise TypeError(f"base {type(base).__name__} has a {base.weight.dtype} "
                            f"{type(base.weight).__name__} weight; LoRALinear needs a plain "
                            f"float weight (quantised bases are not supported)")
        self.base_layer = base
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.backend = backend
        self.r: dict = {}
        self.lora_alpha: dict = {}
        self.scaling: dict = {}
        self.use_rslora: dict = {}
        self.lora_dropout = nn.ModuleDict()
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.merged_adapters: list = []
        self._active_adapter: list = []
        self._disable_adapters = False
        self._ctx_adapter_ids = None  # set by `adapter_batch(model, ids)`
        if adapter_name is not None:
            self.add_adapter(adapter_name, r, lora_alpha, lora_dropout=lora_dropout,
                             use_rslora=use_rslora, init_lora_weights=init_lora_weights)

    # ------------------------------------------------------------------ peft-like surface

    @property
    def weight(self):
        """The base weight (HF code reads ``proj.weight.dtype`` and the like)."""
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def get_base_layer(self):
        return self.base_layer

    @property
    def adapter_names(self) -> list:
        """All adapters in insertion order: ``adapter_ids`` index this list."""
        return list(self.lora_A.keys())

    @property
    def active_adapters(self) -> list:
        return list(self._active_adapter)

    @property
    def active_adapter(self) -> Union[str, list]:
        a = self._active_adapter
        return a[0] if len(a) == 1 else list(a)

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def enable_adapters(self, enabled: bool) -> None:
        """enabled=False -> forward is the base layer only (merged adapters are unmerged, as
        peft does); adapter weights are frozen while disabled."""
        if enabled:
            self._disable_adapters = False
            self.set_adapter(self._active_adapter)
        else:
            if self.merged:
                self.unmerge()
            for name in self.lora_A:
                self.lora_A[name].requires_grad_(False)
                self.lora_B[name].requires_grad_(False)
            self._disable_adapters = True

    def add_adapter(self, adapter_name: str, r: int = 8, lora_alpha: float = 8,
                    lora_dropout: float = 0.0, use_rslora: bool = False,
                    init_lora_weights=True, dtype: Optional[torch.dtype] = None) -> None:
        """Add an adapter (A (r, K), B (N, r)) on the base weight's device, dtype = base's
        unless given.  The first adapter becomes active; later ones do not (as peft)."""
        if not isinstance(adapter_name, str) or not adapter_name or adapter_name == BASE:
            raise ValueError(f"adapter_name must be a non-empty string other than {BASE!r}, "
                             f"got {adapter_name!r}")
        if adapter_name in self.lora_A:
            raise ValueError(f"adapter {adapter_name!r} already exists in this layer; "
                             f"delete_adapter it first")
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ValueError(f"r must be a positive int, got {r!r}")
        if not 0.0 <= float(lora_dropout) < 1.0:
            raise ValueError(f"lora_dropout must lie in [0, 1), got {lora_dropout}")
        w = self.base_layer.weight
        dt = dtype or w.dtype
        a = nn.Linear(self.in_features, r, bias=False, device=w.device, dtype=dt)
        b = nn.Linear(r, self.out_features, bias=False, device=w.device, dtype=dt)
        self.lora_A[adapter_name] = a
        self.lora_B[adapter_name] = b
        self.lora_dropout[adapter_name] = (nn.Dropout(p=float(lora_dropout))
                                           if lora_dropout > 0 else nn.Identity())
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.use_rslora[adapter_name] = bool(use_rslora)
        self.scaling[adapter_name] = _scale(lora_alpha, r, use_rslora)
        self.reset_lora_parameters(adapter_name, init_lora_weights)
        if not self._active_adapter:
            self._active_adapter = [adapter_name]
        self.set_adapter(self._active_adapter)

    @torch.no_grad()
    def reset_lora_parameters(self, adapter_name: str, init_lora_weights=True) -> None:
        if init_lora_weights is None:
            return
        a, b = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        if isinstance(init_lora_weights, str) and init_lora_weights.lower() == "gaussian":
            nn.init.normal_(a, std=1 / self.r[adapter_name])
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        if init_lora_weights is False:
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        else:
            nn.init.zeros_(b)

    def set_adapter(self, adapter_names: Union[str, Sequence[str]]) -> None:
        """Make these adapters active (their outputs are summed); active adapters are
        trainable, the others frozen (peft's rule)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for n in names:
            if n not in self.lora_A:
                raise ValueError(f"unknown adapter {n!r}; this layer has {self.adapter_names}")
        for n in self.lora_A:
            on = n in names and not self._disable_adapters
            self.lora_A[n].requires_grad_(on)
            self.lora_B[n].requires_grad_(on)
        self._active_adapter = names

    def set_scale(self, adapter: str, scale: float) -> None:
        """scaling = scale · lora_alpha / r (or / sqrt(r)), as peft's set_scale."""
        if adapter in self.merged_adapters:
            raise RuntimeError(f"adapter {adapter!r} is merged; unmerge before rescaling")
        self.scaling[adapter] = scale * _scale(self.lora_alpha[adapter], self.r[adapter],
                                               self.use_rslora[adapter])

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.lora_A:
            raise ValueError(f"unknown adapter {adapter_name!r}; this layer has "
                             f"{self.adapter_names}")
        if adapter_name in self.merged_adapters:
            raise RuntimeError(f"adapter {adapter_name!r} is merged into the weight; "
                               f"unmerge() before deleting it")
        for d in (self.lora_A, self.lora_B, self.lora_dropout):
            del d[adapter_name]
        for d in (self.r, self.lora_alpha, self.scaling, self.use_rslora):
            d.pop(adapter_name, None)
        active = [n for n in self._active_adapter if n != adapter_name]
        if not active and len(self.lora_A):
            active = [next(iter(self.lora_A.keys()))]
        self.set_adapter(active)

    # ------------------------------------------------------------------ merge

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """s · B @ A in fp32 (fp64 for fp64 weights), shape (N, K)."""
        w = self.base_layer.weight
        cdt = torch.float64 if w.dtype == torch.float64 else torch.float32
        a = self.lora_A[adapter].weight.detach().to(device=w.device, dtype=cdt)
        b = self.lora_B[adapter].weight.detach().to(device=w.device, dtype=cdt)
        return (b @ a) * self.scaling[adapter]

    @torch.no_grad()
    def merge(self, adapter_names: Optional[Iterable[str]] = None, safe_merge: bool = False
              ) -> None:
        """W += s·B@A for each adapter (default: the active ones not yet merged).

        The sum is formed in fp32 and rounded once to W's dtype (peft #1388: bf16 merge math
        in fp32).  safe_merge=True checks the result for NaN/inf before writing it."""
        names = self.active_adapters if adapter_names is None else (
            [adapter_names] if isinstance(adapter_names, str) else list(adapter_names))
        w = self.base_layer.weight
        for n in names:
            if n not in self.lora_A:
                raise ValueError(f"unknown adapter {n!r}; this layer has {self.adapter_names}")
            if n in self.merged_adapters:
                continue
            d = self.get_delta_weight(n)
            new = w.to(d.dtype) + d
            if safe_merge and not torch.isfinite(new).all():
                raise ValueError(f"NaN/inf in the merged weight: adapter {n!r} seems broken")
            w.copy_(new)
            self.merged_adapters.append(n)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo merge(): W -= s·B@A (fp32 math) for every merged adapter, last first."""
        w = self.base_layer.weight
        while self.merged_adapters:
            n = self.merged_adapters.pop()
            d = self.get_delta_weight(n)
            w.copy_(w.to(d.dtype) - d)

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor, adapter_ids=None) -> torch.Tensor:
        """x (..., K) -> (..., N).  adapter_ids: None (the active adapters), or per token
        (x.shape[:-1]) / per sequence (x.shape[:1]) ints into ``adapter_names`` (-1 = base),
        or a list of adapter names per sequence (``"__base__"`` = base), like peft's
        ``adapter_names=`` mixed batch."""
        W, b = self.base_layer.weight, self.base_layer.bias
        if adapter_ids is None:
            adapter_ids = self._ctx_adapter_ids
        if self._disable_adapters:
            if self.merged:
                self.unmerge()
            return F.linear(x, W, b)
        if adapter_ids is not None:
            if self.merged:
                raise ValueError("cannot run a multi-adapter batch (adapter_ids) while adapters "
                                 f"{self.merged_adapters} are merged; unmerge() first")
            return self._forward_multi(x, adapter_ids)
        active = [n for n in self._active_adapter
                  if n in self.lora_A and n not in self.merged_adapters]
        if not active:
            return F.linear(x, W, b)
        if self.training and any(self._p(n) > 0 for n in active):
            return self._forward_dropout(x, active)
        la, lb, s = concat_adapters(self, active, x.dtype)
        return lora_linear(x, W, b, la, lb, s, backend=self.backend)

    def _p(self, name):
        d = self.lora_dropout[name]
        return d.p if isinstance(d, nn.Dropout) else 0.0

    def _forward_dropout(self, x, active):
        """Training with dropout on the LoRA path: base on x, LoRA on drop(x) (plain torch)."""
        y = F.linear(x, self.base_layer.weight, self.base_layer.bias)
        dt = y.dtype
        for n in active:
            a, b = self.lora_A[n], self.lora_B[n]
            xd = self.lora_dropout[n](x.to(a.weight.dtype))
            y = y + b(a(xd)) * self.scaling[n]  # promoted, rounded once at the end (as peft)
        return y.to(dt)

    def _ids_tensor(self, x, adapter_ids):
        names = self.adapter_names
        if isinstance(adapter_ids, torch.Tensor):
            return adapter_ids.to(x.device)
        ids = []
        for a in adapter_ids:
            if isinstance(a, str):
                if a == BASE:
                    ids.append(-1)
                elif a in self.lora_A:
                    ids.append(names.index(a))
                else:
                    raise ValueError(f"adapter_ids names unknown adapter {a!r}; this layer has "
                                     f"{names} (or {BASE!r} for the base only)")
            else:
                ids.append(int(a))
        return torch.tensor(ids, dtype=torch.long, device=x.device)

    def _forward_multi(self, x, adapter_ids):
        if not len(self.lora_A):
            raise ValueError("adapter_ids given but this layer has no adapters")
        ids = self._ids_tensor(x, adapter_ids)
        names = self.adapter_names
        if self.training and any(self._p(n) > 0 for n in names):
            return self._forward_multi_dropout(x, ids)
        A, B, s = stack_adapters(self, names, x.dtype)
        return lora_linear(x, self.base_layer.weight, self.base_layer.bias, A, B, s,
                           adapter_ids=ids, backend=self.backend)

    def _forward_multi_dropout(self, x, ids):
        """Training, dropout > 0, mixed batch: per-adapter loop in plain torch (as peft)."""
        lead = x.shape[:-1]
        ids2 = _normalise_ids(ids, lead, x.device)  # (M,), same rules as the op
        y = F.linear(x, self.base_layer.weight, self.base_layer.bias)
        K, N = x.shape[-1], y.shape[-1]
        x2 = x.reshape(-1, K)
        out = y.reshape(-1, N)
        names = self.adapter_names
        _check_ids(ids2, len(names))
        for i, n in enumerate(names):
            rows = (ids2 == i).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            a, b = self.lora_A[n], self.lora_B[n]
            t = b(a(self.lora_dropout[n](x2[rows].to(a.weight.dtype)))) * self.scaling[n]
            out = out.index_add(0, rows, t.to(out.dtype))
        return out.reshape(*lead, N)

    def extra_repr(self) -> str:
        ad = ", ".join(f"{n}: r={self.r[n]} s={self.scaling[n]:.4g}" for n in self.lora_A)
        return (f"in={self.in_features}, out={self.out_features}, adapters=[{ad}], "
                f"active={self._active_adapter}, merged={self.merged_adapters}")


# ---------------------------------------------------------------------- adapter weights for the op
# Shared by LoRALinear and peft's own lora.Linear (mmcore.nn.peft_layer): both hold
# ``lora_A`` / ``lora_B`` ModuleDicts of nn.Linear and a ``scaling`` dict per adapter.


def concat_adapters(mod, names, dtype):
    """Adapters `names` summed in one low-rank term -> A (r_total, K), B (N, r_total), scaling.

    [A_1; A_2] and [s_1 B_1, s_2 B_2] (one shared float scaling when all are equal); weights
    cast to `dtype` (differentiably: gradients reach the parameters in their own dtype)."""
    if len(names) == 1:
        n = names[0]
        return (mod.lora_A[n].weight.to(dtype), mod.lora_B[n].weight.to(dtype),
                float(mod.scaling[n]))
    la = torch.cat([mod.lora_A[n].weight.to(dtype) for n in names], 0)
    ss = [float(mod.scaling[n]) for n in names]
    if all(s == ss[0] for s in ss):
        lb = torch.cat([mod.lora_B[n].weight.to(dtype) for n in names], 1)
        return la, lb, ss[0]
    lb = torch.cat([mod.lora_B[n].weight.to(dtype) * s for n, s in zip(names, ss)], 1)
    return la, lb, 1.0


_STACK_ATTR = "_mmcore_stack"


def stack_adapters(mod, names, dtype):
    """Adapters `names` stacked: A (n, r_max, K), B (n, N, r_max), scaling (n,) fp32; ranks
    that differ are zero-padded to the largest (exact).

    Cached on `mod` while nothing needs a gradient (keyed on the parameters' versions)."""
    params = [p for n in names for p in (mod.lora_A[n].weight, mod.lora_B[n].weight)]
    grad = torch.is_grad_enabled() and any(p.requires_grad for p in params)
    dev = params[0].device
    key = (tuple(names), dtype, str(dev), tuple(float(mod.scaling[n]) for n in names),
           tuple((id(p), p.data_ptr(), p.dtype, p._version) for p in params))
    cached = mod.__dict__.get(_STACK_ATTR)
    if not grad and cached is not None and cached[0] == key:
        return cached[1]
    ranks = [mod.lora_A[n].weight.shape[0] for n in names]
    rmax = max(ranks)
    A = torch.stack([F.pad(mod.lora_A[n].weight.to(dtype), (0, 0, 0, rmax - r))
                     for n, r in zip(names, ranks)])  # (n, rmax, K)
    B = torch.stack([F.pad(mod.lora_B[n].weight.to(dtype), (0, rmax - r))
                     for n, r in zip(names, ranks)])  # (n, N, rmax)
    s = torch.tensor([float(mod.scaling[n]) for n in names], dtype=torch.float32, device=dev)
    out = (A, B, s)
    mod.__dict__[_STACK_ATTR] = None if grad else (key, out)
    return out


# ---------------------------------------------------------------------- model-level helpers


def lora_modules(model: nn.Module):
    """(name, LoRALinear) for every LoRALinear in model (model itself included)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def _matches(name: str, target_modules) -> bool:
    """peft's rule: a string is a full-match regex; a list matches the name or its suffix."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _set_submodule(model, name, new):
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)


def add_lora(model: nn.Module, target_modules, adapter_name: str = "default", r: int = 8,
             lora_alpha: float = 8, lora_dropout: float = 0.0, use_rslora: bool = False,
             init_lora_weights=True, backend: str = "auto") -> list:
    """Wrap every nn.Linear of model whose name matches target_modules (peft's rule: a list of
    names / name suffixes, or a full-match regex string) in LoRALinear, or add the adapter to
    an existing LoRALinear.  Freezes nothing else.  Returns the names touched."""
    touched = []
    mods = list(model.named_modules())
    inner = tuple(n + "." for n, m in mods if isinstance(m, LoRALinear) and n)
    for name, mod in mods:
        if not name or name.startswith(inner) or not _matches(name, target_modules):
            continue
        if isinstance(mod, LoRALinear):
            mod.add_adapter(adapter_name, r, lora_alpha, lora_dropout, use_rslora,
                            init_lora_weights)
        elif isinstance(mod, nn.Linear):
            _set_submodule(model, name, LoRALinear(mod, r, lora_alpha, lora_dropout, use_rslora,
                                                   adapter_name, init_lora_weights, backend))
        else:
            continue
        touched.append(name)
    if not touched:
        raise ValueError(f"target_modules {target_modules!r} matched no nn.Linear in the model")
    return touched


def set_adapter(model: nn.Module, adapter_names) -> None:
    """set_adapter on every LoRALinear of model that has these adapters."""
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    for _, m in lora_modules(model):
        have = [n for n in names if n in m.lora_A]
        if have:
            m.set_adapter(have)


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Context: every LoRALinear of model runs its base layer only."""
    mods = [m for _, m in lora_modules(model)]
    before = [m.disable_adapters for m in mods]
    grads = [(p, p.requires_grad) for m in mods for d in (m.lora_A, m.lora_B)
             for p in d.parameters()]
    for m in mods:
        m.enable_adapters(False)
    try:
        yield model
    finally:
        for m, was in zip(mods, before):
            m._disable_adapters = was
        for p, g in grads:  # trainability exactly as before
            p.requires_grad_(g)


@contextlib.contextmanager
def adapter_batch(model: nn.Module, adapter_ids):
    """Context: a mixed-adapter batch through a whole model whose forward does not pass
    adapter_ids to its layers (HF models).  adapter_ids: per sequence (B,) or per token
    (B, S) ints into each layer's ``adapter_names`` (-1 = base), or a list of names per
    sequence (``"__base__"`` = base), like peft's ``model(..., adapter_names=[...])``."""
    mods = [m for _, m in lora_modules(model)]
    for m in mods:
        m._ctx_adapter_ids = adapter_ids
    try:
        yield model
    finally:
        for m in mods:
            m._ctx_adapter_ids = None


def merge_adapters(model: nn.Module, adapter_names=None) -> None:
    for _, m in lora_modules(model):
        m.merge(None if adapter_names is None else
                [n for n in ([adapter_names] if isinstance(adapter_names, str)
                             else adapter_names) if n in m.lora_A])


def unmerge_adapters(model: nn.Module) -> None:
    for _, m in lora_modules(model):
        m.unmerge()
