"""Scattered blockwise groups (mmcore.patch.hf_scattered): PaliGemma's or(causal,
blockwise(ids)) with random token types -- the prefix group is not contiguous, so its rows see
[0, q] plus the group's later keys -- served by op calls on permuted keys.  Forward and the
gradients of q, k, v against the float64 oracle of HF's own mask (evaluated densely), on the
torch, cpu and triton (interpreter) backends; a tiny PaliGemma with random token types on the
op, every call, within the tolerance rule vs eager."""
import pytest
import torch

import kit_vlm as KV
import mmcore
from kit import assert_close, base_attention, oracle_attention
from mmcore.ops import registry
from mmcore.patch import hf_bounds as hb
from mmcore.patch import hf_interface as hfi

mu = pytest.importorskip("transformers.masking_utils")


def _layout(B, S, padding, seed):
    """-> (attention_mask (B, S) long, block ids (B, S): 0 on random token-type-0 tokens,
    -1 elsewhere; every sample has a scattered group 0)."""
    g = torch.Generator().manual_seed(seed)
    am = torch.ones(B, S, dtype=torch.long)
    for b in range(B):
        if padding == "left":
            am[b, :b * 2] = 0
        elif padding == "holey":
            am[b] = (torch.rand(S, generator=g) > 0.25).long()
            am[b, -1] = 1
    tti = torch.randint(0, 2, (B, S), generator=g)
    tti[:, -3:] = torch.tensor([0, 1, 0])  # a token of group 0 after a text token: scattered
    return am, torch.where(tti == 0, 0, -1)


def _hf_mask(fn, am, B, S):
    """HF's own dense mask (B, 1, S, S) bool, padded query rows emptied (mmcore's convention:
    their output is 0)."""
    ref = mu.sdpa_mask(batch_size=B, q_length=S, kv_length=S, mask_function=fn,
                       attention_mask=am.bool(), allow_is_causal_skip=False)
    return ref & am.bool()[:, None, :, None]


class _Layer(torch.nn.Module):
    def __init__(self, backend):
        super().__init__()
        self._mmcore_backend = backend


def _run_case(backend, padding, seed, B=3, S=23, Hq=4, Hkv=2, D=16, groups=1):
    am, ids = _layout(B, S, padding, seed)
    if groups > 1:  # several scattered groups (Gemma-3 style ids 0, 1, ... drawn at random)
        g = torch.Generator().manual_seed(seed + 100)
        ids = torch.randint(-1, groups, (B, S), generator=g)
    fn = mu.or_masks(mu.causal_mask_function, mu.blockwise_overlay(ids))
    tagged = hb.mask_for(fn, B, S, S, 0, 0, am, "cpu")
    assert tagged is not None, "scattered groups not claimed"
    spec = hb.spec_of(tagged)
    assert len(spec.groups) == groups  # the permuted calls are planned, not the natural one
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, S, D, generator=g).requires_grad_()
    k = torch.randn(B, Hkv, S, D, generator=g).requires_grad_()
    v = torch.randn(B, Hkv, S, D, generator=g).requires_grad_()
    dout = torch.randn(B, Hq, S, D, generator=g)
    scale = D ** -0.5
    out, reason = hb.attend_tagged(_Layer(backend), q, k, v, tagged, spec, scale, None, None,
                                   None)
    assert reason is None
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    mask = _hf_mask(fn, am, B, S)
    o64, _, dq64, dk64, dv64 = oracle_attention(q, k, v, mask, scale, dout)
    ob, _, dqb, dkb, dvb = base_attention(q, k, v, mask, scale, dout)
    name = f"{backend}/{padding}/{seed}"
    assert_close(f"{name}.out", out, o64, ob)
    for n, a, o, b in (("dq", dq, dq64, dqb), ("dk", dk, dk64, dkb), ("dv", dv, dv64, dvb)):
        assert_close(f"{name}.{n}", a, o, b, grad=True)


def _available(backend):
    """None when the backend loaded here (the cpu one needs the built extension), else why."""
    return registry.get("window_attention", backend).available()


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
@pytest.mark.parametrize("padding", ["none", "left", "holey"])
def test_scattered_prefix_group_on_the_op(backend, padding):
    err = _available(backend)
    if err:
        pytest.skip(f"backend {backend} not available here: {err}")
    seeds = (0, 1) if backend == "triton" else (0, 1, 2)
    for seed in seeds:
        _run_case(backend, padding, seed, S=17 if backend == "triton" else 23)


def test_several_scattered_groups():
    for seed in (3, 4):
        _run_case("torch", "holey", seed, groups=3)


