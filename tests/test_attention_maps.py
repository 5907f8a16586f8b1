"""Attention rows recomputed from the saved lse (mmcore.ops.attention_maps) against the dense
float64 oracle's softmax rows, on every backend that serves CPU tensors (torch, cpu, triton
under TRITON_INTERPRET=1, sdpa; flex for window_attention), within the tolerance rule (docs/design.md); and their memory bound."""
import random

import pytest
import torch

import mmcore
from kit import assert_close, attention_cases, case_mask, case_scale, make_attention_inputs, \
    poison_allocator, poison_padding, window_mask
from kit_memory import LargestTensor
from mmcore.ops import registry
from mmcore.ops.attention_maps import co_attention_rows, cross_attention_rows, \
    window_attention_rows

CPU_BACKENDS = ("torch", "cpu", "triton", "sdpa")
WINDOW_BACKENDS = CPU_BACKENDS + ("flex",)  # FlexAttention: window_attention only


def softmax_rows(q, k, mask, scale, rows, dtype):
    """Dense softmax(scale q kᵀ) with the explicit mask, in `dtype` on the CPU; rows that see
    no key are 0.  q (B, Hq, Sq, D), k (B, Hkv, Sk, D), mask (B, 1, Sq, Sk) -> (B, Hq, R, Sk)."""
    g = q.shape[1] // k.shape[1]
    q, k = q.detach().cpu().to(dtype), k.detach().cpu().to(dtype)
    zero = torch.zeros((), dtype=dtype)
    q = torch.where(mask.any(-1, keepdim=True), q, zero)  # NaN poison in padding stays out
    k = torch.where(mask.any(-2).unsqueeze(-1), k, zero).repeat_interleave(g, 1)
    s = ((q @ k.transpose(-1, -2)) * scale).masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1, keepdim=True)
    p = torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse))
    return p[:, :, rows]


def pick_rows(Sq, rng, n=4):
    return sorted({0, Sq - 1, *(rng.randrange(Sq) for _ in range(n))})


def check_rows(name, got, q, k, mask, scale, rows):
    assert got.shape == (q.shape[0], q.shape[1], len(rows), k.shape[2]), got.shape
    oracle = softmax_rows(q, k, mask, scale, rows, torch.float64)
    base = softmax_rows(q, k, mask, scale, rows, q.dtype)
    assert_close(name, got, oracle, base)


def _device(backend):
    if backend == "triton":
        from mmcore.ops.backends import _loaders

        why = _loaders.triton_error()
        if why:
            pytest.fail(f"triton backend unavailable: {why}")
    return "cpu"


def run_cases(op, backend, n, seed, max_s, rows_fn):
    """Random cases the backend declares (attention_cases), NaN-poisoned padding, random rows
    (first, last, a few more); rows_fn(q, k, v, rows, case, sq, sk) -> P, checked vs oracle."""
    dev = _device(backend)
    rng = random.Random(seed)
    for i, c in enumerate(attention_cases(op, backend, n, seed=seed, max_s=max_s,
                                          dims=(16, 40, 72), grads=False, features=False)):
        q, k, v, _ = make_attention_inputs(c, dev, requires_grad=False, seed=i)
        rows = pick_rows(c["Sq"], rng)
        sq = None if c["seqlens_q"] is None else c["seqlens_q"].to(dev)
        sk = None if c["seqlens_k"] is None else c["seqlens_k"].to(dev)
        poison_allocator(dev)
        p = rows_fn(q, k, v, rows, c, sq, sk)
        check_rows(f"case {i} {c}", p, q, k, case_mask(c), case_scale(c), rows)


