"""Measured dispatch tables: which backend is fastest for a problem, per device.

`mmcore bench --tune` (benchmarks/tune.py) times every backend that can serve each point of
a grid of problems and writes one JSON file per device and stack into mmcore/ops/dispatch_tables/,
named ``<cuda|cpu>-<device name>-torch<X.Y>-triton<X.Y>.json``.  A table is used when its
device name, torch and Triton versions (major.minor) equal this process's; then
``backend="auto"`` ranks the backends of the nearest measured point of the same kind (same
dtype, head dim, flags; every size within 4x) by their measured time.  Elsewhere the
backends' declared priorities decide (mmcore/ops/registry.py).

Env ``MMCORE_DISPATCH_TABLE``: a path (use that table whatever it was measured on) or
``off`` (heuristics only).

A problem is bucketed as (kind, sizes): kind is a string of its categorical features, sizes
the lengths that move the cost (window_attention: Sq, Sk, window span; cross_attention: Sq,
Sk; lora_linear: M, K, N, r).  The failure key of mmcore/ops/failures.py is the kind alone.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
import warnings

TABLE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dispatch_tables")
FORMAT = 1
MAX_OCTAVES = 2.0  # a measured point serves problems within 4x of it in every size

_OVERRIDE = [None]  # set by use(): a path, "off", or None (env / package tables)
_LOADED: dict = {}  # device type -> (table dict or None, description)
_WARNED: set = set()  # MMCORE_DISPATCH_TABLE paths already reported unusable


# ------------------------------------------------------------------ problem -> bucket

def _dt(dtype) -> str:
    return str(dtype).replace("torch.", "")


def kind(p) -> str:
    """The categorical features of a problem (everything but sizes), as one string."""
    parts = [_dt(p.dtype), f"D{p.head_dim}", "gqa" if p.gqa else "mha",
             "bwd" if p.needs_grad else "fwd", "varlen" if p.seqlens else "full"]
    if p.op == "window_attention":
        parts += ["dense" if all(window_unbounded(p)) else "band",
                  "causal" if p.extra.get("causal") else "bidir",
                  "global" if p.global_tokens else "noglobal"]
    elif p.op == "lora_linear":
        parts = [_dt(p.dtype), "bwd" if p.needs_grad else "fwd",
                 f"adapters{min(p.adapters, 2)}"]
    return "|".join(parts)


def window_unbounded(p) -> tuple:
    """(left, right) of a window_attention problem reach every key of every row."""
    left, right = p.extra.get("window", (-1, -1))
    return reaches_all(p.extra.get("Sq", 0), p.extra.get("Sk", 0), left, right)


def reaches_all(Sq, Sk, left, right) -> tuple:
    """left >= Sk - 1 (p <= Lk - 1) and right >= Sq - 1 (p >= Lk - Lq >= -(Sq - 1)) reach
    every key of every row; -1 is unbounded."""
    return left < 0 or left >= Sk - 1, right < 0 or right >= Sq - 1


def sizes(p) -> tuple:
    x = p.extra
    if p.op == "window_attention":
        left, right = x.get("window", (-1, -1))
        Sk = x.get("Sk", 1)
        span = Sk if any(window_unbounded(p)) else min(Sk, left + right + 1)
        return (x.get("Sq", 1), Sk, max(1, span))
    if p.op == "cross_attention":
        return (x.get("Sq", 1), x.get("Sk", 1))
    return (x.get("M", 1), p.head_dim, x.get("N", 1), p.rank)


def failure_key(p) -> tuple:
    """What a kernel failure is remembered under: op, device and kind, without needs_grad
    and sizes (compiles are specialised on dtype, head dim and flags, not on lengths)."""
    return (p.op, p.device, kind(p).replace("|bwd", "").replace("|fwd", ""))


# ------------------------------------------------------------------ device identity

def device_name(device_type: str) -> str:
    if device_type == "cuda":
        import torch

        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _major_minor(v: str | None) -> str | None:
    if not v:
        return None
    m = re.match(r"(\d+)\.(\d+)", v)
    return f"{m.group(1)}.{m.group(2)}" if m else v


def stack() -> dict:
    """{"torch": version, "triton": version or None} of this process."""
    import torch

    try:
        import triton

        tv = triton.__version__
    except Exception:
        tv = None
    return {"torch": torch.__version__, "triton": tv}


def device_key(device_type: str) -> str:
    """The table's file stem for this device and stack."""
    s = stack()
    slug = re.sub(r"[^a-z0-9]+", "-", device_name(device_type).lower()).strip("-")
    return (f"{device_type}-{slug}-torch{_major_minor(s['torch'])}"
            f"-triton{_major_minor(s['triton']) or 'none'}")


def matches(table: dict, device_type: str) -> str | None:
    """None when ``table`` was measured on this device and stack, else why not."""
    s = stack()
    want = {"device_type": device_type, "device": device_name(device_type),
            "torch": _major_minor(s["torch"]), "triton": _major_minor(s["triton"])}
    got = {"device_type": table.get("device_type"), "device": table.get("device"),
           "torch": _major_minor(table.get("torch")), "triton": _major_minor(table.get("triton"))}
    diff = [f"{k} {got[k]!r} != {want[k]!r}" for k in want if got[k] != want[k]]
    return "; ".join(diff) or None


