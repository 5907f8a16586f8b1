"""Attention dropout of the `torch` backend: a counter-based mask, regenerated, never stored.

Element (b, h, i, j) of the attention weights (batch b, query head h, query row i, key column
j: indices into the tensors the op was called with) is kept iff

    u(seed, b, h, i, j) >= round(p · 2**32)

where u is a 32-bit hash (an xorshift-multiply mixer from Chris Wellons' hash prospector,
multipliers 0x2c1b3c6d / 0x297a2d39, applied per level: seed, then (b, h), then the row, then
the column).  The mask is a pure function of its indices, so the
forward and the backward (which chunk the rows the same way or not) see the same mask without
saving it, on any device.  Kept weights are scaled by 1 / (1 − p) (as torch.nn.functional.dropout).

The seed is two 31-bit ints drawn from torch's default CPU generator when the op is called
(:func:`draw_seed`), so ``torch.manual_seed(s)`` before a call makes its mask reproducible.
All arithmetic is in int64 without overflow (a 32-bit value times a multiplier < 2**31).
"""
from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF


def draw_seed() -> torch.Tensor:
    """(2,) int64 CPU tensor from torch's default generator (what the ops draw per call)."""
    return torch.randint(0, 2 ** 31, (2,), dtype=torch.int64)


def _mix(x):
    """A 32-bit -> 32-bit bijective mixer (tensor or Python int in [0, 2**32)); each product
    is < 2**63, so int64 never overflows."""
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _M32
    x = x ^ (x >> 12)
    x = (x * 0x297A2D39) & _M32
    return x ^ (x >> 15)


def threshold(p: float) -> int:
    """u < threshold(p) is dropped: P(drop) = threshold / 2**32 (p rounded to 2**-32)."""
    return int(round(p * 2 ** 32))


def seed_base(seed) -> int:
    """The seed level of the hash, a uint32 Python int, from seed (2,) int64 (or a pair of
    ints): mix(mix(s1) ^ s0 ^ 0x9E3779B9) on their low 32 bits (the Triton launcher passes it
    to the kernels; csrc/cpu/common.h computes the same in C++)."""
    s0, s1 = (int(x) for x in (seed.tolist() if isinstance(seed, torch.Tensor) else seed))
    return _mix((_mix(s1 & _M32) ^ (s0 & _M32) ^ 0x9E3779B9) & _M32)


def keep(seed, b, heads, rows, cols, p: float):
    """bool (H, R, N): element (b, heads[h], rows[r], cols[n]) kept; or (B, H, R, N) when b
    is an int64 tensor (B,) of samples.

    seed: (2,) int64 tensor (or a pair of ints); heads / rows / cols: int64 tensors (H,), (R,),
    (N,) on the device the mask is wanted on."""
    base = seed_base(seed)
    bs = b[:, None] if isinstance(b, torch.Tensor) else b
    kh = _mix((heads + bs * 65599) & _M32 ^ base)  # (H,) or (B, H)
    kr = _mix(kh[..., None] ^ _mix((rows + 0x632BE5AB) & _M32))  # (.., H, R)
    kc = _mix((cols * 0x3C6EF372 + 0x5BD1E995) & _M32)  # (N,)
    u = _mix(kr[..., None] ^ kc)  # (.., H, R, N)
    return u >= threshold(p)


def mask(seed, B: int, H: int, Sq: int, Sk: int, p: float, device="cpu"):
    """The whole keep mask (B, H, Sq, Sk) bool of a call (tests, and the batched path)."""
    ar = lambda n: torch.arange(n, dtype=torch.int64, device=device)  # noqa: E731
    return keep(seed, ar(B), ar(H), ar(Sq), ar(Sk), p)


def scale_block(seed, b: int, Hq: int, i0: int, i1: int, kidx, p: float, dtype):
    """(Hq, C, nk) in `dtype`: 1 / (1 − p) where kept, 0 where dropped, for query rows
    [i0, i1) of sample b and keys kidx (nk,) int64."""
    dev = kidx.device
    k = keep(seed, b, torch.arange(Hq, dtype=torch.int64, device=dev),
             torch.arange(i0, i1, dtype=torch.int64, device=dev), kidx.to(torch.int64), p)
    return k.to(dtype) * (1.0 / (1.0 - p))
