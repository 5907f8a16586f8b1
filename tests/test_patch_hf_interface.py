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


def _run_pair(family, padding, dtype=torch.float32, B=3, S=23):
    """mmcore vs eager (base, same dtype) and sdpa in float64 (oracle) on one padding layout;
    -> the attention call counts."""
    eager, ours = _pair(family)
    oracle = K.load_oracle(family)
    eager, ours = eager.to(dtype), ours.to(dtype)
    kw = K.inputs("decoder", B=B, S=S, padding=padding)
    if padding == "none":
        kw.pop("attention_mask")
    valid = K.valid_rows(kw)
    hfi.STATS.reset()
    with torch.no_grad():
        out = ours(**kw).logits
        stats = hfi.STATS.as_dict()
        assert_close(f"{family}/{padding}/{dtype}", out[valid], oracle(**kw).logits[valid],
                     eager(**kw).logits[valid])
    return stats


def _sliding_layers(family):
    cfg = K.build(family)[0]
    types = getattr(cfg, "layer_types", None)
    if types is None:  # e.g. Mistral: every layer has the window
        return cfg.num_hidden_layers if getattr(cfg, "sliding_window", None) else 0
    return sum(t == "sliding_attention" for t in types)


@pytest.mark.parametrize("padding", ["none", "left", "right", "holey", "packed"])
@pytest.mark.parametrize("family", DECODERS)
def test_mmcore_equals_eager(family, padding):
    """Every padding layout is served by the op: right padding as seqlens, left and holey
    padding compacted per sample, packed rows as segments, and holes inside a sliding-window
    layer (issue 26: they took the dense path) as the op's key_mask on the uncompacted keys."""
    st = _run_pair(family, padding)
    n_layers = K.build(family)[0].num_hidden_layers
    assert st == {"op_calls": n_layers, "fallback_calls": 0, "fallback_reasons": {}}, st


@pytest.mark.parametrize("padding", ["left", "holey"])
@pytest.mark.parametrize("family", ["mistral", "gemma3"])
def test_key_mask_only_for_holes_in_sliding_layers(family, padding, monkeypatch):
    """The op's key_mask serves the sliding-window layers of a holey batch; left padding keeps
    the compaction (every backend serves it), and full-attention layers never need it."""
    calls = []
    real = hfi.window_attention

    def spy(*a, **kw):
        calls.append(kw.get("key_mask") is not None)
        return real(*a, **kw)
    monkeypatch.setattr(hfi, "window_attention", spy)
    _run_pair(family, padding, B=2, S=15)
    assert sum(calls) == (_sliding_layers(family) if padding == "holey" else 0), calls


@pytest.mark.parametrize("padding", ["left", "holey", "packed"])
@pytest.mark.parametrize("family", ["gemma3"])  # sliding + full layers, GQA, head_dim 16
def test_mmcore_equals_eager_bf16(family, padding):
    st = _run_pair(family, padding, torch.bfloat16, B=2, S=21)
    assert st["op_calls"] > 0, st


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("padding", ["none", "right", "left", "holey"])
def test_gemma2_softcap_on_the_op(padding, dtype, monkeypatch):
    """Gemma2 with attn_implementation="mmcore" (issue 26: refused for its logit softcapping):
    sliding and global layers, every padding layout, fp32 and bf16, equal to eager (fp64
    oracle: eager math); every call on the op, with HF's softcap passed to it."""
    caps = []
    real = hfi.window_attention

    def spy(*a, **kw):
        caps.append(kw.get("softcap"))
        return real(*a, **kw)
    monkeypatch.setattr(hfi, "window_attention", spy)
    st = _run_pair("gemma2", padding, dtype, B=2, S=17)
    assert st == {"op_calls": 2, "fallback_calls": 0, "fallback_reasons": {}}, st
    assert caps and all(c == K.build("gemma2")[0].attn_logit_softcapping for c in caps), caps


