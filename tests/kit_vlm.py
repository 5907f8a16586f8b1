"""Tiny random vision-language models (mllama, PaliGemma, Gemma-3) built from transformers
config classes, their inputs (images with different tile counts, prefixes, image blocks,
padding), and the tolerance rule on the patched model vs eager (fp32 base, fp64 oracle)."""
from __future__ import annotations

import copy

import torch

import kit_patch  # noqa: F401 - HF offline / quiet logging
from kit import assert_close

V = 97
IMG = 96  # image token id
_SIG = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
            image_size=16, patch_size=4)
_CACHE: dict = {}


def config(name):
    """-> (config, model class) of the tiny `name` model (attention implementation unset)."""
    import transformers as T
    if name == "mllama":
        vc = dict(hidden_size=32, num_hidden_layers=2, num_global_layers=1,
                  attention_heads=4, intermediate_size=37, vision_output_dim=64,
                  image_size=16, patch_size=8, max_num_tiles=4,
                  intermediate_layers_indices=[0],
                  supported_aspect_ratios=[[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2],
                                           [3, 1], [4, 1]])
        tc = dict(vocab_size=V, hidden_size=32, num_hidden_layers=3,
                  cross_attention_layers=[1], num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=37,
                  max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2)
        cfg = T.MllamaConfig(vision_config=vc, text_config=tc, image_token_index=IMG)
        cls = T.MllamaForConditionalGeneration
    elif name == "paligemma":
        cfg = T.PaliGemmaConfig(
            vision_config=_SIG, image_token_index=IMG, projection_dim=32,
            text_config=dict(model_type="gemma", vocab_size=V, hidden_size=32,
                             intermediate_size=37, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                             pad_token_id=0))
        cls = T.PaliGemmaForConditionalGeneration
    elif name == "gemma3":
        cfg = T.Gemma3Config(
            vision_config=_SIG, mm_tokens_per_image=4, image_token_index=IMG,
            boi_token_index=94, eoi_token_index=95,
            text_config=dict(vocab_size=V, hidden_size=32, intermediate_size=37,
                             num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=8, sliding_window=5,
                             layer_types=["sliding_attention", "full_attention"],
                             pad_token_id=0))
        cls = T.Gemma3ForConditionalGeneration
    else:
        raise KeyError(name)
    return cfg, cls


def _model(name):
    """A fresh fp32 eager model of `name` (same weights every call)."""
    if name not in _CACHE:
        torch.manual_seed(0)
        cfg, cls = config(name)
        _CACHE[name] = cls._from_config(cfg, attn_implementation="eager").eval()
    return copy.deepcopy(_CACHE[name])


