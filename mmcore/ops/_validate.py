"""Input validation shared by the ops: every error names the argument at fault."""
from __future__ import annotations

import math
import numbers
import operator
import os

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT64_MAX = 2 ** 63 - 1  # window sides, lengths and offsets reach the kernels as C int64


def tensor(name, t, ndim=None, ndims=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if ndims is not None and t.dim() not in ndims:
        raise ValueError(f"{name} must have {' or '.join(map(str, ndims))} dims, "
                         f"got shape {tuple(t.shape)}")
    return t


def float_dtype(name, t):
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def same_dtype(ref_name, ref, **others):
    for n, t in others.items():
        if t is not None and t.dtype != ref.dtype:
            raise TypeError(f"{n} has dtype {t.dtype} but {ref_name} has {ref.dtype}; "
                            f"they must agree")


def same_device(ref_name, ref, **others):
    for n, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{n} is on {t.device} but {ref_name} is on {ref.device}; "
                             f"they must be on the same device")


def seqlens(name, s, B, ref):
    """seqlens must be an integer tensor of shape (B,) on ref's device; returns it as a
    contiguous int64 tensor (kernels index it as a plain array: a strided view would be
    read wrong)."""
    if s is None:
        return None
    tensor(name, s, ndim=1)
    if s.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be an int32/int64 tensor, got {s.dtype}")
    if s.shape[0] != B:
        raise ValueError(f"{name} must have shape ({B},) (the batch), got {tuple(s.shape)}")
    same_device("q", ref, **{name: s})
    return s.to(torch.int64).contiguous()


