"""Random attention cases grouped by compile family, for the compiled (`-m gpu`) suite.

A Triton kernel compiles once per family: dtype, head dim (its block and its divisibility by
16), causal or not, which per-sample lengths are given, GQA or not (a group of 1 is
specialised), and for cross_attention the key tile (one tile holding all keys, or a loop).  Everything else -- batch, heads and GQA groups,
lengths and their values, window sizes, global tokens, strides -- is a runtime value.  Drawing
random cases inside a few fixed families keeps the suite's compiles to a few per family (the
GPU suite must finish in minutes) while still covering the matrix of docs/design.md: bf16 / fp16 /
fp32, D from 40 to 256, varlen, GQA, global tokens, Sq != Sk both ways.

Each case is a dict in the format of kit.attention_cases."""
from __future__ import annotations

import random

import torch

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

# window_attention: (name, dtype, D, causal, lengths given: None | "k" | "qk", GQA group)
WINDOW_FAMILIES = [
    ("bf16-d128-causal-varlen-gqa", BF16, 128, True, "qk", 4),
    ("fp16-d64-bidir", F16, 64, False, None, 1),
    ("fp32-d40-bidir-klen-gqa", F32, 40, False, "k", 2),
    ("bf16-d256-causal", BF16, 256, True, None, 1),
    ("fp16-d80-bidir-varlen-gqa", F16, 80, False, "qk", 3),
    ("fp32-d128-causal", F32, 128, True, None, 1),
]

# cross_attention: (name, dtype, D, key count range, lengths given, GQA group); the key range
# keeps the key tile fixed: <= 64 keys fit one tile at D <= 128 (16-bit), longer ones loop
CROSS_FAMILIES = [
    ("bf16-d128-loop-varlen", BF16, 128, (197, 1025), "qk", 1),
    ("fp16-d40-loop-klen-gqa", F16, 40, (257, 700), "k", 2),
    ("fp32-d40-loop-klen", F32, 40, (197, 600), "k", 1),
    ("bf16-d64-onetile-gqa", BF16, 64, (33, 64), None, 3),
    ("fp16-d256-loop-varlen", F16, 256, (49, 300), "qk", 1),
]


def _lengths(rng, B, S, min_len=0):
    return torch.tensor([S] + [rng.randint(min_len, S) for _ in range(B - 1)])


def _batch_heads(rng, group):
    """Random batch size and kv heads; query heads = kv heads x the family's GQA group."""
    B, Hkv = rng.choice([1, 2, 3]), rng.choice([1, 2])
    return B, Hkv * group, Hkv


def window_cases(family, n, seed, max_s=1500):
    name, dtype, D, causal, lens, group = family
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        B, Hq, Hkv = _batch_heads(rng, group)
        # Sq <= 16 takes the decode kernels: a family of its own (the decode tests)
        Sq = rng.choice([17, 63, 129, rng.randint(17, max_s), max_s])
        Sk = Sq if lens == "qk" else rng.choice([Sq, rng.randint(1, max_s)])
        c = dict(B=B, Hq=Hq, Hkv=Hkv, Sq=Sq, Sk=Sk, D=D, dtype=dtype, causal=causal,
                 window=(rng.choice([0, 16, 127, rng.randint(0, Sk), -1]),
                         0 if causal else rng.choice([0, 3, 64, rng.randint(0, Sk), -1])),
                 G=rng.choice([0, 0, 1, 4, rng.randint(0, 64)]), noncontig=rng.random() < 0.3,
                 scale=None, seqlens_q=None, seqlens_k=None)
        if lens == "qk":
            L = _lengths(rng, B, Sq)
            c["seqlens_q"], c["seqlens_k"] = L, L.clone()
        elif lens == "k":
            c["seqlens_k"] = _lengths(rng, B, c["Sk"])
        out.append(c)
    return out


def cross_cases(family, n, seed, max_sq=1200):
    name, dtype, D, (k_lo, k_hi), lens, group = family
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        B, Hq, Hkv = _batch_heads(rng, group)
        Sq = rng.choice([1, 17, 129, rng.randint(1, max_sq)])
        Sk = rng.randint(k_lo, k_hi)
        c = dict(B=B, Hq=Hq, Hkv=Hkv, Sq=Sq, Sk=Sk, D=D, dtype=dtype, causal=False,
                 window=None, G=0, noncontig=rng.random() < 0.3, scale=None,
                 seqlens_q=None, seqlens_k=None)
        if lens in ("k", "qk"):
            c["seqlens_k"] = _lengths(rng, B, Sk)
        if lens == "qk":
            c["seqlens_q"] = _lengths(rng, B, Sq)
        out.append(c)
    return out
