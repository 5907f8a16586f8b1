"""mmcore.RollingKVCache: chunked prefill + token-by-token decode equals one full
window_attention call (tolerance rule vs the float64 oracle), with constant memory."""
import random

import pytest
import torch

import mmcore
from kit import assert_close, base_attention, oracle_attention, window_mask
from mmcore.ops.backends import _loaders

BACKENDS = ["torch"] + (["cpu"] if _loaders.cpp_error("window_attention_fwd") is None else [])


def _run_cache(cache, layer, q, k, v, chunks, backend):
    outs, p = [], 0
    for T in chunks:
        outs.append(cache.attend(layer, q[:, :, p:p + T], k[:, :, p:p + T], v[:, :, p:p + T],
                                 backend=backend))
        p += T
    return torch.cat(outs, 2)


def _chunks(rng, N, prefill, max_chunk):
    """Random prefill chunk sizes summing to `prefill`, then ones up to N."""
    out, p = [], 0
    while p < prefill:
        T = min(prefill - p, rng.randint(1, max_chunk))
        out.append(T)
        p += T
    return out + [1] * (N - prefill)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("G,left,Hq,Hkv,dtype", [
    (0, 7, 2, 2, torch.float32),
    (3, 7, 4, 2, torch.float32),   # GQA + attention sinks
    (5, 0, 3, 1, torch.float32),   # MQA, window of one token + sinks
    (2, 16, 2, 1, torch.bfloat16),
    (20, 4, 2, 2, torch.float32),  # prefix longer than the window
])
def test_prefill_then_decode_equals_full(backend, G, left, Hq, Hkv, dtype):
    rng = random.Random(G * 100 + left)
    B, N, D = 2, 90, 16
    g = torch.Generator().manual_seed(rng.randint(0, 10**6))
    q = torch.randn(B, Hq, N, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, N, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, N, D, generator=g).to(dtype)
    chunks = _chunks(rng, N, prefill=60, max_chunk=3 * left + 5)  # chunks may exceed the window
    cache = mmcore.RollingKVCache(2, B, Hkv, D, window_left=left, global_tokens=G, dtype=dtype)
    out = _run_cache(cache, 1, q, k, v, chunks, backend)
    full = mmcore.window_attention(q, k, v, window=(left, 0), causal=True, global_tokens=G,
                                   backend=backend)
    mask = window_mask(B, N, N, left, 0, True, G)
    scale = D ** -0.5
    ref, base = oracle_attention(q, k, v, mask, scale)[0], base_attention(q, k, v, mask,
                                                                           scale)[0]
    assert_close("cache out", out, ref, base)
    assert_close("full out", full, ref, base)
    assert cache.length(1) == N and cache.length(0) == 0


def test_memory_does_not_grow():
    B, Hkv, D, left, G = 1, 2, 8, 5, 2
    cache = mmcore.RollingKVCache(1, B, Hkv, D, window_left=left, global_tokens=G)
    n0 = cache.nbytes()
    assert n0 == 2 * 4 * B * Hkv * D * (G + left + 1)
    for T in [7, 1, 30, 1, 1, 100] + [1] * 50:
        q = torch.randn(B, 4, T, D)
        kv = torch.randn(B, Hkv, T, D)
        cache.attend(0, q, kv, kv, backend="torch")
        assert cache.nbytes() == n0
    assert cache.length() == 190


def test_reset_and_independent_layers():
    B, H, D = 1, 1, 8
    cache = mmcore.RollingKVCache(2, B, H, D, window_left=3, global_tokens=1)
    x = torch.randn(B, H, 10, D)
    a = cache.attend(0, x, x, x, backend="torch")
    cache.reset()
    b = cache.attend(0, x, x, x, backend="torch")
    torch.testing.assert_close(a, b)
    c = cache.attend(1, x, x, x, backend="torch")
    torch.testing.assert_close(a, c)


def test_bad_inputs():
    with pytest.raises(ValueError, match="window_left"):
        mmcore.RollingKVCache(1, 1, 1, 8, window_left=-1)
    cache = mmcore.RollingKVCache(1, 2, 2, 8, window_left=3)
    good = torch.randn(2, 2, 1, 8)
    with pytest.raises(ValueError, match="k_new"):
        cache.update(0, torch.randn(2, 3, 1, 8), good)
    with pytest.raises(TypeError, match="v_new"):
        cache.update(0, good, good.double())
    with pytest.raises(ValueError, match="layer"):
        cache.update(1, good, good)
    with pytest.raises(ValueError, match="q"):
        cache.attend(0, torch.randn(2, 2, 3, 8), good, good)