def test_sliding_window_and_scattered_group_not_claimed_when_not_an_interval():
    """and(sliding w, or(causal, blockwise)): a group row's non-member keys are (q - w, q],
    not adjacent to the members in the permuted order -> not claimed (dense), never wrong."""
    B, S = 2, 20
    am = torch.ones(B, S, dtype=torch.long)
    ids = torch.full((B, S), -1)
    ids[:, [0, 1, 17]] = 0  # row 17 sees keys 14..17 and 0, 1: text keys 2..13 in between
    fn = mu.and_masks(mu.sliding_window_overlay(4),
                      mu.or_masks(mu.causal_mask_function, mu.blockwise_overlay(ids)))
    assert hb.mask_for(fn, B, S, S, 0, 0, am, "cpu") is None
    # a window that covers every key: the same rows are one interval in the permuted order
    fn = mu.and_masks(mu.sliding_window_overlay(S),
                      mu.or_masks(mu.causal_mask_function, mu.blockwise_overlay(ids)))
    tagged = hb.mask_for(fn, B, S, S, 0, 0, am, "cpu")
    assert tagged is not None and len(hb.spec_of(tagged).groups) == 1


def test_more_groups_than_the_cap_not_claimed():
    from mmcore.patch import hf_scattered
    B, S = 1, 30
    ids = torch.full((B, S), -1)
    n = hf_scattered.MAX_GROUPS + 1
    for g in range(n):
        ids[0, [g, 2 * n + g]] = g  # each group split by text keys
    am = torch.ones(B, S, dtype=torch.long)
    fn = mu.or_masks(mu.causal_mask_function, mu.blockwise_overlay(ids))
    assert hb.mask_for(fn, B, S, S, 0, 0, am, "cpu") is None


def _paligemma_inputs(seed):
    """KV.inputs("paligemma") with random token types (transformers' tester draws them so):
    the prefix group 0 is scattered over image, prompt and answer tokens; holey padding."""
    kw, valid = KV.inputs("paligemma")
    B, S = kw["input_ids"].shape
    g = torch.Generator().manual_seed(seed)
    tti = torch.randint(0, 2, (B, S), generator=g)
    am = kw["attention_mask"].clone()
    am[0, [20, 23]] = 0  # holes
    kw = dict(kw, token_type_ids=tti, attention_mask=am)
    return kw, am.bool()


def test_tiny_paligemma_random_token_types_on_the_op():
    m = KV._model("paligemma")
    mmcore.patch(m)
    kw, valid = _paligemma_inputs(5)
    hfi.STATS.reset()
    m.train()  # dropouts are 0
    KV.compare("paligemma", m, kw, valid)
    assert hfi.STATS.fallback_calls == 0, hfi.STATS.fallback_reasons
    assert hfi.STATS.op_calls == 3, hfi.STATS  # 1 SigLIP + 2 Gemma layers, each one call


def test_dense_path_gets_the_whole_plan_as_its_mask():
    """A call the op cannot serve (e.g. attention dropout while training) takes the dense path
    with the mask of every planned call: HF's mask on the valid rows, empty padded rows."""
    B, S = 3, 21
    am, ids = _layout(B, S, "holey", 7)
    fn = mu.or_masks(mu.causal_mask_function, mu.blockwise_overlay(ids))
    tagged = hb.mask_for(fn, B, S, S, 0, 0, am, "cpu")
    spec = hb.spec_of(tagged)
    assert spec.groups
    q = torch.randn(B, 2, S, 8)
    k = v = torch.randn(B, 1, S, 8)
    seen = []
    out, reason = hb.attend_tagged(_Layer("auto"), q, k, v, tagged, spec, 0.3, None,
                                   "attention dropout while training",
                                   lambda m: seen.append(m) or q)
    assert reason == "attention dropout while training" and out is q
    assert torch.equal(seen[0], _hf_mask(fn, am, B, S))


@pytest.mark.parametrize("padding", ["none", "left", "holey"])
def test_plans_equal_hf_masks_with_offsets_and_other_leaves(padding):
    """The keys every planned call lets a row see == HF's sdpa_mask, at query / key offsets
    (a second prefill chunk, a layer whose keys start later), with a window that covers the
    keys and-ed in, with bidirectional text or-ed in; pure masks, no attention."""
    from mmcore.patch import hf_scattered
    B, S = 3, 24
    am, ids = _layout(B, S, padding, 11)
    base = mu.or_masks(mu.causal_mask_function, mu.blockwise_overlay(ids))
    fns = (base, mu.and_masks(mu.sliding_window_overlay(S), base),
           mu.and_masks(base, mu.chunked_overlay(S, torch.zeros(B, dtype=torch.long))))
    for fn in fns:
        for q_offset, kv_offset in ((0, 0), (9, 0), (13, 5), (23, 2)):
            Sq, Sk = S - q_offset, S - kv_offset
            tagged = hb.mask_for(fn, B, Sq, Sk, q_offset, kv_offset, am, "cpu")
            assert tagged is not None, (q_offset, kv_offset)
            spec = hb.spec_of(tagged)
            km = am.bool()[:, kv_offset:]
            mine = hf_scattered.claim(spec.lo, spec.hi, spec.groups, Sk) & km[:, None, :]
            ref = mu.sdpa_mask(batch_size=B, q_length=Sq, kv_length=Sk, q_offset=q_offset,
                               kv_offset=kv_offset, mask_function=fn,
                               attention_mask=am.bool(), allow_is_causal_skip=False)[:, 0]
            qv = am.bool()[:, q_offset:]
            assert torch.equal(mine[qv], ref[qv]), (q_offset, kv_offset)
            assert not bool(mine[~qv].any())
