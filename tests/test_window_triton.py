"""The `triton` backend of window_attention against the float64 oracle.

On a machine without CUDA the kernels run under TRITON_INTERPRET=1 (conftest), with small
asymmetric blocks (fwd 32x64, dq 64x32, dK/dV 32x64), so the shapes here straddle those
blocks.  The `gpu` class compiles the kernels (autotuned Hopper blocks) on larger shapes.
"""
import pytest
import torch

import mmcore
from gpu_cases import WINDOW_FAMILIES, window_cases
from kit import attention_cases, check_attention_case, make_attention_inputs
from mmcore.ops.registry import BackendError

OP, BK = "window_attention", "triton"
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def case(**kw):
    c = dict(B=1, Hq=2, Hkv=1, Sq=40, Sk=40, D=32, dtype=F32, window=None, causal=False, G=0,
             seqlens_q=None, seqlens_k=None, noncontig=False, scale=None)
    c.update(kw)
    return c


# ------------------------------------------------------------------ random matrix

N_RANDOM = 40


@pytest.mark.parametrize("i", range(N_RANDOM))
def test_random(interpret, i):
    c = attention_cases(OP, BK, 1, seed=7000 + i, max_s=100, dims=(16, 32, 40, 64))[0]
    check_attention_case(OP, BK, c, interpret, seed=i)


# ------------------------------------------------------------------ explicit edge cases

EDGE = {
    "S1": case(Sq=1, Sk=1, window=(4, 4)),
    "S1_causal_gqa": case(Sq=1, Sk=1, Hq=4, Hkv=2, causal=True, window=(3, 0)),
    "S113_sym_global": case(Sq=113, Sk=113, window=(16, 16), G=2, B=2),
    "S113_causal": case(Sq=113, Sk=113, window=(20, 0), causal=True, dtype=BF16),
    "block_minus1": case(Sq=63, Sk=63, window=(7, 9)),
    "block_plus1": case(Sq=65, Sk=65, window=(33, 2), causal=False, G=1),
    "block_exact_causal": case(Sq=64, Sk=64, window=(31, 0), causal=True),
    "block_33": case(Sq=33, Sk=33, window=(1, 1), dtype=F16),
    "diag_only": case(Sq=50, Sk=50, window=(0, 0)),
    "dense": case(Sq=70, Sk=45),
    "plain_causal": case(Sq=70, Sk=70, causal=True),
    "sq_lt_sk": case(Sq=20, Sk=90, window=(10, 3), causal=False),
    "sq_lt_sk_causal_global": case(Sq=20, Sk=90, window=(10, 0), causal=True, G=3),
    "sq_gt_sk": case(Sq=90, Sk=20, window=(5, 5)),
    "sq_gt_sk_causal": case(Sq=90, Sk=20, window=(5, 0), causal=True),  # rows p < 0: empty
    "gqa3": case(Hq=6, Hkv=2, Sq=70, Sk=70, window=(9, 4), G=2),
    "mqa": case(Hq=4, Hkv=1, Sq=50, Sk=50, window=(6, 0), causal=True, dtype=F16),
    "sinks_causal": case(Sq=100, Sk=100, window=(8, 0), causal=True, G=4),
    "global_bidir": case(Sq=100, Sk=100, window=(5, 5), G=3, B=2,
                         seqlens_q=torch.tensor([100, 61]), seqlens_k=torch.tensor([100, 61])),
    "global_big": case(Sq=80, Sk=80, window=(2, 2), G=40),
    "lengths_zero": case(B=3, Sq=40, Sk=40, window=(6, 6), G=2,
                         seqlens_q=torch.tensor([0, 40, 17]), seqlens_k=torch.tensor([0, 40, 17])),
    "lk_zero": case(B=2, Sq=30, Sk=40, window=(6, 0), causal=True,
                    seqlens_k=torch.tensor([0, 25])),
    "lq_gt_lk": case(B=2, Sq=30, Sk=40, window=(3, 0), causal=True,
                     seqlens_q=torch.tensor([30, 12]), seqlens_k=torch.tensor([9, 40])),
    "noncontig": case(Hq=4, Hkv=2, Sq=70, Sk=70, window=(12, 12), noncontig=True, G=1),
    "noncontig_bf16_lengths": case(B=2, Sq=50, Sk=66, window=(4, 20), noncontig=True,
                                   dtype=BF16, seqlens_k=torch.tensor([66, 30])),
    "fp16_scale": case(Sq=70, Sk=70, window=(10, 10), dtype=F16, scale=0.3),
    "bf16_gqa_causal": case(Hq=4, Hkv=2, Sq=75, Sk=75, window=(16, 0), causal=True, G=2,
                            dtype=BF16),
}


