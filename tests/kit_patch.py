"""Helpers for the mmcore.patch tests: tiny random HF models per family (built from
transformers config classes, saved with save_pretrained as safetensors and loaded back),
inputs with padding, and the tolerance rule applied to model outputs and gradients."""
from __future__ import annotations

import os
import tempfile

import torch

from kit import assert_close

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

V = 97  # vocab
IMAGE_TOKEN = 1  # llava_onevision's image placeholder id (text ids are drawn from [3, V))
IMAGE_TOKENS = 10  # features per 16x16 image of the tiny llava_onevision config (base + 1 tile)
try:
    from transformers.utils import logging as _hf_logging
    _hf_logging.disable_progress_bar()
    _hf_logging.set_verbosity_error()
except Exception:  # noqa: BLE001
    pass


def _enc_kw(**kw):
    d = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=37, max_position_embeddings=64, attention_probs_dropout_prob=0.0,
             hidden_dropout_prob=0.0)
    d.update(kw)
    return d


def _dec_kw(**kw):
    d = dict(vocab_size=V, hidden_size=64, intermediate_size=72, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             attention_dropout=0.0, pad_token_id=0)
    d.update(kw)
    return d


def build(family):
    """-> (config, model class, kind) for a tiny random model of `family`."""
    import transformers as T
    if family == "bert":
        return T.BertConfig(**_enc_kw()), T.BertModel, "encoder"
    if family == "roberta":
        return T.RobertaConfig(**_enc_kw(pad_token_id=1, max_position_embeddings=66)), \
            T.RobertaModel, "encoder"
    if family == "xlm-roberta":
        return T.XLMRobertaConfig(**_enc_kw(pad_token_id=1, max_position_embeddings=66)), \
            T.XLMRobertaModel, "encoder"
    if family == "longformer":
        cfg = T.LongformerConfig(**_enc_kw(pad_token_id=1, max_position_embeddings=70,
                                           attention_window=8))
        return cfg, T.LongformerModel, "encoder"
    if family == "modernbert":
        cfg = T.ModernBertConfig(vocab_size=V, hidden_size=32, intermediate_size=40,
                                 num_hidden_layers=3, num_attention_heads=4, local_attention=8,
                                 global_attn_every_n_layers=3, max_position_embeddings=128,
                                 pad_token_id=0, attention_dropout=0.0, mlp_dropout=0.0,
                                 embedding_dropout=0.0)
        return cfg, T.ModernBertModel, "encoder"
    if family == "clip":
        cfg = T.CLIPConfig(text_config=dict(vocab_size=V, hidden_size=32, intermediate_size=37,
                                            num_hidden_layers=2, num_attention_heads=4,
                                            max_position_embeddings=40),
                           vision_config=dict(hidden_size=32, intermediate_size=37,
                                              num_hidden_layers=2, num_attention_heads=4,
                                              image_size=24, patch_size=8),
                           projection_dim=16)
        return cfg, T.CLIPModel, "dual"
    if family == "siglip":
        cfg = T.SiglipConfig(text_config=dict(vocab_size=V, hidden_size=32,
                                              intermediate_size=37, num_hidden_layers=2,
                                              num_attention_heads=4,
                                              max_position_embeddings=40),
                             vision_config=dict(hidden_size=32, intermediate_size=37,
                                                num_hidden_layers=2, num_attention_heads=4,
                                                image_size=24, patch_size=8))
        return cfg, T.SiglipModel, "dual"
    if family == "mistral":
        return T.MistralConfig(**_dec_kw(sliding_window=6)), T.MistralForCausalLM, "decoder"
    if family == "qwen2":
        cfg = T.Qwen2Config(**_dec_kw(num_hidden_layers=3, use_sliding_window=True,
                                      sliding_window=5, max_window_layers=1))
        return cfg, T.Qwen2ForCausalLM, "decoder"
    if family == "llama":
        return T.LlamaConfig(**_dec_kw()), T.LlamaForCausalLM, "decoder"
    if family == "gemma3":
        cfg = T.Gemma3TextConfig(**_dec_kw(head_dim=16, sliding_window=5,
                                           layer_types=["sliding_attention", "full_attention"],
                                           query_pre_attn_scalar=16))
        return cfg, T.Gemma3ForCausalLM, "decoder"
    if family == "qwen2-full":  # HF's default Qwen2 (use_sliding_window=False): full attention only
        return T.Qwen2Config(**_dec_kw()), T.Qwen2ForCausalLM, "decoder"
    if family == "llava_onevision":  # Qwen2 text backbone + SigLIP tower, 10 tokens per image
        cfg = T.LlavaOnevisionConfig(
            text_config=dict(model_type="qwen2", **_dec_kw(hidden_size=32, intermediate_size=37)),
            vision_config=dict(model_type="siglip_vision_model", image_size=16, patch_size=8,
                               hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                               intermediate_size=37),
            image_token_index=IMAGE_TOKEN, vision_feature_select_strategy="full",
            vision_feature_layer=-1, image_grid_pinpoints=[[16, 16]])
        return cfg, T.LlavaOnevisionForConditionalGeneration, "vlm"
    if family == "gemma2":
        # scores up to ~8 (initializer_range 0.2) under a cap of 2: the softcap changes the
        # logits by ~1.8, far beyond any tolerance (HF's default cap, 50, would be a no-op)
        cfg = T.Gemma2Config(**_dec_kw(head_dim=16, sliding_window=5,
                                       layer_types=["sliding_attention", "full_attention"],
                                       query_pre_attn_scalar=16, initializer_range=0.2,
                                       attn_logit_softcapping=2.0))
        return cfg, T.Gemma2ForCausalLM, "decoder"
    raise KeyError(family)


