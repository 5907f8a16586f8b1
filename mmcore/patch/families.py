"""mmcore.patch / mmcore.unpatch: the model walk, per-family rules, and the undo record."""
from __future__ import annotations

import inspect

from torch import nn

from . import hf_interface as hfi
from . import lora as _lora
from . import longformer as _longformer
from .long_context import LongContext, extend_embeddings, restore_embeddings
from .report import PatchReport

_STATE_ATTR = "_mmcore_patch_state"

# Attention classes -> family name, for the report.  Any other attention module whose forward
# dispatches through transformers' AttentionInterface is patched too ("generic").
FAMILIES = {
    "BertSelfAttention": "bert", "BertCrossAttention": "bert",
    "RobertaSelfAttention": "roberta", "RobertaCrossAttention": "roberta",
    "XLMRobertaSelfAttention": "xlm-roberta", "XLMRobertaCrossAttention": "xlm-roberta",
    "ModernBertAttention": "modernbert",
    "CLIPAttention": "clip", "SiglipAttention": "siglip",
    "MistralAttention": "mistral", "Qwen2Attention": "qwen2", "LlamaAttention": "llama",
    "Gemma3Attention": "gemma3", "Gemma2Attention": "gemma2", "GemmaAttention": "gemma",
    "MllamaTextSelfAttention": "mllama", "MllamaTextCrossAttention": "mllama",
    "MllamaVisionAttention": "mllama",
}

# Attention modules with their own code path (no AttentionInterface) that mmcore maps itself.
OWN_MAPPING = {"LongformerSelfAttention": "longformer"}
UNSUPPORTED: dict = {}

_USES_INTERFACE: dict = {}


def _uses_interface(cls) -> bool:
    """Does this attention class dispatch through transformers' AttentionInterface?"""
    ok = _USES_INTERFACE.get(cls)
    if ok is None:
        try:
            src = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            src = ""
        ok = _USES_INTERFACE[cls] = "ALL_ATTENTION_FUNCTIONS" in src
    return ok


def _get_impl(config):
    return getattr(config, "_attn_implementation", None)


def _set_impl(config, value):
    # Set on this config only (the public setter recurses into sub-configs).
    if "_attn_implementation_internal" in config.__dict__ or hasattr(
            type(config), "_attn_implementation_internal"):
        config._attn_implementation_internal = value
    else:  # pragma: no cover - other layouts
        config._attn_implementation = value


def _attention_modules(model):
    """-> list of (name, module, kind) with kind "interface" | "unsupported" | "opaque"."""
    out = []
    for name, mod in model.named_modules():
        cname = type(mod).__name__
        if cname in OWN_MAPPING:
            out.append((name, mod, "own"))
            continue
        if cname in UNSUPPORTED:
            out.append((name, mod, "unsupported"))
            continue
        if "Attention" not in cname:
            continue
        if hasattr(mod, "config") and _uses_interface(type(mod)):
            out.append((name, mod, "interface"))
        elif cname in FAMILIES:
            out.append((name, mod, "opaque"))
        else:
            inner = any("Attention" in type(c).__name__ for _, c in mod.named_modules()
                        if c is not mod)
            direct = any(isinstance(c, nn.Linear) for c in mod.children())
            if direct and not inner:
                out.append((name, mod, "opaque"))
    return out


def _config_problem(config):
    if getattr(config, "output_attentions", False):
        return "config.output_attentions=True needs the attention weights; left on HF's " \
               "implementation"
    return None


def _embeddings_for(model, attn_name):
    """The embeddings module that feeds an encoder attention module (walk up the name)."""
    parts = attn_name.split(".")
    for i in range(len(parts), -1, -1):
        prefix = ".".join(parts[:i])
        try:
            sub = model.get_submodule(prefix) if prefix else model
        except AttributeError:
            continue
        emb = getattr(sub, "embeddings", None)
        if emb is not None and isinstance(getattr(emb, "position_embeddings", None),
                                          nn.Embedding):
            return (prefix + ".embeddings") if prefix else "embeddings", emb
    return None, None