def integer(name, v, lo=None):
    """A Python (or numpy) integer, not bool, in [lo, 2**63 - 1] -> int."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    v = operator.index(v)
    if lo is not None and v < lo:
        raise ValueError(f"{name} must be >= {lo}, got {v}")
    if v > INT64_MAX:
        raise ValueError(f"{name} must be < 2**63 (a 64-bit int), got {v}")
    return v


def window_side(name, w, reach):
    """One side of a window: an int >= -1 (-1 or None = unbounded) -> int >= -1.

    A side of `reach` or more already covers every key (reach = Sk for the left side,
    Sq for the right side, see window_attention), so it is clamped to -1: exactly the same
    mask on every backend, and no kernel ever sees a side it cannot represent."""
    if w is None:
        return -1
    w = integer(name, w, lo=-1)
    return -1 if w >= max(reach, 1) else w


def scale(s, D):
    """The softmax scale: None (1/sqrt(D)), a finite real number, or a one-element real
    tensor -> float."""
    if s is None:
        return 1.0 / math.sqrt(D)
    if isinstance(s, torch.Tensor):
        if s.numel() != 1 or s.is_complex() or s.dtype == torch.bool:
            raise TypeError(f"scale must be a real number or a one-element real tensor, got a "
                            f"{s.dtype} tensor of shape {tuple(s.shape)}")
        if s.device.type == "meta":
            raise ValueError("scale is a tensor on the meta device; it needs a value")
        s = s.item()
    elif isinstance(s, bool) or not isinstance(s, numbers.Real):
        raise TypeError(f"scale must be a real number (float), got {type(s).__name__} {s!r}")
    s = float(s)
    if not math.isfinite(s):
        raise ValueError(f"scale must be finite, got {s}")
    return s


def checks_enabled() -> bool:
    """Data-dependent checks (value ranges) cost a device sync; MMCORE_CHECK=0 turns them off."""
    return os.environ.get("MMCORE_CHECK", "1") != "0"


def seqlens_values(name, s, S):
    """0 <= s[b] <= S (eager only; called inside the custom op, where tensors are real)."""
    if s is None or not checks_enabled() or s.numel() == 0:
        return
    lo, hi = int(s.min()), int(s.max())
    if lo < 0 or hi > S:
        raise ValueError(f"{name} values must lie in [0, {S}], got min {lo} max {hi}")


def last_dim_contiguous(t):
    if t.stride(-1) == 1 or t.shape[-1] <= 1:
        return t
    # an empty tensor is already "contiguous" and keeps its strides through .contiguous()
    return t.new_empty(t.shape) if t.numel() == 0 else t.contiguous()


def attention_qkv(q, k, v):
    """q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D), same dtype/device, Hq % Hkv == 0."""
    tensor("q", q, ndim=4)
    tensor("k", k, ndim=4)
    tensor("v", v, ndim=4)
    float_dtype("q", q)
    same_dtype("q", q, k=k, v=v)
    same_device("q", q, k=k, v=v)
    B, Hq, Sq, D = q.shape
    if D == 0:
        raise ValueError(f"q, k, v: head dim D must be >= 1, got shape {tuple(q.shape)}")
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"batch of k {tuple(k.shape)} / v {tuple(v.shape)} must equal q's ({B})")
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if k.shape[-1] != D:
        raise ValueError(f"head dim of k ({k.shape[-1]}) must equal q's ({D})")
    Hkv = k.shape[1]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"Hq % Hkv must be 0 (q heads {Hq}, k/v heads {Hkv})")


def softcap(c):
    """Logit soft-capping: None (off) or a finite real > 0 -> float (0.0 = off)."""
    if c is None:
        return 0.0
    if isinstance(c, bool) or not isinstance(c, numbers.Real):
        raise TypeError(f"softcap must be None or a real number > 0, got {type(c).__name__} "
                        f"{c!r}")
    c = float(c)
    if not (math.isfinite(c) and c > 0):
        raise ValueError(f"softcap must be None or a finite number > 0, got {c}")
    return c


def dropout_p(p):
    """Attention dropout probability: a real number in [0, 1) -> float (0.0 = off)."""
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"dropout_p must be a real number in [0, 1), got {type(p).__name__} "
                        f"{p!r}")
    p = float(p)
    if not (0.0 <= p < 1.0):  # NaN fails this too
        raise ValueError(f"dropout_p must be in [0, 1), got {p}")
    return p


def key_bounds(kb, B, Sq, ref):
    """key_bounds: None or a pair (lo, hi) of integer tensors (B, Sq) on ref's device ->
    (lo, hi) contiguous int32 (values clamped to [-1, 2**31 - 1]: a bound past the keys
    means the same as one at Sk), or (None, None)."""
    if kb is None:
        return None, None
    if not isinstance(kb, (tuple, list)) or len(kb) != 2:
        raise TypeError(f"key_bounds must be None or a pair (lo, hi) of tensors, got "
                        f"{type(kb).__name__}")
    out = []
    for name, t in zip(("key_bounds[0] (lo)", "key_bounds[1] (hi)"), kb):
        tensor(name, t, ndim=2)
        if t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be an int32/int64 tensor, got {t.dtype}")
        if tuple(t.shape) != (B, Sq):
            raise ValueError(f"{name} must have shape ({B}, {Sq}) (batch, queries), got "
                             f"{tuple(t.shape)}")
        same_device("q", ref, **{name: t})
        if t.dtype == torch.int64:
            t = t.clamp(-1, 2 ** 31 - 1)
        out.append(t.to(torch.int32).contiguous())
    return out[0], out[1]


def key_mask(m, B, Sk, ref):
    """key_mask: None or a bool tensor (B, Sk) on ref's device -> contiguous bool."""
    if m is None:
        return None
    tensor("key_mask", m, ndim=2)
    if m.dtype != torch.bool:
        raise TypeError(f"key_mask must be a bool tensor (True = key visible), got {m.dtype}")
    if tuple(m.shape) != (B, Sk):
        raise ValueError(f"key_mask must have shape ({B}, {Sk}) (batch, keys), got "
                         f"{tuple(m.shape)}")
    same_device("q", ref, key_mask=m)
    return m.contiguous()
