"""Backend registry and dispatch (xformers style).

Every backend declares, per op, an :class:`OpImpl`: what it can serve (devices, dtypes,
head dims, backward, GQA, ...) and two callables, ``forward`` and ``backward``.

``backend="auto"`` orders the implementations that can serve a problem (:func:`plan`):
by the measured dispatch table of this device where one matches (``mmcore bench --tune``,
mmcore/ops/tables.py), else by each backend's declared priority on that device (the
heuristics).  The op passes the whole order to its custom op as ``"auto:a,b,c"``, and
:func:`run` serves the call from the first backend that does not fail: a backend that
raises while compiling or launching is logged once, remembered for that problem
(mmcore/ops/failures.py) and skipped from then on.  A forced backend that cannot serve
raises one error listing every backend and why it refused; one that fails raises one error
with the facts of the failure.

The same declarations drive the random-shape test generator (tests/kit.py), so dispatch,
errors and tests cannot drift apart.

Exact gradients (:func:`exact_gradients`, env ``MMCORE_EXACT_GRADIENTS=1``): an attention
call that needs gradients is served only by a backend declaring ``exact_grads`` (gradients
within the tolerance rule at any logit size; docs/robustness.md): ``auto`` skips the
others, and naming one of them is refused with the reason.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from . import failures, tables

OPS = ("window_attention", "cross_attention", "lora_linear")
BACKENDS = ("triton", "cuda", "sdpa", "flex", "composed", "cpu", "torch")
SOFTMAX_OPS = ("window_attention", "cross_attention")  # what exact_gradients() governs

EXACT_ENV = "MMCORE_EXACT_GRADIENTS"
_exact_override = None  # set by exact_gradients(); None: the environment decides
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def exact_gradients_enabled() -> bool:
    """Whether attention calls that need gradients must go to a backend that declares exact
    gradients: the innermost :func:`exact_gradients` block, else env MMCORE_EXACT_GRADIENTS
    (1 / true / yes / on; 0 / false / no / off / unset)."""
    if _exact_override is not None:
        return _exact_override
    raw = os.environ.get(EXACT_ENV, "")
    val = raw.strip().lower()
    if val in _TRUE:
        return True
    if val in _FALSE:
        return False
    raise ValueError(f"{EXACT_ENV} must be one of 1, true, yes, on, 0, false, no, off; "
                     f"got {raw!r}")


@contextlib.contextmanager
def exact_gradients(enabled: bool = True):
    """Within the block, attention calls that need gradients use only backends whose
    gradients meet the tolerance rule at any logit size (``OpImpl.exact_grads``: torch, cpu,
    triton; not sdpa, whose backward takes P = exp(S - lse) from an fp32 lse, nor flex).

    ``backend="auto"`` skips the others; naming one (``backend="sdpa"``, MMCORE_BACKEND)
    raises BackendError saying why.  The choice is made at the forward call, and its
    backward runs on the same backend wherever it runs.  Calls without gradients
    (inference) are unaffected.  ``exact_gradients(False)`` turns it off inside a block;
    process-wide (like torch.use_deterministic_algorithms); overrides env
    MMCORE_EXACT_GRADIENTS.  Under torch.compile the setting is read while tracing."""
    if not isinstance(enabled, bool):
        raise TypeError(f"exact_gradients(enabled) takes a bool, got {type(enabled).__name__}")
    global _exact_override
    before = _exact_override
    _exact_override = enabled
    clear_cache()
    try:
        yield
    finally:
        _exact_override = before
        clear_cache()


@dataclass(frozen=True)
class Problem:
    """What an op call needs, from tensor metadata only (valid under torch.compile tracing).

    head_dim: D of the attention (or K of lora_linear); gqa: Hq != Hkv; needs_grad: any input
    requires grad; global_tokens / window: window_attention only; rank / adapters: lora only.
    extra: sizes and flags of the op (window_attention / cross_attention: Sq, Sk, ``softcap``,
    ``dropout`` (attention dropout, only present when used),
    and for windows ``window`` (left, right), ``causal``, ``aligned`` (every sample has
    Lq = Lk), ``key_bounds``, ``key_mask`` (whether the call uses them);
    lora_linear: M, N).  exact: exact_gradients() was on at the call (read when the
    Problem is built).
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
    exact: bool = field(default_factory=lambda: exact_gradients_enabled())

    def key(self) -> tuple:
        """A hashable identity of the problem (the dispatch cache key)."""
        return (self.op, self.device, self.dtype, self.head_dim, self.gqa, self.needs_grad,
                self.global_tokens, self.seqlens, self.rank, self.adapters,
                tuple(sorted(self.extra.items())), self.exact)