_CACHE = {}


def load(family, attn="eager", seed=0):
    """A tiny model of `family`, round-tripped through save_pretrained (safetensors) and
    from_pretrained.  Returns a fresh fp32 model in eval mode (weights cached per family)."""
    key = (family, seed)
    if key not in _CACHE:
        cfg, cls, kind = build(family)
        torch.manual_seed(seed)
        m = cls._from_config(cfg, attn_implementation="eager")
        d = tempfile.mkdtemp(prefix=f"mmcore_{family}_")
        m.save_pretrained(d, safe_serialization=True)
        assert any(f.endswith(".safetensors") for f in os.listdir(d))
        _CACHE[key] = (d, cls, kind)
    d, cls, kind = _CACHE[key]
    m = cls.from_pretrained(d, attn_implementation=attn, dtype=torch.float32)
    return m.eval(), kind


def inputs(kind, B=3, S=19, seed=1, padding="right"):
    """Token ids (+ pixels for dual towers, + one image per sample for "vlm") and a padding
    layout: "none", "right", "left", "holey" (left padding plus holes inside the valid
    tokens), or "packed" (no attention mask; position_ids restart inside each row, as a
    packing collator makes them)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, S), generator=g)
    am = torch.ones(B, S, dtype=torch.long)
    lens = [S, S - 5, max(1, S // 2)][:B]
    for b, n in enumerate(lens):
        if padding == "right":
            am[b, n:] = 0
        elif padding in ("left", "holey"):
            am[b, :S - n] = 0
    if padding == "holey":
        am[0, S // 3] = 0
        if B > 1:
            am[1, S - 3:S - 1] = 0
    kw = {"input_ids": ids, "attention_mask": am}
    if padding == "packed":
        cuts = [[0, S // 3, S], [0, 2, S // 2 + 1, S], [0, S]]
        pos = torch.zeros(B, S, dtype=torch.long)
        for b in range(B):
            c = cuts[b % 3]
            for lo, hi in zip(c[:-1], c[1:]):
                pos[b, lo:hi] = torch.arange(hi - lo)
        kw = {"input_ids": ids, "position_ids": pos, "use_cache": False}
    if kind == "dual":
        kw["pixel_values"] = torch.randn(B, 3, 24, 24, generator=g)
    if kind == "vlm":  # one image per sample: its placeholders open the valid tokens
        for b in range(B):
            first = int(am[b].nonzero()[0])
            ids[b, first:first + IMAGE_TOKENS] = IMAGE_TOKEN
        kw["pixel_values"] = torch.randn(B, 2, 3, 16, 16, generator=g)
        kw["image_sizes"] = torch.tensor([[16, 16]] * B)
    return kw


def valid_rows(kw):
    """(B, S) bool: the rows whose outputs are defined (padding rows are not)."""
    if "attention_mask" in kw:
        return kw["attention_mask"].bool()
    return torch.ones(kw["input_ids"].shape, dtype=torch.bool)


def outputs(model, kind, kw):
    """-> dict name -> (tensor, valid-row mask or None)."""
    o = model(**kw)
    am = kw["attention_mask"].bool()
    if kind == "encoder":
        return {"last_hidden_state": (o.last_hidden_state, am)}
    if kind == "decoder":
        return {"logits": (o.logits, am)}
    return {"text_embeds": (o.text_embeds, None), "image_embeds": (o.image_embeds, None)}


def _select(t, valid):
    return t[valid] if valid is not None else t


def loss_of(outs, seed=7):
    g = torch.Generator().manual_seed(seed)
    tot = 0
    for name in sorted(outs):
        t, valid = outs[name]
        t = _select(t, valid)
        r = torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype)
        tot = tot + (t * r).sum()
    return tot


EAGER64 = "eager_fp64_softmax"  # a test-only attention implementation (see _eager64)


def _eager64(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
             softcap=None, **kwargs):
    """HF's eager attention math (GQA by repeat, softcap before the additive mask) with the
    softmax in the input's dtype.  HF's own eager takes the softmax in float32, where fp64's
    finfo.min mask becomes -inf: the rows of left-padding tokens turn NaN and spread."""
    rep = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
    w = (query @ key.transpose(2, 3)) * scaling
    if softcap is not None:
        w = torch.tanh(w / softcap) * softcap
    if attention_mask is not None:
        w = w + attention_mask[:, :, :, :key.shape[-2]]
    w = torch.softmax(w, dim=-1)
    return (w @ value).transpose(1, 2).contiguous(), None


def load_oracle(family):
    """The fp64 oracle: the unpatched model on HF's sdpa path (CPU fp64 sdpa is exact math;
    HF's eager path gives NaN in fp64 for ModernBERT and Gemma2); for families without an
    sdpa path, Gemma2 on ``_eager64`` and the others (Longformer) on eager."""
    try:
        return load(family, "sdpa")[0].double()
    except ValueError:
        pass
    if family == "gemma2":
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, eager_mask
        AttentionInterface.register(EAGER64, _eager64)
        AttentionMaskInterface.register(EAGER64, eager_mask)
        return load(family, EAGER64)[0].double()
    return load(family, "eager")[0].double()


def compare(family, patched, kind, kw, grads=True, params=3):
    """Apply the tolerance rule to `patched` vs a fresh unpatched fp32 eager base and a fp64
    oracle (same weights), forward outputs and (optionally) parameter gradients."""
    base, _ = load(family, "eager")
    oracle = load_oracle(family)
    kw64 = {k: (v.double() if v.is_floating_point() else v) for k, v in kw.items()}
    res = {}
    for name, m, args in (("patched", patched, kw), ("base", base, kw), ("oracle", oracle, kw64)):
        m.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(grads):
            outs = outputs(m, kind, args)
            if grads:
                loss_of(outs).backward()
        res[name] = (outs, {n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    for name in res["oracle"][0]:
        o, valid = res["oracle"][0][name]
        assert_close(f"{family}.{name}", _select(res["patched"][0][name][0], valid),
                     _select(o, valid), _select(res["base"][0][name][0], valid))
    if grads:
        names = _grad_names(res["oracle"][1], params)
        assert names
        for n in names:
            assert n in res["patched"][1], f"{family}: no gradient for {n} in the patched model"
            assert_close(f"{family}.grad[{n}]", res["patched"][1][n], res["oracle"][1][n],
                         res["base"][1][n], grad=True)
    return res


def _grad_names(grads, k):
    """A few parameters spread over the model, attention projections first."""
    names = list(grads)
    attn = [n for n in names if any(t in n for t in ("query.weight", "q_proj.weight",
                                                     "Wqkv.weight", "key.weight",
                                                     "k_proj.weight"))]
    pick = attn[:2] + attn[-1:] + names[:1] + names[-1:]
    out = []
    for n in pick:
        if n not in out:
            out.append(n)
    return out[:max(k, 3) + 2]
