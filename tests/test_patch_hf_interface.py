"""attn_implementation="mmcore" (transformers AttentionInterface + AttentionMaskInterface) vs
"eager" for Mistral / Qwen2 / Llama / Gemma3 tiny configs: sliding windows, GQA, left and right
padding, greedy generation with a rolling (sliding-window) KV cache."""
import pytest
import torch

import kit_patch as K
from mmcore.patch import register
from kit import assert_close
from mmcore.patch import hf_interface as hfi

DECODERS = ["mistral", "qwen2", "llama", "gemma3"]


def _pair(family):
    register()
    eager, kind = K.load(family, "eager")
    ours, _ = K.load(family, "mmcore")
    assert ours.config._attn_implementation == "mmcore"
    return eager, ours


@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("family", DECODERS)
def test_mmcore_equals_eager(family, padding):
    eager, ours = _pair(family)
    oracle = K.load(family, "sdpa")[0].double()
    kw = K.inputs("decoder", B=3, S=23, padding=padding)
    if padding == "none":
        kw.pop("attention_mask")
    hfi.STATS.reset()
    out = ours(**kw).logits
    assert hfi.STATS.op_calls > 0 and hfi.STATS.fallback_calls == 0, hfi.STATS.fallback_reasons
    valid = kw.get("attention_mask", torch.ones(3, 23, dtype=torch.long)).bool()
    assert_close(f"{family}/{padding}", out[valid], oracle(**kw).logits[valid],
                 eager(**kw).logits[valid])


@pytest.mark.parametrize("family", ["mistral", "qwen2", "gemma3"])
def test_greedy_generate_same_tokens_rolling_cache(family):
    """Prompt longer than the sliding window, left-padded batch: same tokens as eager, and the
    sliding layers keep only window - 1 positions (HF's DynamicSlidingWindowLayer)."""
    from transformers.cache_utils import DynamicSlidingWindowLayer
    eager, ours = _pair(family)
    kw = K.inputs("decoder", B=2, S=17, padding="left", seed=3)
    gen = dict(max_new_tokens=9, do_sample=False, return_dict_in_generate=True,
               pad_token_id=0)
    a = eager.generate(**kw, **gen)
    hfi.STATS.reset()
    b = ours.generate(**kw, **gen)
    assert torch.equal(a.sequences, b.sequences)
    assert hfi.STATS.fallback_calls == 0 and hfi.STATS.op_calls > 0
    cache = b.past_key_values
    w = ours.config.sliding_window
    total = kw["input_ids"].shape[1] + 9 - 1
    full_bytes, kept_bytes, sliding = 0, 0, 0
    for layer in cache.layers:
        nbytes = layer.keys.numel() * layer.keys.element_size() * 2
        kept_bytes += nbytes
        full_bytes += nbytes // layer.keys.shape[2] * total
        if isinstance(layer, DynamicSlidingWindowLayer):
            sliding += 1
            assert layer.keys.shape[2] == w - 1
    assert sliding > 0
    assert kept_bytes < full_bytes


def test_generate_static_cache_same_tokens():
    eager, ours = _pair("mistral")
    kw = K.inputs("decoder", B=2, S=9, padding="left", seed=4)
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0,
               cache_implementation="static")
    hfi.STATS.reset()
    b = ours.generate(**kw, **gen)
    a = eager.generate(**kw, **gen)
    assert torch.equal(a, b)
    assert hfi.STATS.fallback_calls == 0


def test_window_convention_exact():
    """HF sliding_window=w (token + w-1 before) -> window=(w-1, 0): a key exactly w back is not
    seen, w-1 back is (checked through the mask function and a one-hot value probe)."""
    from transformers.masking_utils import sliding_window_causal_mask_function
    w, S = 4, 10
    pm = hfi.mmcore_mask(1, S, S, mask_function=sliding_window_causal_mask_function(w),
                         local_size=w)
    assert pm._mmcore_spec == hfi.MaskSpec("causal", w, 0, 0)
    # q = 0 -> uniform weights over the seen keys; v = identity reads the weights out
    q = torch.zeros(1, 1, S, S)
    v = torch.eye(S)[None, None].contiguous()
    out, _ = hfi.mmcore_attention_forward(torch.nn.Module(), q, torch.zeros(1, 1, S, S), v, pm)
    seen = out[0, :, 0] > 0  # (S, S): row i = weights on keys
    for i in range(S):
        for j in range(S):
            assert bool(seen[i, j]) == (i - w < j <= i), (i, j)


def test_mask_function_unknown_pattern_gives_dense_mask():
    from transformers.masking_utils import and_masks, causal_mask_function

    def odd(b, h, q, kv):
        return (q + kv) % 3 != 0
    m = hfi.mmcore_mask(2, 5, 5, mask_function=and_masks(causal_mask_function, odd))
    assert m.dim() == 4 and m.dtype == torch.bool


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["mistral", "gemma3"])
def test_mmcore_equals_eager_cuda_bf16(family):
    """On the device: bf16 patched model (backend auto -> the fastest GPU kernel) vs the
    unpatched bf16 sdpa/eager model; oracle fp64 on the CPU."""
    eager, ours = _pair(family)
    oracle = K.load(family, "sdpa")[0].double()
    kw = K.inputs("decoder", B=3, S=300, padding="left")
    valid = kw["attention_mask"].bool()
    kwc = {k: v.cuda() for k, v in kw.items()}
    out = ours.cuda().to(torch.bfloat16)(**kwc).logits.float().cpu()
    base = eager.cuda().to(torch.bfloat16)(**kwc).logits.float().cpu()
    assert_close(f"{family}/cuda", out[valid], oracle(**kw).logits[valid], base[valid])
