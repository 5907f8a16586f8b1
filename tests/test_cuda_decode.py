"""window_attention's `cuda` backend: csrc/cuda/window_decode.cu, and RollingKVCache read in place.

Without a GPU, mmcore_C::window_decode on CPU tensors runs the kernel's CPU emulation
(csrc/cuda/emulation.cpp): the same index math (window_decode_plan.h), row tiles, key tiles,
splits, combine and roundings, checked against the float64 oracle with the DESIGN.md rule.
That covers which keys each block reads, where key j lives in the rolling layout, and how the
splits merge -- not the MMA fragments, cp.async or shared memory (`-m gpu` does)."""
import random

import pytest
import torch

import mmcore
from kit import (assert_close, base_attention, case_mask, case_scale, make_attention_inputs,
                 oracle_attention, window_mask)
from mmcore.nn import kv_cache as kv_cache_mod
from mmcore.ops.backends import _loaders

BF16, F16 = torch.bfloat16, torch.float16

pytestmark = pytest.mark.skipif(_loaders.ext_error() is not None, reason="mmcore._C not built")


def case(B=1, Hq=4, Hkv=2, Sq=1, Sk=100, D=64, dtype=BF16, window=None, causal=False, G=0,
         seqlens_q=None, seqlens_k=None, noncontig=False, scale=None):
    return dict(B=B, Hq=Hq, Hkv=Hkv, Sq=Sq, Sk=Sk, D=D, dtype=dtype, window=window,
                causal=causal, G=G, seqlens_q=seqlens_q, seqlens_k=seqlens_k,
                noncontig=noncontig, scale=scale)


def run_decode(c, device="cpu", num_splits=0, seed=0):
    """mmcore_C::window_decode (plain layout) vs the float64 oracle and the dtype base."""
    q, k, v, _ = make_attention_inputs(c, device, requires_grad=False, seed=seed)
    left, right = c["window"] if c["window"] is not None else (-1, -1)
    sq = None if c["seqlens_q"] is None else c["seqlens_q"].to(device)
    sk = None if c["seqlens_k"] is None else c["seqlens_k"].to(device)
    out, lse = torch.ops.mmcore_C.window_decode(q, k, v, None, None, None, None, sq, sk, 0,
                                                left, right, c["causal"], c["G"], case_scale(c),
                                                num_splits)
    mask, scale = case_mask(c), case_scale(c)
    ref, base = oracle_attention(q, k, v, mask, scale), base_attention(q, k, v, mask, scale)
    assert_close("out", out, ref[0], base[0])
    assert_close("lse", lse, ref[1], base[1])
    return out, lse


def random_case(rng):
    B, Hkv = rng.choice([1, 2, 3]), rng.choice([1, 2])
    g = rng.choice([1, 2, 4, 5, 8, 16, 32])
    Sq = rng.choice([1, 1, 2, 3, 7, 16])
    Sk = rng.choice([1, Sq, rng.randint(1, 300), rng.randint(200, 700)])
    c = case(B=B, Hq=Hkv * g, Hkv=Hkv, Sq=Sq, Sk=Sk, D=rng.choice([8, 16, 40, 64, 72, 80, 96,
                                                                    128, 256]),
             dtype=rng.choice([BF16, F16]), noncontig=rng.random() < 0.3,
             window=(rng.choice([-1, 0, 1, 31, rng.randint(0, Sk)]),
                     rng.choice([-1, 0, 3, rng.randint(0, Sk)])),
             causal=rng.random() < 0.5, G=rng.randint(0, min(Sk, 6)) if rng.random() < 0.5 else 0,
             scale=rng.uniform(0.05, 0.5) if rng.random() < 0.2 else None)
    if rng.random() < 0.5:
        c["seqlens_k"] = torch.tensor([rng.randint(0, Sk) for _ in range(B)])
        if rng.random() < 0.4:
            c["seqlens_q"] = torch.tensor([rng.randint(0, Sq) for _ in range(B)])
    return c


# ------------------------------------------------------------------ CPU emulation, plain layout