# ------------------------------------------------------------------ loading and lookup

def use(path: str | None) -> None:
    """Use the table at ``path`` (any device), ``"off"`` (none), or None (env / package)."""
    _OVERRIDE[0] = path
    _reset()


def _reset():
    _LOADED.clear()
    preload()
    reg = sys.modules.get("mmcore.ops.registry")
    if reg is not None:
        reg.clear_cache()


def _source():
    return _OVERRIDE[0] if _OVERRIDE[0] is not None else os.environ.get("MMCORE_DISPATCH_TABLE")


def _load(device_type: str):
    src = _source()
    if src == "off":
        return None, "off (MMCORE_DISPATCH_TABLE=off): heuristics"
    if src:
        try:
            return _read(src), f"{src} (forced)"
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            why = f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e)
            msg = (f"MMCORE_DISPATCH_TABLE={src!r} is unusable ({why}); ignoring it and using "
                   f"the heuristics")
            if src not in _WARNED:  # reported once per path, never fatal
                _WARNED.add(src)
                warnings.warn(msg, RuntimeWarning, stacklevel=2)
            return None, f"none: {msg}"
    try:
        key = device_key(device_type)
    except Exception as e:  # no CUDA context etc.
        return None, f"none (device unknown: {type(e).__name__}): heuristics"
    path = os.path.join(TABLE_DIR, key + ".json")
    if not os.path.exists(path):
        return None, f"none for {key}: heuristics"
    try:
        table = _read(path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return None, f"{path} unreadable ({type(e).__name__}: {e}): heuristics"
    why = matches(table, device_type)
    if why:
        return None, f"{path} does not match ({why}): heuristics"
    return table, path


def _read(path: str) -> dict:
    """The table at ``path`` with its lookup index; ValueError naming the file when it is not
    a dispatch table (bad JSON, wrong format, malformed entries)."""
    with open(path) as f:
        try:
            table = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"dispatch table {path}: not valid JSON ({e})") from None
    if not isinstance(table, dict):
        raise ValueError(f"dispatch table {path}: must hold a JSON object")
    if table.get("format") != FORMAT:
        raise ValueError(f"dispatch table {path}: format {table.get('format')!r}, "
                         f"expected {FORMAT}")
    index = {}
    ops = table.get("ops", {})
    if not isinstance(ops, dict):
        raise ValueError(f"dispatch table {path}: 'ops' must be an object")
    for op, entries in ops.items():
        for e in entries if isinstance(entries, list) else [None]:
            try:
                sizes_ = [math.log2(max(1, float(s))) for s in e["sizes"]]
                order = [str(b) for b in e["order"]]
                index.setdefault((op, str(e["kind"])), []).append((sizes_, order))
            except (TypeError, KeyError, ValueError):
                raise ValueError(f"dispatch table {path}: malformed entry of {op!r}: "
                                 f"{e!r:.80}") from None
    table["_index"] = index
    return table


def table_for(device_type: str):
    """(table or None, description) for this device type (loaded once; never while
    torch.compile traces: preload() runs when the backends load)."""
    hit = _LOADED.get(device_type)
    if hit is None:
        import torch

        if torch.compiler.is_compiling():
            return None, "not loaded"
        hit = _LOADED[device_type] = _load(device_type)
    return hit


def preload() -> None:
    """Load the tables of the devices in use, outside any torch.compile trace: the CPU's, and
    CUDA's once CUDA is initialised (naming the GPU initialises CUDA, which importing mmcore
    must not do; otherwise the first eager CUDA call loads it, and a graph traced before any
    eager CUDA call uses the heuristics)."""
    import torch

    table_for("cpu")
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        table_for("cuda")


def lookup(op: str, p) -> list | None:
    """Backends fastest first at the measured point nearest to ``p``, or None."""
    table, _ = table_for(p.device)
    if table is None:
        return None
    cands = table["_index"].get((op, kind(p)))
    if not cands:
        return None
    want = [math.log2(max(1, s)) for s in sizes(p)]
    best, dist = None, None
    for logs, order in cands:
        d = max(abs(a - b) for a, b in zip(logs, want))
        if d <= MAX_OCTAVES and (dist is None or d < dist):
            best, dist = order, d
    return best


def describe(device_type: str) -> str:
    """What `mmcore info` prints: the table in use for a device type, or why none."""
    table, desc = table_for(device_type)
    if table is None:
        return desc
    n = sum(len(v) for v in table.get("ops", {}).values())
    return (f"{desc} ({n} points; {table.get('device')}, torch {table.get('torch')}, "
            f"triton {table.get('triton')}, measured {table.get('created', '?')})")


def write(path: str, device_type: str, entries: dict, grid: str) -> str:
    """Write a table: entries {op: [{"kind", "sizes", "order", "ms"}]}."""
    import time

    s = stack()
    table = {"format": FORMAT, "device_type": device_type, "device": device_name(device_type),
             "torch": s["torch"], "triton": s["triton"],
             "created": time.strftime("%Y-%m-%d %H:%M:%S"), "grid": grid, "ops": entries}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")
    _reset()
    return path
