"""The backends that wrap PyTorch's own kernels -- `sdpa` (cross_attention; dense and causal
window_attention), `flex` (window_attention) and `composed` (lora_linear) -- against the
float64 oracle, with the same capability-driven random cases as every other backend (kit),
plus named edge cases: fully masked rows and samples, GQA, non-contiguous inputs, Sq = 1."""
import pytest
import torch

import mmcore
from kit import attention_cases, case_problem, check_attention_case, check_lora_case, lora_cases
from mmcore.ops import registry
from test_cross_attention import case  # B=2, Hq=2, Hkv=1, Sq=40, Sk=33, D=32 fp32, overrides

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
N_SDPA = 24


# ------------------------------------------------------------------ sdpa: cross_attention
@pytest.mark.parametrize("i", range(N_SDPA))
def test_sdpa_cross_random(i):
    c = attention_cases("cross_attention", "sdpa", 1, seed=9100 + i)[0]
    check_attention_case("cross_attention", "sdpa", c, seed=i)


CROSS_EDGE = {
    "lk_zero": case(B=3, Sq=20, Sk=17, seqlens_k=[17, 0, 3]),
    "lq_zero_and_lk_zero": case(B=3, Sq=20, Sk=17, seqlens_q=[0, 20, 7], seqlens_k=[17, 9, 0]),
    "gqa_3_noncontig": case(Hq=6, Hkv=2, Sq=33, Sk=49, seqlens_k=[49, 21], noncontig=True),
    "sq_1_bf16": case(Sq=1, Sk=50, seqlens_k=[50, 7], dtype=BF16),
    "fp16_mqa": case(Hq=4, Hkv=1, Sq=20, Sk=50, dtype=F16, seqlens_q=[20, 11]),
}


@pytest.mark.parametrize("name", sorted(CROSS_EDGE))
def test_sdpa_cross_edge(name):
    check_attention_case("cross_attention", "sdpa", CROSS_EDGE[name])


# ------------------------------------------------------------------ sdpa: window_attention
@pytest.mark.parametrize("i", range(N_SDPA))
def test_sdpa_window_random(i):
    c = attention_cases("window_attention", "sdpa", 1, seed=9200 + i)[0]
    check_attention_case("window_attention", "sdpa", c, seed=i)


L3 = torch.tensor([41, 0, 17])
WINDOW_EDGE = {
    "causal self-attention padding, GQA": case(B=3, Hq=4, Hkv=2, Sq=41, Sk=41, window=(-1, 0),
                                              causal=True, seqlens_q=L3, seqlens_k=L3),
    "causal sinks are a subset": case(Sq=64, Sk=64, window=None, causal=True, G=4),
    "right 0 without causal": case(Sq=37, Sk=37, window=(-1, 0)),
    "dense with globals and lengths": case(B=3, Sq=30, Sk=45, window=(50, 40), G=3,
                                           seqlens_k=[45, 0, 9], seqlens_q=[30, 4, 0]),
    "decode Sq=1 against a cache": case(B=2, Sq=1, Sk=70, window=(-1, 0), causal=True,
                                        seqlens_k=[70, 12], noncontig=True),
    # fp32, dense, every sample >= 2 keys: ATen's CPU flash backward (the others: math)
    "flash backward: dense fp32, GQA, lengths, padded rows": case(
        B=3, Hq=6, Hkv=2, Sq=40, Sk=52, window=None, D=40, dtype=torch.float32,
        seqlens_q=[40, 7, 0], seqlens_k=[52, 2, 30]),
    "flash backward: dense fp32, no lengths, large scores": case(
        B=2, Sq=33, Sk=65, window=None, D=72, dtype=torch.float32, scale=2.0),
}


@pytest.mark.parametrize("name", sorted(WINDOW_EDGE))
def test_sdpa_window_edge(name):
    check_attention_case("window_attention", "sdpa", WINDOW_EDGE[name])