@pytest.mark.parametrize("name", list(EDGE))
def test_edge(interpret, name):
    check_attention_case(OP, BK, EDGE[name], interpret)


@pytest.mark.parametrize("D", [40, 72, 80, 96, 128, 256])
def test_head_dims(interpret, D):
    c = case(D=D, Sq=24, Sk=36, window=(5, 7), G=1, Hq=2, Hkv=1,
             dtype=F16 if D in (80, 256) else F32)
    check_attention_case(OP, BK, c, interpret)


@pytest.mark.parametrize("name,kw", [
    ("decode_1", dict(Sq=1, Sk=160, window=(130, 0), causal=True, G=2,
                      seqlens_k=torch.tensor([160, 97, 1]))),
    ("decode_1_unbounded", dict(Sq=1, Sk=140, causal=True, seqlens_k=torch.tensor([140, 0, 64]),
                                dtype=BF16)),
    ("decode_chunk_4", dict(Sq=4, Sk=150, window=(120, 0), causal=True, G=3, Hq=4, Hkv=2,
                            seqlens_k=torch.tensor([150, 77, 4]), B=3)),
    ("decode_16_bidir", dict(Sq=16, Sk=160, window=(90, 90), G=0, B=1)),
])
def test_decode_split_k(interpret, name, kw):
    """Sq <= 16 takes the split-K path (partials merged by lse), as RollingKVCache decoding."""
    from mmcore.kernels import window_attention as kern

    c = case(**{**dict(B=3, Hq=2, Hkv=1, D=32), **kw})
    left, right = kern._norm_window(*(c["window"] or (-1, -1)), c["causal"])
    ns = kern._num_splits(c["B"], c["Hq"], c["Sq"], c["Sk"], left, right, c["G"],
                          torch.device(interpret), 32 if interpret == "cpu" else 64)
    assert ns > 1, "the split-K path is not exercised"
    check_attention_case(OP, BK, c, interpret)


