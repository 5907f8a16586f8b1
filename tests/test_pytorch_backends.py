"""The backends that wrap PyTorch's own kernels -- `sdpa` (cross_attention; dense and causal
window_attention), `flex` (window_attention) and `composed` (lora_linear) -- against the
float64 oracle, with the same capability-driven random cases as every other backend (kit),
plus named edge cases: fully masked rows and samples, GQA, non-contiguous inputs, Sq = 1."""
import pytest
import torch

import mmcore
from kit import attention_cases, case_problem, check_attention_case
from mmcore.ops import registry

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
N_SDPA = 40


def case(**kw):
    c = dict(B=2, Hq=2, Hkv=1, Sq=40, Sk=33, D=32, dtype=F32, noncontig=False, scale=None,
             window=None, causal=False, G=0, seqlens_q=None, seqlens_k=None)
    c.update(kw)
    for n in ("seqlens_q", "seqlens_k"):
        if isinstance(c[n], list):
            c[n] = torch.tensor(c[n])
    return c


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