def test_sdpa_refuses_what_it_cannot_express():
    """Banded windows, and causal windows whose offset is not 0 (SDPA's is_causal is top-left):
    refused with the reason, and auto passes them to another backend."""
    impl = registry.get("window_attention", "sdpa")
    for c in (case(Sq=40, Sk=40, window=(4, 4)),
              case(Sq=20, Sk=40, window=(-1, 0), causal=True),
              case(Sq=40, Sk=40, window=(-1, 0), causal=True, seqlens_q=torch.tensor([40, 3]),
                   seqlens_k=torch.tensor([40, 3])),
              case(Sq=40, Sk=40, window=(-1, 0), G=2)):
        why = impl.refuse(case_problem("window_attention", c))
        assert why and "mask" in why[0], (c, why)
    q, k, v = torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
    with pytest.raises(registry.BackendError, match="sdpa: needs a banded or offset mask"):
        mmcore.window_attention(q, k, v, window=(4, 4), backend="sdpa")


# ------------------------------------------------------------------ flex: window_attention
N_FLEX = 8


@pytest.mark.parametrize("i", range(N_FLEX))
def test_flex_window_random(i):
    """Eager FlexAttention on the CPU (forward and lse; flex has no CPU backward): the
    wrapper, the mask_mod and the lengths plumbing against the oracle."""
    c = attention_cases("window_attention", "flex", 1, seed=9300 + i, max_s=100,
                        grads=False)[0]
    check_attention_case("window_attention", "flex", c, grads=False, seed=i)


@pytest.mark.parametrize("name", ["causal sinks are a subset",
                                  "causal self-attention padding, GQA"])
def test_flex_window_edge(name):
    check_attention_case("window_attention", "flex", WINDOW_EDGE[name], grads=False)


def test_flex_block_flags_match_the_mask():
    """The block lists built from block indices: every block holding an allowed pair is
    visited, a block visited without the mask holds only allowed pairs, and no block without
    an allowed pair is visited -- over random windows, globals, causal, lengths and block
    sizes (small blocks: many per case).  Eager flex never reads the block lists, so this is
    what guards the compiled (CUDA) path's sparsity."""
    import random

    from kit import window_mask
    from mmcore.ops.backends.flex import block_flags

    rng = random.Random(5)
    for _ in range(300):
        B, Sq = rng.randint(1, 3), rng.randint(1, 70)
        Sk = rng.choice([Sq, rng.randint(1, 70)])
        left = rng.choice([-1, 0, 1, 5, 16, rng.randint(0, Sk)])
        right = rng.choice([-1, 0, 3, 16, rng.randint(0, Sk)])
        causal = rng.random() < 0.4
        G = rng.randint(0, min(Sk, 8)) if rng.random() < 0.5 else 0
        Lq = torch.tensor([rng.randint(0, Sq) for _ in range(B)])
        Lk = torch.tensor([rng.randint(0, Sk) for _ in range(B)])
        bq, bk = rng.choice([4, 8, 16]), rng.choice([4, 8, 16])
        anyb, full = block_flags(Lq, Lk, Sq, Sk, left, 0 if causal else right, causal, G,
                                 bq, bk)
        nq, nk = anyb.shape[1:]
        m = torch.zeros(B, nq * bq, nk * bk, dtype=torch.bool)
        m[:, :Sq, :Sk] = window_mask(B, Sq, Sk, left, right, causal, G, Lq, Lk)[:, 0]
        inside = torch.zeros_like(m)
        inside[:, :Sq, :Sk] = True
        has = m.view(B, nq, bq, nk, bk).any(-1).any(2)
        every = (m | ~inside).view(B, nq, bq, nk, bk).all(-1).all(2)
        case = (B, Sq, Sk, left, right, causal, G, Lq.tolist(), Lk.tolist(), bq, bk)
        assert torch.equal(anyb, has), case
        assert not (full & ~every).any(), case