def inputs(name, seed=1, padding="right"):
    """-> (model kwargs, valid query rows (B, S) bool).  padding: "right" or "left" (mllama;
    left for generate)."""
    g = torch.Generator().manual_seed(seed)
    if name == "mllama":
        # sample 0: text rows 0-1 see no image, image 0 (4 tiles) from row 2, image 1
        # (2 tiles) from row 6 on together with image 0; sample 1: one image of 3 tiles and an
        # empty image slot, 3 padding tokens (right: after the text; left: before the image)
        B, S, M, Ti = 2, 11, 2, 4
        ids = torch.randint(3, 90, (B, S), generator=g)
        p = 3 if padding == "left" else 0
        ids[0, 2] = ids[0, 6] = ids[1, p] = IMG
        am = torch.ones(B, S, dtype=torch.long)
        if padding == "left":
            am[1, :p] = 0
            ids[1, :p] = 0
        else:
            am[1, -3:] = 0
        cam = torch.zeros(B, S, M, Ti, dtype=torch.long)
        cam[0, 2:, 0, :4] = 1
        cam[0, 6:, 1, :2] = 1
        cam[1, p:, 0, :3] = 1
        kw = dict(input_ids=ids, attention_mask=am,
                  pixel_values=torch.randn(B, M, Ti, 3, 16, 16, generator=g),
                  aspect_ratio_ids=torch.tensor([[6, 2], [5, 0]]),
                  aspect_ratio_mask=torch.tensor([[[1, 1, 1, 1], [1, 1, 0, 0]],
                                                  [[1, 1, 1, 0], [0, 0, 0, 0]]]),
                  cross_attention_mask=cam)
        return kw, am.bool()
    if name == "paligemma":
        # 16 image tokens + prompt = the bidirectional prefix, then the causal suffix;
        # sample 1 left-padded, sample 2 right-padded (padding has token type 0)
        n, B, S = 16, 3, 26
        ids = torch.randint(3, 90, (B, S), generator=g)
        am = torch.ones(B, S, dtype=torch.long)
        tti = torch.ones(B, S, dtype=torch.long)
        for b, (pad_l, prompt, pad_r) in enumerate(((0, 3, 0), (2, 5, 0), (0, 2, 3))):
            ids[b, pad_l:pad_l + n] = IMG
            tti[b, :pad_l + n + prompt] = 0
            am[b, :pad_l] = 0
            if pad_r:
                am[b, S - pad_r:] = 0
                tti[b, S - pad_r:] = 0
            ids[b, :pad_l] = 0
        kw = dict(input_ids=ids, attention_mask=am, token_type_ids=tti,
                  pixel_values=torch.randn(B, 3, 16, 16, generator=g))
        return kw, am.bool()
    if name == "gemma3":
        # image blocks of 4 tokens (bidirectional inside causal / sliding-window-5 text):
        # sample 0 two blocks, sample 1 left padding and two adjacent blocks
        B, S = 2, 20
        ids = torch.randint(3, 90, (B, S), generator=g)
        for b, starts in enumerate(((3, 10), (8, 12))):
            for s in starts:
                ids[b, s:s + 4] = IMG
        am = torch.ones(B, S, dtype=torch.long)
        am[1, :2] = 0
        ids[1, :2] = 0
        kw = dict(input_ids=ids, attention_mask=am, token_type_ids=(ids == IMG).long(),
                  pixel_values=torch.randn(4, 3, 16, 16, generator=g))
        return kw, am.bool()
    raise KeyError(name)


def oracle_model(name):
    """The unpatched model in float64 on HF's sdpa path (CPU fp64 sdpa is exact math; HF's
    eager mllama gives NaN in fp64 for an empty image slot: its masked tiles' values reach
    the cross-attention through weights of 0)."""
    m = _model(name).double()
    m.set_attn_implementation("sdpa")
    return m


def _loss(logits, valid, seed=7):
    t = logits[valid]
    g = torch.Generator().manual_seed(seed)
    return (t * torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype)).sum()


def compare(name, patched, kw, valid, grads=True, params=("q_proj.weight",)):
    """The tolerance rule on the logits (valid rows) and on the gradients of the parameters
    whose names end with one of `params`: patched vs eager fp32 (base) and sdpa fp64."""
    base = _model(name)
    oracle = oracle_model(name)
    kw64 = {k: (v.double() if v.is_floating_point() else v) for k, v in kw.items()}
    res = {}
    for tag, m, args in (("patched", patched, kw), ("base", base, kw), ("oracle", oracle, kw64)):
        m.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(grads):
            logits = m(**args).logits
            if grads:
                _loss(logits, valid).backward()
        res[tag] = (logits.detach(), {n: p.grad for n, p in m.named_parameters()
                                      if p.grad is not None and n.endswith(params)})
    assert_close(f"{name}.logits", res["patched"][0][valid], res["oracle"][0][valid],
                 res["base"][0][valid])
    if grads:
        assert res["oracle"][1]
        for n, gr in res["oracle"][1].items():
            assert n in res["patched"][1], f"{name}: no gradient for {n}"
            assert_close(f"{name}.grad[{n}]", res["patched"][1][n], gr, res["base"][1][n],
                         grad=True)