def patch(model, *, attention=True, lora=True, long_context=None, backend="auto",
          lora_route="auto") -> PatchReport:
    """Swap, in place, the attention (and peft LoRA) layers of a loaded HF model for mmcore ops.

    attention: switch every attention module that dispatches through HF's AttentionInterface
        (BERT/RoBERTa/XLM-R, ModernBERT, CLIP/SigLIP towers, Mistral/Qwen2/Llama, Gemma2 (its
        logit softcapping on the op's ``softcap``), Gemma3, PaliGemma, mllama, and any other
        such model) to the ``"mmcore"`` implementation; weights and the module tree are
        untouched.  Longformer's own self-attention (no AttentionInterface) is mapped by mmcore
        itself (window + global tokens wherever ``global_attention_mask`` marks them, any
        padding; output_attentions=True too).  Modules that cannot be served exactly
        (config.output_attentions=True on AttentionInterface models, attention modules that
        do not use the interface) are left and reported.
    lora: peft ``lora.Linear`` layers keep their class's whole API and run their forward on
        ``mmcore.ops.lora_linear`` (``mmcore.nn.convert_peft_model``); ``lora_route`` is kept
        for compatibility: "auto", "wrap" and "convert" all take this route.
    long_context: a :class:`LongContext` for absolute-position encoders (BERT family):
        window (w, w) + G global tokens in every self-attention layer, a position table
        extended to ``max_length`` tokens, and longer inputs refused.  The tokenizer is yours
        to set: ``long_context.fit_tokenizer(tokenizer)``.
    backend: mmcore backend for the attention ops ("auto" picks the fastest).
    Returns a :class:`PatchReport`.  :func:`unpatch` restores the original model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if long_context is not None and not isinstance(long_context, LongContext):
        raise TypeError("long_context must be a mmcore.LongContext or None, got "
                        f"{type(long_context).__name__}")
    if long_context is not None and not attention:
        raise ValueError("long_context needs attention=True (windowed attention)")
    if lora_route not in ("auto", "wrap", "convert"):
        raise ValueError(f"lora_route must be 'auto', 'wrap' or 'convert', got {lora_route!r}")
    if getattr(model, _STATE_ATTR, None) is not None:
        unpatch(model)
    hfi.register()
    report = PatchReport(runtime=hfi.Stats())
    state = {"configs": [], "modules": [], "embeddings": [], "lora": False,
             "longformer": []}

    if attention:
        _patch_attention(model, report, state, long_context, backend)
    if lora:
        rep, left, state["lora"] = _lora.convert(model, backend)
        report.replaced.extend(rep)
        report.left.extend(left)
    setattr(model, _STATE_ATTR, state)
    return report


def _patch_attention(model, report, state, long_context, backend):
    mods = _attention_modules(model)
    by_config = {}
    for name, mod, kind in mods:
        if kind == "own":  # Longformer: its wrapper serves output_attentions=True too
            state["longformer"].append(_longformer.wrap(mod, backend))
            state["modules"].append((mod, mod.__dict__.get(hfi.OVERRIDE_ATTR),
                                     mod.__dict__.get("_mmcore_backend")))
            mod.__dict__[hfi.STATS_ATTR] = report.runtime
            report.replaced.append((name, f"{type(mod).__name__} (longformer) forward -> "
                                          "mmcore window_attention (window + global tokens "
                                          "anywhere, any padding; global rows on the "
                                          "*_global projections)"))
            if long_context is not None:
                report.notes.append(f"{name}: LongContext not applied (Longformer already "
                                    "has its own window and position table)")
        elif kind == "unsupported":
            report.left.append((name, UNSUPPORTED[type(mod).__name__]))
        elif kind == "opaque":
            report.left.append((name, f"{type(mod).__name__} does not dispatch through HF's "
                                      "AttentionInterface; left unchanged"))
        else:
            by_config.setdefault(id(mod.config), (mod.config, []))[1].append((name, mod))
    switched = []
    for config, members in by_config.values():
        why = _config_problem(config)
        if why is not None:
            for name, mod in members:
                report.left.append((name, why))
            continue
        prior = _get_impl(config)
        state["configs"].append((config, prior))
        _set_impl(config, hfi.NAME)
        switched.append(config)
        for name, mod in members:
            fam = FAMILIES.get(type(mod).__name__, "generic")
            state["modules"].append((mod, mod.__dict__.get(hfi.OVERRIDE_ATTR),
                                     mod.__dict__.get("_mmcore_backend")))
            mod._mmcore_backend = backend
            # output_attentions=True gets the weights where the model's attention gave them
            # (eager), None as with sdpa elsewhere (hf_interface.weights_wanted)
            mod.__dict__[hfi.EAGER_WEIGHTS_ATTR] = prior == "eager"
            mod.__dict__[hfi.STATS_ATTR] = report.runtime
            what = f"{type(mod).__name__} ({fam}) -> attn_implementation='mmcore'"
            if long_context is not None:
                ok = _apply_long_context(model, name, mod, long_context, report, state)
                if ok:
                    what += (f" + LongContext window={long_context.window} "
                             f"global_tokens={long_context.global_tokens}")
            report.replaced.append((name, what))
    # keep the top-level config in line (it is what users read), if it is a separate object
    top = getattr(model, "config", None)
    if switched and top is not None and hasattr(top, "_attn_implementation") and \
            all(id(top) != id(c) for c, _ in state["configs"]):
        state["configs"].append((top, _get_impl(top)))
        _set_impl(top, hfi.NAME)
    if switched:
        report.notes.append("per call, the mmcore attention falls back to a dense torch path "
                            "(exact; counted in report.runtime) for mask patterns that are not "
                            "one key interval per query row (and any image / prefix mask under "
                            "torch.compile); attention dropout while training runs on the op's "
                            "dropout_p; a forward asked for output_attentions=True gets the "
                            "weights from the dense path where the model was on eager "
                            "attention (None, as sdpa, where it was on sdpa)")


def _apply_long_context(model, name, mod, lc, report, state):
    cname = type(mod).__name__
    if "CrossAttention" in cname or getattr(mod, "is_causal", False) or \
            getattr(getattr(mod, "config", None), "is_decoder", False):
        report.notes.append(f"{name}: LongContext not applied (causal / cross attention)")
        return False
    emb_name, emb = _embeddings_for(model, name)
    cfg = mod.config
    if emb is None or getattr(cfg, "position_embedding_type", "absolute") != "absolute":
        report.notes.append(f"{name}: LongContext not applied (no absolute learned position "
                            "table; rotary models already extrapolate positions)")
        return False
    if all(e is not emb for e, _ in ((u["emb"], u) for u in state["embeddings"])):
        undo = extend_embeddings(emb, cfg, lc.max_length)
        state["embeddings"].append(undo)
        if undo["extended"]:
            report.notes.append(f"{emb_name}.position_embeddings extended to "
                                f"{emb.position_embeddings.num_embeddings} rows by repeating "
                                "the trained table")
        report.notes.append(f"{emb_name}: inputs longer than max_length={lc.max_length} tokens "
                            "are refused; set the tokenizer's length with "
                            "long_context.fit_tokenizer(tokenizer)")
    mod._mmcore_attention = hfi.AttentionOverride(tuple(lc.window), lc.global_tokens)
    return True


def unpatch(model):
    """Undo :func:`patch`: attention implementations, per-module settings, position tables,
    LoRA layers.  A model that was never patched is returned unchanged."""
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        return model
    _lora.unconvert(model, state["lora"])
    for undo in state.get("longformer", []):
        _longformer.unwrap(undo)
    for undo in reversed(state["embeddings"]):
        restore_embeddings(undo)
    for mod, override, backend in state["modules"]:
        mod.__dict__.pop(hfi.STATS_ATTR, None)
        mod.__dict__.pop(hfi.EAGER_WEIGHTS_ATTR, None)
        for attr, val in ((hfi.OVERRIDE_ATTR, override), ("_mmcore_backend", backend)):
            if val is None:
                mod.__dict__.pop(attr, None)
            else:
                setattr(mod, attr, val)
    for config, impl in reversed(state["configs"]):
        _set_impl(config, impl)
    try:
        delattr(model, _STATE_ATTR)
    except AttributeError:
        model.__dict__.pop(_STATE_ATTR, None)
    return model
