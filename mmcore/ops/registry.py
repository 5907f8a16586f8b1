"""Backend registry and dispatch (xformers style).

Every backend declares, per op, an :class:`OpImpl`: what it can serve (devices, dtypes,
head dims, backward, GQA, ...) and two callables, ``forward`` and ``backward``.  The
dispatcher walks the implementations of an op in priority order and takes the first one
that refuses nothing; when the caller forces a backend that cannot serve, one error lists
every backend and why it refused.

The same declarations drive the random-shape test generator (tests/kit.py), so dispatch,
errors and tests cannot drift apart.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

OPS = ("window_attention", "cross_attention", "lora_linear")
BACKENDS = ("triton", "cuda", "cpu", "torch")


@dataclass(frozen=True)
class Problem:
    """What an op call needs, from tensor metadata only (valid under torch.compile tracing).

    head_dim: D of the attention (or K of lora_linear); gqa: Hq != Hkv; needs_grad: any input
    requires grad; global_tokens / window: window_attention only; rank / adapters: lora only.
    """

    op: str
    device: str
    dtype: torch.dtype
    head_dim: int = 0
    gqa: bool = False
    needs_grad: bool = False
    global_tokens: int = 0
    seqlens: bool = False
    rank: int = 0
    adapters: int = 1
    extra: dict = field(default_factory=dict)


@dataclass
class OpImpl:
    """One backend's implementation of one op, with its declared limits.

    forward / backward signatures are op specific; see mmcore/ops/<op>.py (``_FWD_DOC``).
    available() returns None when the backend loaded, else the reason it did not.
    check(problem) returns extra refusal reasons beyond the declared attributes.
    """

    op: str
    backend: str
    priority: int
    devices: frozenset
    dtypes: frozenset
    forward: Callable
    backward: Optional[Callable] = None
    max_head_dim: Optional[int] = None
    supports_gqa: bool = True
    supports_global_tokens: bool = True
    max_rank: Optional[int] = None
    supports_multi_adapter: bool = True
    available: Callable[[], Optional[str]] = lambda: None
    check: Optional[Callable[[Problem], list]] = None
    # devices where backend="auto" may pick it (None: all of `devices`); the interpreted
    # Triton path serves CPU tensors only when asked for by name
    auto_devices: Optional[frozenset] = None

    @property
    def supports_backward(self) -> bool:
        return self.backward is not None

    def refuse(self, p: Problem) -> list:
        """Reasons this implementation cannot serve ``p`` (empty list: it can).

        Availability is probed once when the backends load (a probe may call into the
        dispatcher, which torch.compile cannot trace); `mmcore info` probes afresh."""
        why = self.__dict__.get("_why", None) if "_why" in self.__dict__ else self.available()
        if why:
            return [f"not available: {why}"]
        r = []
        if p.device not in self.devices:
            r.append(f"device {p.device} not in {sorted(self.devices)}")
        if p.dtype not in self.dtypes:
            r.append(f"dtype {p.dtype} not in {sorted(str(d) for d in self.dtypes)}")
        if self.max_head_dim is not None and p.head_dim > self.max_head_dim:
            r.append(f"head dim {p.head_dim} > {self.max_head_dim}")
        if p.needs_grad and not self.supports_backward:
            r.append("no backward")
        if p.gqa and not self.supports_gqa:
            r.append("no GQA")
        if p.global_tokens and not self.supports_global_tokens:
            r.append("no global tokens")
        if self.max_rank is not None and p.rank > self.max_rank:
            r.append(f"rank {p.rank} > {self.max_rank}")
        if p.adapters > 1 and not self.supports_multi_adapter:
            r.append("no multi-adapter batches")
        if self.check is not None and not r:
            r.extend(self.check(p))
        return r


_REGISTRY: dict = {op: {} for op in OPS}


class BackendError(RuntimeError):
    """No backend can serve the call (or the forced one cannot); the message lists why."""


def register(impl: OpImpl) -> OpImpl:
    if impl.op not in _REGISTRY:
        raise ValueError(f"unknown op {impl.op!r}")
    _REGISTRY[impl.op][impl.backend] = impl
    return impl


def implementations(op: str) -> list:
    """The registered implementations of ``op``, best first."""
    _load_backends()
    return sorted(_REGISTRY[op].values(), key=lambda i: -i.priority)


def get(op: str, backend: str) -> OpImpl:
    _load_backends()
    return _REGISTRY[op][backend]


def select(op: str, p: Problem, backend: str = "auto") -> OpImpl:
    """Pick the implementation of ``op`` for problem ``p``.

    backend: "auto" (or env MMCORE_BACKEND when the caller says "auto"), or a name from
    BACKENDS.  Raises BackendError listing every backend and its reasons.
    """
    if backend is None or backend == "auto":
        backend = os.environ.get("MMCORE_BACKEND", "auto") or "auto"
    impls = implementations(op)
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    reasons = {}
    for impl in impls:
        if backend != "auto" and impl.backend != backend:
            continue
        why = impl.refuse(p)
        if (not why and backend == "auto" and impl.auto_devices is not None
                and p.device not in impl.auto_devices):
            why = [f"serves {p.device} only when asked for by name"]
        if not why:
            return impl
        reasons[impl.backend] = why
    for impl in impls:  # complete the report with the backends not asked for
        reasons.setdefault(impl.backend, impl.refuse(p) or ["(can serve; not the one asked for)"])
    for b in BACKENDS:
        reasons.setdefault(b, [f"no implementation of {op}"])
    lines = "\n".join(f"  {b}: {'; '.join(r)}" for b, r in reasons.items())
    asked = "any backend" if backend == "auto" else f"backend {backend!r}"
    raise BackendError(
        f"{op}: {asked} cannot serve device={p.device} dtype={p.dtype} head_dim={p.head_dim}"
        f" needs_grad={p.needs_grad}:\n{lines}"
    )


_loaded = False


def _load_backends() -> None:
    """Import the backend modules once; each registers its OpImpls (and logs, not raises,
    when its compiled part is missing)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    from .backends import window_attention, cross_attention, lora_linear, cuda  # noqa: F401

    for impls in _REGISTRY.values():
        for impl in impls.values():
            impl._why = impl.available()


def report() -> dict:
    """{op: [(backend, loaded_reason_or_None, declared limits)]} for `mmcore info`."""
    out = {}
    for op in OPS:
        rows = []
        for impl in implementations(op):
            lim = {
                "devices": sorted(impl.devices),
                "dtypes": [str(d).replace("torch.", "") for d in sorted(impl.dtypes, key=str)],
                "max_head_dim": impl.max_head_dim,
                "backward": impl.supports_backward,
                "gqa": impl.supports_gqa,
            }
            rows.append((impl.backend, impl.available(), lim))
        out[op] = rows
    return out