@pytest.mark.parametrize("i", range(40))
def test_emulation_random(i):
    rng = random.Random(5100 + i)
    run_decode(random_case(rng), num_splits=rng.choice([0, 1, 3, 7]), seed=i)


@pytest.mark.parametrize("splits", [1, 2, 5, 64])
def test_emulation_splits_combine(splits):
    """Splits past the key count (empty splits, lse -inf) merge to the same answer."""
    c = case(B=2, Hq=8, Hkv=2, Sq=1, Sk=700, D=128, window=(400, 0), causal=True, G=3,
             seqlens_k=torch.tensor([700, 9]))
    run_decode(c, num_splits=splits)


def test_emulation_gqa_rows_span_tiles():
    """g * Sq = 5 * 7 = 35 rows: three row tiles per kv head, queries cut across tiles."""
    c = case(B=2, Hq=10, Hkv=2, Sq=7, Sk=333, D=80, dtype=F16, window=(50, 2), G=2,
             seqlens_q=torch.tensor([7, 4]), seqlens_k=torch.tensor([333, 120]))
    run_decode(c, num_splits=3)


def test_emulation_empty_rows_and_samples():
    """Lk = 0 samples and rows past Lq give 0 and lse -inf (never NaN from the poison)."""
    c = case(B=3, Hq=4, Hkv=1, Sq=4, Sk=64, D=64, window=(8, 0), causal=True,
             seqlens_q=torch.tensor([4, 2, 0]), seqlens_k=torch.tensor([0, 64, 30]))
    out, lse = run_decode(c, num_splits=2)
    assert (out[0] == 0).all() and torch.isinf(lse[0]).all()
    assert (out[1, :, 2:] == 0).all() and torch.isinf(lse[2]).all()


def test_emulation_global_query_sees_all():
    """Sq > Sk: queries with p < G are global and see every key; the rest see none."""
    c = case(B=1, Hq=2, Hkv=1, Sq=9, Sk=5, D=16, window=(1, 1), G=2)
    run_decode(c, num_splits=2)


# ------------------------------------------------------------------ rolling layout, in place


def _rolling_run(monkeypatch, B, Hq, Hkv, D, left, G, N, chunks, dtype, in_place_from):
    """Feed N tokens through a RollingKVCache; chunks from position `in_place_from` on read the
    cache in place (the emulated decode kernel), earlier ones take the gathered path."""
    g = torch.Generator().manual_seed(left * 31 + G)
    q = torch.randn(B, Hq, N, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, N, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, N, D, generator=g).to(dtype)
    cache = mmcore.RollingKVCache(1, B, Hkv, D, window_left=left, global_tokens=G, dtype=dtype)
    calls = []

    def selected(q_, k_new, v_new, pos, left_, global_tokens, backend):
        calls.append(pos)
        return pos >= in_place_from

    monkeypatch.setattr(kv_cache_mod, "rolling_kernel_selected", selected)
    outs, p = [], 0
    for T in chunks:
        outs.append(cache.attend(0, q[:, :, p:p + T], k[:, :, p:p + T], v[:, :, p:p + T],
                                 backend="torch"))
        p += T
    assert p == N and cache.length(0) == N
    out = torch.cat(outs, 2)
    mask = window_mask(B, N, N, left, 0, True, G)
    scale = D ** -0.5
    assert_close("cache out", out, oracle_attention(q, k, v, mask, scale)[0],
                 base_attention(q, k, v, mask, scale)[0])
    return calls


@pytest.mark.parametrize("left,G,chunks", [
    (7, 3, [20] + [1] * 30),            # prefill gathered, decode in place
    (3, 0, [5] + [7] * 5 + [1] * 4),    # chunks longer than the ring (W = 4)
    (16, 20, [1] * 40),                 # prefix fills during in-place decoding (pos < G)
    (0, 2, [3] + [1] * 12),             # a window of one token + sinks
])
def test_rolling_in_place_equals_full(monkeypatch, left, G, chunks):
    calls = _rolling_run(monkeypatch, B=2, Hq=8, Hkv=2, D=64, left=left, G=G, N=sum(chunks),
                         chunks=chunks, dtype=BF16, in_place_from=chunks[0])
    assert calls, "RollingKVCache.attend did not consult the dispatch"