@dataclass
class OpImpl:
    """One backend's implementation of one op, with its declared limits.

    forward / backward signatures are op specific; see mmcore/ops/<op>.py (module docstring).
    available() returns None when the backend loaded, else the reason it did not.
    check(problem) returns extra refusal reasons beyond the declared attributes.
    priority: rank under ``auto`` when no dispatch table matches (higher first);
    device_priority overrides it per device type (e.g. PyTorch's SDPA ranks above mmcore's
    Triton kernels on CUDA but below the C++ kernels on the CPU); priority_fn(problem), when
    it returns an int, overrides both for that problem (a measured crossover, e.g. SDPA's CPU
    flash backward beats the C++ window kernel's at full attention).
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
    # attention features a call may use (Problem.extra "softcap" / "key_bounds" / "key_mask");
    # a backend serves them only where it declares them
    supports_softcap: bool = False
    supports_key_bounds: bool = False
    supports_key_mask: bool = False
    # attention dropout (Problem.extra "dropout"): forward / backward take dropout_p (float)
    # and seed ((2,) int64 CPU tensor) after key_mask (window) / softcap (cross), and must
    # regenerate the same mask in the backward from the seed
    supports_dropout: bool = False
    # dropout at about the cost of the same call without it, and not slower than a dense
    # eager layer with F.dropout (measured: benchmarks/bench_window_attention.py --dropout);
    # mmcore.patch then sends full-width dropout calls to the op under auto
    dropout_full_speed: bool = False
    # lora_linear: a per-output-column scale epilogue (col_scale, DoRA's magnitude / norm)
    # and a weight passed as the transposed view of an (K, N) matrix (transformers' Conv1D)
    supports_col_scale: bool = False
    supports_weight_t: bool = False
    # attention: gradients within the tolerance rule at any logit size (|S| ~ 1e4 included:
    # P renormalised from the scores, delta = rowsum(P dP) from the same dP), measured in
    # tests/test_ops_grad_semantics.py; exact_gradients() serves only these
    exact_grads: bool = False
    available: Callable[[], Optional[str]] = lambda: None
    check: Optional[Callable[[Problem], list]] = None
    # devices where the heuristics of backend="auto" may pick it (None: all of `devices`);
    # a dispatch table may still pick it elsewhere.  The interpreted Triton path serves CPU
    # tensors only when asked for by name.
    auto_devices: Optional[frozenset] = None
    device_priority: dict = field(default_factory=dict)
    priority_fn: Optional[Callable[[Problem], Optional[int]]] = None

    @property
    def supports_backward(self) -> bool:
        return self.backward is not None

    def priority_on(self, device: str) -> int:
        return self.device_priority.get(device, self.priority)

    def priority_for(self, p: Problem) -> int:
        v = self.priority_fn(p) if self.priority_fn is not None else None
        return self.priority_on(p.device) if v is None else v

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
        for feat, ok in (("softcap", self.supports_softcap),
                         ("key_bounds", self.supports_key_bounds),
                         ("key_mask", self.supports_key_mask),
                         ("dropout", self.supports_dropout)):
            if p.extra.get(feat) and not ok:
                r.append(f"no {feat}")
        if p.extra.get("col_scale") and not self.supports_col_scale:
            r.append("no col_scale epilogue")
        if p.extra.get("weight_t") and not self.supports_weight_t:
            r.append("no transposed (Conv1D) weight")
        if p.exact and p.needs_grad and p.op in SOFTMAX_OPS and not self.exact_grads:
            r.append(f"gradients not exact at large logits ({EXACT_ENV} / "
                     "mmcore.exact_gradients() is on)")
        if self.check is not None and not r:
            r.extend(self.check(p))
        return r


_REGISTRY: dict = {op: {} for op in OPS}


class BackendError(RuntimeError):
    """No backend can serve the call (or the forced one cannot, or failed); the message
    lists why."""


def register(impl: OpImpl) -> OpImpl:
    if impl.op not in _REGISTRY:
        raise ValueError(f"unknown op {impl.op!r}")
    if impl.backend not in BACKENDS:
        raise ValueError(f"unknown backend {impl.backend!r}; add it to BACKENDS {BACKENDS}")
    _REGISTRY[impl.op][impl.backend] = impl
    clear_cache()
    return impl


def implementations(op: str) -> list:
    """The registered implementations of ``op``, by declared priority (highest first)."""
    _load_backends()
    return sorted(_REGISTRY[op].values(), key=lambda i: -i.priority)


def get(op: str, backend: str) -> OpImpl:
    _load_backends()
    return _REGISTRY[op][backend]


def requested(backend) -> str:
    if backend is None or backend == "auto":
        backend = os.environ.get("MMCORE_BACKEND", "auto") or "auto"
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    return backend


# problem key -> (impls in auto order, the "auto:a,b,c" argument); cleared when a backend
# registers, a failure is recorded or the dispatch table changes
_PLANS: dict = {}


def clear_cache() -> None:
    _PLANS.clear()


def plan(op: str, p: Problem) -> tuple:
    """The implementations ``auto`` may use for ``p``, best first (cached per problem).

    A dispatch table entry for p's bucket ranks the backends it measured (fastest first,
    whatever their auto_devices); the ones it did not measure follow in heuristic order.
    Backends that failed for p's failure key are left out.  Empty when none can serve."""
    if torch.compiler.is_compiling():  # traced: no cache writes (side effects in a graph)
        return _make_plan(op, p)
    key = p.key()
    hit = _PLANS.get(key)
    if hit is None:
        hit = _PLANS[key] = _make_plan(op, p)
        if len(_PLANS) > 4096:  # many shapes: start over rather than grow without bound
            _PLANS.clear()
            _PLANS[key] = hit
    return hit