def test_decode_matches_full(interpret):
    """The last query row of a full causal call equals a 1-query call against the cache."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 150, 32, generator=g).to(interpret)
    k = torch.randn(1, 2, 150, 32, generator=g).to(interpret)
    v = torch.randn(1, 2, 150, 32, generator=g).to(interpret)
    kw = dict(window=(99, 0), causal=True, global_tokens=2, backend=BK, return_lse=True)
    full, lse_full = mmcore.window_attention(q, k, v, **kw)
    last, lse_last = mmcore.window_attention(q[:, :, -1:], k, v, **kw)
    torch.testing.assert_close(last, full[:, :, -1:], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse_last, lse_full[:, :, -1:], atol=2e-6, rtol=1e-5)


def test_fully_masked_rows_are_zero(interpret):
    """Rows that see no key: out 0, lse -inf, and zero (never NaN) gradients."""
    c = case(B=2, Sq=30, Sk=40, window=(2, 0), causal=True, seqlens_k=torch.tensor([0, 10]))
    q, k, v, dout = make_attention_inputs(c, interpret)
    out, lse = mmcore.window_attention(q, k, v, window=(2, 0), causal=True,
                                       seqlens_k=c["seqlens_k"].to(interpret),
                                       return_lse=True, backend=BK)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.isneginf(lse[0]).all()
    # sample 1: off = 10 - 30 = -20, rows i < 20 have p < 0 and see nothing
    assert torch.isneginf(lse[1, :, :20]).all() and torch.isfinite(lse[1, :, 20:]).all()
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    for t in (dq, dk, dv):
        assert torch.isfinite(t).all()
    zero = lambda t: torch.equal(t, torch.zeros_like(t))  # noqa: E731
    assert zero(dq[0]) and zero(dq[1, :, :20])  # rows that see nothing
    assert zero(dk[0]) and zero(dv[0]) and zero(dk[1, :, 10:]) and zero(dv[1, :, 10:])  # padding


def test_backward_deterministic(interpret):
    """dK/dV and dQ are each written by one program in a fixed order: bitwise reproducible."""
    c = case(Hq=2, Hkv=1, Sq=70, Sk=70, window=(9, 3), G=2, dtype=BF16)
    q, k, v, dout = make_attention_inputs(c, interpret)
    grads = []
    for _ in range(2):
        out = mmcore.window_attention(q, k, v, window=(9, 3), global_tokens=2, backend=BK)
        grads.append(torch.autograd.grad(out, (q, k, v), dout))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_head_dim_too_large_names_limit(interpret):
    q = torch.randn(1, 1, 4, 264, device=interpret)
    with pytest.raises(BackendError) as e:
        mmcore.window_attention(q, q, q, window=(2, 2), backend=BK)
    msg = str(e.value)
    assert "head dim 264 > 256" in msg and "triton" in msg
    assert "torch: (can serve" in msg


def test_registration():
    from mmcore.ops import registry
    impl = registry.get(OP, BK)
    assert impl.priority == 40 and impl.max_head_dim == 256
    assert impl.supports_gqa and impl.supports_global_tokens and impl.supports_backward
    assert impl.auto_devices == frozenset({"cuda"})
    assert torch.float64 not in impl.dtypes


# ------------------------------------------------------------------ compiled, on a GPU


@pytest.mark.gpu
class TestGPU:
    """Compiled kernels vs the float64 oracle.  Autotuning is off in tests (conftest), so each
    compile family (gpu_cases.py) costs one compile per kernel, whatever the shapes."""

    @pytest.mark.parametrize("fam", WINDOW_FAMILIES, ids=[f[0] for f in WINDOW_FAMILIES])
    def test_random(self, fam):
        """The random oracle matrix, three cases per family: varlen, GQA, global tokens,
        Sq != Sk, windows from 0 to unbounded, non-contiguous inputs."""
        for i, c in enumerate(window_cases(fam, 3, seed=9100 + WINDOW_FAMILIES.index(fam))):
            check_attention_case(OP, BK, c, "cuda", seed=i)

    @pytest.mark.parametrize("S,window,causal,G", [
        (4096, (1024, 0), True, 4),
        (4099, (255, 0), True, 0),
    ])
    def test_long(self, S, window, causal, G):
        """Long sequences in the bf16 / D = 128 causal varlen family."""
        L = torch.tensor([S, S - 1000])
        c = case(B=2, Hq=4, Hkv=2, Sq=S, Sk=S, D=128, dtype=BF16, window=window,
                 causal=causal, G=G, seqlens_q=L, seqlens_k=L)
        check_attention_case(OP, BK, c, "cuda")

    @pytest.mark.parametrize("dtype,D", [(BF16, 128), (F32, 64)])
    def test_decode(self, dtype, D):
        """Sq = 1 against caches of different fills: split-K forward + combine."""
        c = case(B=4, Hq=8, Hkv=2, Sq=1, Sk=8192, D=D, dtype=dtype, window=(4095, 0),
                 causal=True, G=4, seqlens_k=torch.tensor([8192, 5000, 4097, 17]))
        check_attention_case(OP, BK, c, "cuda")

    def test_backward_bitwise_deterministic(self):
        """DESIGN: the backward is deterministic (no atomics): two runs are bitwise equal."""
        c = case(B=2, Hq=4, Hkv=1, Sq=2000, Sk=2000, D=128, dtype=BF16, window=(300, 0),
                 causal=True, G=4, seqlens_q=torch.tensor([2000, 1234]),
                 seqlens_k=torch.tensor([2000, 1234]))
        q, k, v, dout = make_attention_inputs(c, "cuda")
        sl = c["seqlens_q"].cuda()

        def grads():
            out = mmcore.window_attention(q, k, v, window=c["window"], causal=True,
                                          global_tokens=4, seqlens_q=sl, seqlens_k=sl,
                                          backend=BK)
            return torch.autograd.grad(out, (q, k, v), dout)

        a, b = grads(), grads()
        assert all(torch.equal(x, y) for x, y in zip(a, b))