def test_rolling_in_place_fp16_mqa_wide_head(monkeypatch):
    _rolling_run(monkeypatch, B=1, Hq=4, Hkv=1, D=256, left=40, G=4, N=70,
                 chunks=[30] + [4] * 10, dtype=F16, in_place_from=30)


def test_rolling_key_map_against_gather():
    """The rolling op reads exactly the keys RollingKVCache.update gathers (same outputs)."""
    torch.manual_seed(0)
    B, Hkv, Hq, D, left, G = 2, 2, 4, 32, 5, 3
    cache = mmcore.RollingKVCache(1, B, Hkv, D, window_left=left, global_tokens=G, dtype=BF16)
    for step in range(25):
        T = 1 if step > 3 else 4
        q = torch.randn(B, Hq, T, D).to(BF16)
        kn, vn = torch.randn(B, Hkv, T, D).to(BF16), torch.randn(B, Hkv, T, D).to(BF16)
        pos = cache.length(0)
        inplace = mmcore.ops.window_decode.rolling_window_decode(
            q, kn, vn, cache.k_global[0], cache.v_global[0], cache.k_ring[0], cache.v_ring[0],
            pos=pos, left=left, global_tokens=G, num_splits=2)
        k, v, g = cache.update(0, kn, vn)
        out, _ = torch.ops.mmcore_C.window_decode(q, k, v, None, None, None, None, None, None,
                                                  0, left, 0, True, g, D ** -0.5, 2)
        assert torch.equal(inplace, out), f"step {step}: in-place read differs from the gather"


# ------------------------------------------------------------------ argument errors


@pytest.mark.parametrize("kw,match", [
    (dict(Sq=17), "at most 16"),
    (dict(D=36), "multiple of 8"),
    (dict(dtype=torch.float32), "bfloat16 or float16"),
])
def test_errors_name_the_argument(kw, match):
    c = case(**kw)
    q, k, v, _ = make_attention_inputs(c, "cpu", requires_grad=False)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.mmcore_C.window_decode(q, k, v, None, None, None, None, None, None, 0, -1, -1,
                                         False, 0, 0.1, 0)


@pytest.mark.parametrize("args,match", [
    (dict(G=9), r"global_tokens: \(9\) must be <= Sk \(8\)"),
    (dict(sk=[9, 3]), r"seqlens_k: values must lie in \[0, 8\], got 9"),
    (dict(sk=[-1, 3]), r"seqlens_k: values must lie in \[0, 8\]"),
    (dict(sq=[2, 5]), r"seqlens_q: values must lie in \[0, 4\], got 5"),
])
def test_values_checked_on_cpu_tensors(args, match):
    """Issue 24: the raw op took global_tokens > Sk and lengths past the tensors (an
    out-of-bounds read); scalars are checked always, lengths held on the CPU here (a GPU
    caller must guarantee them: docs/robustness.md)."""
    B, H, D = 2, 2, 16
    t = lambda S: torch.randn(B, H, S, D).to(BF16)  # noqa: E731
    sq = torch.tensor(args["sq"]) if "sq" in args else None
    sk = torch.tensor(args["sk"]) if "sk" in args else None
    with pytest.raises(RuntimeError, match=match):
        torch.ops.mmcore_C.window_decode(t(4), t(8), t(8), None, None, None, None, sq, sk, 0,
                                         -1, -1, False, args.get("G", 0), 0.25, 0)


def test_rolling_errors():
    B, H, D = 1, 2, 16
    t = lambda S: torch.randn(B, H, S, D).to(BF16)  # noqa: E731
    with pytest.raises(RuntimeError, match="k_ring: must hold the window"):
        torch.ops.mmcore_C.window_decode(t(1), t(1), t(1), t(0), t(0), t(4), t(4), None, None,
                                         10, 4, 0, True, 0, 0.25, 0)
    with pytest.raises(RuntimeError, match="causal"):
        torch.ops.mmcore_C.window_decode(t(1), t(1), t(1), t(0), t(0), t(8), t(8), None, None,
                                         10, 4, 0, False, 0, 0.25, 0)
    with pytest.raises(RuntimeError, match="global_tokens"):
        torch.ops.mmcore_C.window_decode(t(1), t(1), t(1), t(2), t(2), t(8), t(8), None, None,
                                         10, 4, 0, True, 3, 0.25, 0)