def _make_plan(op, p):
    fkey = tables.failure_key(p)
    ok = [i for i in implementations(op)
          if not i.refuse(p) and not failures.failed(op, i.backend, fkey)]
    heuristic = sorted((i for i in ok if i.auto_devices is None or p.device in i.auto_devices),
                       key=lambda i: -i.priority_for(p))
    order = tables.lookup(op, p)
    if order:
        rank = {b: n for n, b in enumerate(order)}
        measured = sorted((i for i in ok if i.backend in rank), key=lambda i: rank[i.backend])
        heuristic = measured + [i for i in heuristic if i.backend not in rank]
    impls = tuple(heuristic)
    return impls, "auto:" + ",".join(i.backend for i in impls)


def select(op: str, p: Problem, backend: str = "auto") -> OpImpl:
    """Pick the implementation of ``op`` for problem ``p`` (the first of the auto order).

    backend: "auto" (or env MMCORE_BACKEND when the caller says "auto"), or a name from
    BACKENDS.  Raises BackendError listing every backend and its reasons."""
    backend = requested(backend)
    if backend == "auto":
        impls, _ = plan(op, p)
        if impls:
            return impls[0]
    else:
        impl = _REGISTRY[op].get(backend) if _loaded else None
        if impl is None:
            _load_backends()
            impl = _REGISTRY[op].get(backend)
        if impl is not None and not impl.refuse(p):
            return impl
    raise _refusal(op, p, backend)