@pytest.mark.parametrize("backend", WINDOW_BACKENDS)
def test_window_rows_match_oracle(backend):
    """window, causal, global tokens, seqlens (bottom-right), GQA, odd D, non-contiguous,
    bf16/fp16 where the backend takes them, fully masked and padded rows (0, no NaN)."""
    run_cases("window_attention", backend, 4 if backend == "triton" else 8, 140, 80,
              lambda q, k, v, rows, c, sq, sk: window_attention_rows(
                  q, k, v, rows, window=c["window"], causal=c["causal"], global_tokens=c["G"],
                  seqlens_q=sq, seqlens_k=sk, scale=c["scale"], backend=backend))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cross_rows_match_oracle(backend):
    run_cases("cross_attention", backend, 4 if backend == "triton" else 6, 150, 70,
              lambda q, k, v, rows, c, sq, sk: cross_attention_rows(
                  q, k, v, rows, seqlens_q=sq, seqlens_k=sk, scale=c["scale"],
                  backend=backend))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_co_attention_rows_match_oracle(backend):
    """Both directions from one co_attention call (the fused kernel's lse on triton); a
    sample with no image tokens gives zero text rows."""
    dev = _device(backend)
    g = torch.Generator().manual_seed(16)
    B, H, St, Sv, D = 3, 2, 37, 17, 40
    lt, lv = torch.tensor([37, 20, 9]), torch.tensor([17, 0, 5])
    # NaN past each stream's length: padding must never be read
    mk = lambda S, L: poison_padding(torch.randn(B, H, S, D, generator=g), L, 2).to(dev)  # noqa: E731
    q_t, k_t, v_t = mk(St, lt), mk(St, lt), mk(St, lt)
    q_v, k_v, v_v = mk(Sv, lv), mk(Sv, lv), mk(Sv, lv)
    rt, rv = [0, 8, 19, 36], [0, 4, 16]
    p_t, p_v = co_attention_rows(q_t, k_t, v_t, q_v, k_v, v_v, text_rows=rt, image_rows=rv,
                                 text_lengths=lt, image_lengths=lv, backend=backend)
    s = D ** -0.5
    check_rows("text->image", p_t, q_t, k_v, window_mask(B, St, Sv, -1, -1, False, 0, lt, lv),
               s, rt)
    check_rows("image->text", p_v, q_v, k_t, window_mask(B, Sv, St, -1, -1, False, 0, lv, lt),
               s, rv)
    assert p_t[1].abs().sum() == 0 and p_v[1].abs().sum() == 0  # sample 1 has no image


def test_every_cpu_backend_is_covered():
    """The parametrisation above names every backend that serves CPU tensors today."""
    for op, tested in (("window_attention", WINDOW_BACKENDS),
                       ("cross_attention", CPU_BACKENDS)):
        cpu = {i.backend for i in registry.implementations(op) if "cpu" in i.devices}
        assert cpu <= set(tested), (op, cpu)


def test_given_lse_is_used_and_rows_sum_to_one():
    """lse of the caller's own forward pass: no second forward; valid rows sum to 1."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, 50, 16, generator=g) for _ in range(3))
    k, v = k[:, :2], v[:, :2]  # GQA 4 -> 2
    L = torch.tensor([50, 31])
    out, lse = mmcore.window_attention(q, k, v, window=(5, 2), global_tokens=2, seqlens_q=L,
                                       seqlens_k=L, return_lse=True)
    p = window_attention_rows(q, k, v, [0, 10, 30, 40], window=(5, 2), global_tokens=2,
                              seqlens_q=L, seqlens_k=L, lse=lse)
    sums = p.sum(-1)
    assert torch.allclose(sums[0], torch.ones_like(sums[0]), atol=1e-5)
    assert torch.allclose(sums[1, :, :3], torch.ones_like(sums[1, :, :3]), atol=1e-5)
    assert sums[1, :, 3].abs().max() == 0  # row 40 is padding in sample 1
    # the rows reproduce the op's output: P @ v = out for those rows
    vv = v.repeat_interleave(2, 1)
    assert torch.allclose(p @ vv, out[:, :, [0, 10, 30, 40]], atol=1e-5)


def test_second_pass_memory_is_rows_times_keys():
    """No op in the second pass makes a tensor larger than the (B, Hq, R, Sk) result — never
    the (Sq, Sk) matrix (here 16x larger)."""
    g = torch.Generator().manual_seed(4)
    B, H, S, D, R = 1, 2, 1024, 16, 4
    q, k, v = (torch.randn(B, H, S, D, generator=g) for _ in range(3))
    _, lse = mmcore.window_attention(q, k, v, window=(32, 32), global_tokens=1,
                                     return_lse=True, backend="torch")
    with LargestTensor() as m:
        p = window_attention_rows(q, k, v, [0, 5, 500, 1023], window=(32, 32),
                                  global_tokens=1, lse=lse)
    assert p.shape == (B, H, R, S)
    assert m.numel <= B * H * R * S, (m.op, m.shape)
    assert m.numel * 16 <= B * H * S * S


def test_bad_arguments_name_themselves():
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="rows"):
        window_attention_rows(q, q, q, [8])
    with pytest.raises(ValueError, match="rows"):
        cross_attention_rows(q, q, q, [[0, 1]])
    with pytest.raises(ValueError, match="lse"):
        window_attention_rows(q, q, q, [0], lse=torch.zeros(1, 2, 7))
    with pytest.raises(ValueError, match="image_rows"):
        co_attention_rows(q, q, q, q, q, q, text_rows=[0], image_rows=[-1])