# ------------------------------------------------------------------ GPU: the compiled kernel


def gpu_case(c, seed=0):
    """mmcore.window_attention(backend="cuda") on the GPU vs the float64 oracle."""
    q, k, v, _ = make_attention_inputs(c, "cuda", requires_grad=False, seed=seed)
    sq = None if c["seqlens_q"] is None else c["seqlens_q"].cuda()
    sk = None if c["seqlens_k"] is None else c["seqlens_k"].cuda()
    out, lse = mmcore.window_attention(q, k, v, window=c["window"], causal=c["causal"],
                                       global_tokens=c["G"], seqlens_q=sq, seqlens_k=sk,
                                       scale=c["scale"], return_lse=True, backend="cuda")
    mask, scale = case_mask(c), case_scale(c)
    ref, base = oracle_attention(q, k, v, mask, scale), base_attention(q, k, v, mask, scale)
    assert_close("out", out, ref[0], base[0])
    assert_close("lse", lse, ref[1], base[1])


@pytest.mark.gpu
class TestGPU:
    @pytest.mark.parametrize("Hq,Hkv", [(32, 8), (32, 4), (8, 8)])
    def test_decode_gqa(self, Hq, Hkv):
        gpu_case(case(B=3, Hq=Hq, Hkv=Hkv, Sq=1, Sk=4096, D=128, window=(2047, 0), causal=True,
                      G=4, seqlens_k=torch.tensor([4096, 3000, 17])))

    @pytest.mark.parametrize("D,dtype", [(64, F16), (80, BF16), (256, BF16), (40, F16)])
    def test_head_dims(self, D, dtype):
        gpu_case(case(B=2, Hq=8, Hkv=2, Sq=1, Sk=3001, D=D, dtype=dtype, window=(1000, 0),
                      causal=True, G=2, noncontig=True))

    @pytest.mark.parametrize("Sq", [2, 5, 16])
    def test_multi_query(self, Sq):
        gpu_case(case(B=3, Hq=16, Hkv=4, Sq=Sq, Sk=2048, D=128, window=(300, 7), G=1,
                      seqlens_q=torch.tensor([Sq, 1, 0]), seqlens_k=torch.tensor([2048, 99, 0])))

    def test_unbounded_long(self):
        """64k keys: many splits per (sample, kv head), merged by the combine kernel."""
        gpu_case(case(B=1, Hq=8, Hkv=2, Sq=1, Sk=65536, D=128, causal=True))

    @pytest.mark.parametrize("i", range(10))
    def test_random(self, i):
        gpu_case(random_case(random.Random(9300 + i)), seed=i)

    def test_rolling_cache_in_place(self):
        """RollingKVCache.attend(backend="cuda") decodes reading the ring in place."""
        torch.manual_seed(0)
        B, Hq, Hkv, D, left, G, N, P = 2, 32, 8, 128, 1023, 4, 3000, 2900
        q = torch.randn(B, Hq, N, D, device="cuda").to(BF16)
        k = torch.randn(B, Hkv, N, D, device="cuda").to(BF16)
        v = torch.randn(B, Hkv, N, D, device="cuda").to(BF16)
        cache = mmcore.RollingKVCache(1, B, Hkv, D, window_left=left, global_tokens=G,
                                      dtype=BF16, device="cuda")
        cache.attend(0, q[:, :, :P], k[:, :, :P], v[:, :, :P], backend="torch")  # prefill
        outs = [cache.attend(0, q[:, :, p:p + 1], k[:, :, p:p + 1], v[:, :, p:p + 1],
                             backend="cuda") for p in range(P, N)]
        mask = window_mask(B, N - P, N, left, 0, True, G)  # the decoded rows only
        ref = oracle_attention(q[:, :, P:], k, v, mask, D ** -0.5)[0]
        base = base_attention(q[:, :, P:], k, v, mask, D ** -0.5)[0]
        assert_close("in place", torch.cat(outs, 2), ref, base)