def dispatch(op: str, p: Problem, backend: str = "auto") -> str:
    """The backend argument for the op's custom op: a forced name, or ``"auto:a,b,c"`` (the
    auto order, which :func:`run` walks when a backend fails).  Raises like :func:`select`."""
    backend = requested(backend)
    if backend != "auto":
        return select(op, p, backend).backend
    impls, arg = plan(op, p)
    if not impls:
        raise _refusal(op, p, backend)
    return arg


def _refusal(op, p, backend) -> BackendError:
    impls = implementations(op)
    reasons = {}
    fkey = tables.failure_key(p)
    for impl in impls:
        why = impl.refuse(p)
        if not why and failures.failed(op, impl.backend, fkey):
            why = [f"failed earlier for this problem: {failures.failed(op, impl.backend, fkey)}"]
        if not why and backend == "auto" and impl.auto_devices is not None \
                and p.device not in impl.auto_devices:
            why = [f"serves {p.device} only when asked for by name"]
        if backend != "auto" and impl.backend != backend and not why:
            why = ["(can serve; not the one asked for)"]
        reasons[impl.backend] = why
    for b in BACKENDS:
        reasons.setdefault(b, [f"no implementation of {op}"])
    lines = "\n".join(f"  {b}: {'; '.join(r)}" for b, r in reasons.items())
    asked = "any backend" if backend == "auto" else f"backend {backend!r}"
    return BackendError(
        f"{op}: {asked} cannot serve device={p.device} dtype={p.dtype} head_dim={p.head_dim}"
        f" needs_grad={p.needs_grad}:\n{lines}")


def run(op: str, backend: str, method: str, args: tuple, problem: Callable[[], Problem]):
    """Call ``get(op, name).<method>(*args)`` for the backend argument of a custom op.

    backend: a name (forced: a failure raises one BackendError with its facts) or
    ``"auto:a,b,c"``: the first of a, b, c that has not failed for this problem serves; a
    failure is logged once, remembered (failures.record) and the next one is tried.
    problem(): the call's Problem, built only when a failure needs its key.
    Out-of-memory errors are never treated as a backend failure."""
    if not backend.startswith("auto:"):
        fn = getattr(get(op, backend), method)
        if fn is None:
            raise BackendError(f"{op}: backend {backend!r} has no {method}")
        try:
            return fn(*args)
        except (torch.OutOfMemoryError, ValueError, TypeError):
            raise
        except Exception as e:
            raise BackendError(failures.describe(op, backend, method, e, forced=True)) from e
    names = backend[5:].split(",")
    fkey = None
    first = None
    for name in names:
        if failures.any_recorded():
            fkey = fkey or tables.failure_key(problem())
            if failures.failed(op, name, fkey):
                continue
        fn = getattr(get(op, name), method)
        if fn is None:
            continue
        try:
            return fn(*args)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:
            fkey = fkey or tables.failure_key(problem())
            failures.record(op, name, method, fkey, e)
            clear_cache()
            first = first or e
    if first is None:
        raise BackendError(f"{op}: every backend of {names} failed earlier for this problem")
    raise first


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
    tables.preload()
    clear_cache()


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
                "exact_grads": impl.exact_grads,
                # heuristic rank per device where auto may pick it without a table
                "priority": {d: impl.priority_on(d) for d in sorted(impl.devices)
                             if impl.auto_devices is None or d in impl.auto_devices},
                # a per-problem override (its docstring's first line says where)
                "priority_fn": ((impl.priority_fn.__doc__ or impl.priority_fn.__name__)
                                .strip().splitlines()[0] if impl.priority_fn else None),
            }
            rows.append((impl.backend, impl.available(), lim))
        out[op] = rows
    return out
