"""Input validation shared by the ops: every error names the argument at fault."""
from __future__ import annotations

import os

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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
    """seqlens must be an integer tensor of shape (B,) on ref's device; returns int64."""
    if s is None:
        return None
    tensor(name, s, ndim=1)
    if s.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be an int32/int64 tensor, got {s.dtype}")
    if s.shape[0] != B:
        raise ValueError(f"{name} must have shape ({B},) (the batch), got {tuple(s.shape)}")
    same_device("q", ref, **{name: s})
    return s.long()


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
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def attention_qkv(q, k, v):
    """q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D), same dtype/device, Hq % Hkv == 0."""
    tensor("q", q, ndim=4)
    tensor("k", k, ndim=4)
    tensor("v", v, ndim=4)
    float_dtype("q", q)
    same_dtype("q", q, k=k, v=v)
    same_device("q", q, k=k, v=v)
    B, Hq, Sq, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"batch of k {tuple(k.shape)} / v {tuple(v.shape)} must equal q's ({B})")
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if k.shape[-1] != D:
        raise ValueError(f"head dim of k ({k.shape[-1]}) must equal q's ({D})")
    Hkv = k.shape[1]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"Hq % Hkv must be 0 (q heads {Hq}, k/v heads {Hkv})")
