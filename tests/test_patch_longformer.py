"""Longformer on window_attention in its common layouts (mmcore.patch.longformer): global
tokens wherever global_attention_mask marks them (different counts per sample, none in some),
left / right / holey padding -- vs HF's own LongformerSelfAttention within the tolerance rule,
forward and gradients, every call on the op."""
import pytest
import torch

import kit_patch as K
import mmcore
from mmcore.patch import hf_interface as hfi


def _globals(am, seed):
    """A random global_attention_mask on valid tokens: ~1 in 6, sample 1 none, sample 0 at
    least its first and last valid tokens (the window edges)."""
    g = torch.Generator().manual_seed(seed)
    gm = (torch.rand(am.shape, generator=g) < 0.17).long() * am
    gm[1] = 0
    valid = torch.nonzero(am[0]).flatten()
    gm[0, valid[0]] = gm[0, valid[-1]] = 1
    return gm


@pytest.mark.parametrize("padding", ["left", "right", "holey"])
def test_longformer_global_tokens_anywhere_with_padding(padding):
    m, kind = K.load("longformer")
    rep = mmcore.patch(m)
    kw = K.inputs(kind, B=3, S=21, padding=padding, seed=2)
    kw["global_attention_mask"] = _globals(kw["attention_mask"], 3)
    hfi.STATS.reset()
    m.train()  # dropouts are 0
    # forward only with padding: HF's fp64 Longformer gives NaN gradients for padded batches
    K.compare("longformer", m, kind, kw, grads=False)
    assert hfi.STATS.fallback_calls == 0, hfi.STATS.fallback_reasons
    assert hfi.STATS.op_calls == 2  # 2 layers (HF pads S=21 to 24 on the right itself)
    assert "global tokens anywhere" in rep.replaced[0][1]


def test_longformer_global_tokens_anywhere_gradients():
    m, kind = K.load("longformer")
    mmcore.patch(m)
    kw = K.inputs(kind, B=3, S=24, padding="none", seed=4)
    # scattered, a different set per sample, the same count (HF's fp64 Longformer gives NaN
    # gradients when the samples' global counts differ: checked with counts [2, 1, 1], [1, 0, 1])
    gm = torch.zeros_like(kw["attention_mask"])
    for b, pos in enumerate(([0, 9, 23], [4, 5, 17], [2, 12, 13])):
        gm[b, pos] = 1
    kw["global_attention_mask"] = gm
    hfi.STATS.reset()
    m.train()
    K.compare("longformer", m, kind, kw)
    assert hfi.STATS.fallback_calls == 0 and hfi.STATS.op_calls == 2, hfi.STATS