def test_attention_implementation_switching():
    """set_attn_implementation: eager -> mmcore -> sdpa -> mmcore on one loaded model."""
    register()
    m, _ = K.load("qwen2", "eager")
    oracle = K.load("qwen2", "sdpa")[0].double()
    kw = K.inputs("decoder", B=2, S=15, padding="left")
    valid = K.valid_rows(kw)
    with torch.no_grad():
        ref = oracle(**kw).logits[valid]
        base = m(**kw).logits[valid]
        for impl, served in (("mmcore", True), ("sdpa", False), ("mmcore", True)):
            m.set_attn_implementation(impl)
            assert m.config._attn_implementation == impl
            hfi.STATS.reset()
            out = m(**kw).logits[valid]
            assert (hfi.STATS.op_calls > 0) == served
            assert_close(f"switch to {impl}", out, ref, base)


@pytest.mark.parametrize("family", ["mistral", "qwen2", "gemma3", "gemma2"])
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


def _long_context_reference(family, w, G, am, dtype):
    """The unpatched encoder with an explicit dense 4-D mask of what LongContext stands for:
    key j seen by query i iff |i - j| <= w or j < G or i < G (token indices, as HF's masks
    count them), and key j is not padding."""
    import copy
    m = copy.deepcopy(K.load(family)[0]).to(dtype)
    S = am.shape[1]
    i, j = torch.arange(S)[:, None], torch.arange(S)[None, :]
    allowed = ((i - j).abs() <= w) | (j < G) | (i < G)
    m4 = allowed[None, None] & am.bool()[:, None, None, :]
    return m, torch.where(m4, torch.zeros((), dtype=dtype), torch.finfo(dtype).min)


@pytest.mark.parametrize("compiled", [False, True])
def test_long_context_left_and_holey_padding_on_the_op(compiled):
    """LongContext (window + global tokens) with left and holey padding: issue 26 took the
    dense path for them eagerly ("global tokens with left padding", holes) and raised under
    compile; now the op serves them with the padding as key_mask, equal to the dense
    reference on the valid rows."""
    import mmcore
    w, G = 3, 2
    m, _ = K.load("bert")
    mmcore.patch(m, long_context=mmcore.LongContext(window=w, global_tokens=G, max_length=64))
    fwd = torch.compile(m, fullgraph=True, backend="aot_eager") if compiled else m
    if compiled:
        torch._dynamo.reset()
    for padding in ("left", "holey"):
        kw = K.inputs("encoder", B=2, S=17, padding=padding, seed=9)
        am = kw["attention_mask"]
        valid = am.bool()
        hfi.STATS.reset()
        with torch.no_grad():
            out = fwd(**kw).last_hidden_state[valid]
            if not compiled:
                assert hfi.STATS.as_dict() == {"op_calls": 2, "fallback_calls": 0,
                                               "fallback_reasons": {}}
            res = {}
            for name, dt in (("base", torch.float32), ("oracle", torch.float64)):
                ref, m4 = _long_context_reference("bert", w, G, am, dt)
                res[name] = ref(input_ids=kw["input_ids"], attention_mask=m4) \
                    .last_hidden_state[valid]
        assert_close(f"longctx/{padding}/compiled={compiled}", out, res["oracle"], res["base"])


def test_modernbert_holey_padding_on_the_op(monkeypatch):
    """ModernBERT's local layers (bidirectional window) with holes in the padding: the op with
    key_mask (issue 26: the dense path), forward and gradients equal to HF."""
    import mmcore
    m, kind = K.load("modernbert")
    mmcore.patch(m)
    masked = []
    real = hfi.window_attention

    def spy(*a, **kw):
        masked.append(kw.get("key_mask") is not None)
        return real(*a, **kw)
    monkeypatch.setattr(hfi, "window_attention", spy)
    hfi.STATS.reset()
    m.train()  # a training step (dropouts are 0 in this config)
    K.compare("modernbert", m, kind, K.inputs(kind, B=2, S=19, padding="holey"))
    assert hfi.STATS.as_dict() == {"op_calls": 3, "fallback_calls": 0, "fallback_reasons": {}}
    assert sum(masked) == 2, masked  # layers 1, 2 local; layer 0 global (compacted)