def test_flex_block_mask_cached_without_lengths():
    from mmcore.ops.backends import flex

    q, k = torch.randn(1, 2, 300, 16), torch.randn(1, 2, 300, 16)
    a = flex.block_mask(q, k, None, None, 64, 0, True, 4)
    assert flex.block_mask(q, k, None, None, 64, 0, True, 4) is a
    assert flex.block_mask(q, k, None, None, 65, 0, True, 4) is not a
    L = torch.tensor([200])
    assert flex.block_mask(q, k, L, L, 64, 0, True, 4) is not \
        flex.block_mask(q, k, L, L, 64, 0, True, 4)


# ------------------------------------------------------------------ composed: lora_linear
N_COMPOSED = 20


@pytest.mark.parametrize("i", range(N_COMPOSED))
def test_composed_lora_random(i):
    c = lora_cases("composed", 1, seed=9400 + i)[0]
    check_lora_case("composed", c, seed=i)


def test_composed_lora_base_rows_and_flags():
    """Rows with id -1 get the base term only; the need_* flags skip what nobody asked for."""
    x = torch.randn(9, 12, requires_grad=True)
    w, b = torch.randn(7, 12), torch.randn(7)
    A = torch.randn(3, 4, 12, requires_grad=True)
    Bm = torch.randn(3, 7, 4)
    ids = torch.tensor([-1, 0, 2, 2, -1, 1, 0, -1, 2])
    y = mmcore.lora_linear(x, w, b, A, Bm, torch.tensor([0.5, 1.0, 2.0]), adapter_ids=ids,
                           backend="composed")
    base = torch.nn.functional.linear(x, w, b)
    torch.testing.assert_close(y[ids == -1], base[ids == -1])
    y.sum().backward()
    assert x.grad is not None and A.grad is not None and Bm.grad is None
    assert torch.all(A.grad[1].abs().sum(-1) > 0)


# ------------------------------------------------------------------ compiled, on a GPU
@pytest.mark.gpu
@pytest.mark.parametrize("i", range(6))
@pytest.mark.parametrize("op,backend", [("cross_attention", "sdpa"),
                                        ("window_attention", "sdpa"),
                                        ("window_attention", "flex")])
def test_gpu_attention(op, backend, i):
    """The CUDA paths: SDPA's flash / efficient kernels with their lse and the recomputing
    backward; compiled FlexAttention with the block lists from block indices, and its
    backward through autograd (the eager path)."""
    c = attention_cases(op, backend, 1, seed=9500 + i, device="cuda", max_s=300,
                        dims=(64, 128), dtypes=(BF16, F16))[0]
    check_attention_case(op, backend, c, device="cuda", seed=i)


@pytest.mark.gpu
@pytest.mark.parametrize("i", range(6))
def test_gpu_composed_lora(i):
    c = lora_cases("composed", 1, seed=9600 + i, max_m=300, max_nk=300)[0]
    check_lora_case("composed", c, device="cuda", seed=i)


def test_sdpa_cuda_backward_logic_on_cpu():
    """The CUDA backward (one recompute through SDPA, k/v repeated for GQA, key mask) run on
    CPU tensors: same gradients as the CPU path, padding and empty samples included.  (Its
    tolerance-rule test is test_gpu_attention; here SDPA's CPU kernel stands in.)"""
    from mmcore.ops.backends import sdpa

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(3, 6, 20, 16, generator=g), torch.randn(3, 2, 9, 16, generator=g),
               torch.randn(3, 2, 9, 16, generator=g))
    dout = torch.randn(3, 6, 20, 16, generator=g)
    sq, sk = torch.tensor([20, 7, 0]), torch.tensor([9, 0, 4])
    for causal, lens in ((False, (sq, sk)), (False, (None, None)), (True, (None, None))):
        kq = k if not causal else torch.randn(3, 2, 20, 16, generator=g)
        vq = v if not causal else torch.randn(3, 2, 20, 16, generator=g)
        qq, kk, vv, kmask, row_ok = sdpa._prepare(q, kq, vq, *lens, causal)
        d = dout if row_ok is None else torch.where(row_ok[:, None, :, None], dout, 0.0)
        got = sdpa._fused_backward(d, qq, kk, vv, kmask, causal, 0.25)
        want = sdpa._math_backward(d, qq, kk, vv, kmask, causal, 0.25, True)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
