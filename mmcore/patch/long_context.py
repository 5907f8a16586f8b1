"""LongContext: let an absolute-position encoder (BERT / RoBERTa / XLM-R) read long inputs.

The Longformer recipe: every self-attention layer becomes a bidirectional sliding window
``window=(w, w)`` plus ``G`` global tokens (the first G tokens: CLS / a question prefix, seen
by and seeing every token), and the learned position table is extended by repeating its
trained rows (``table[offset:offset + trained]`` copied again and again), so that position ids
past ``max_position_embeddings`` are valid.  The position_ids / token_type_ids buffers are
extended to match.  Inputs longer than ``max_length`` are refused with a ``ValueError`` naming
both lengths (a forward pre-hook on the embeddings).  :func:`mmcore.unpatch` restores the
original table, buffers, config and removes the hook.

The tokenizer is not part of the model: ``LongContext.fit_tokenizer(tokenizer)`` sets its
``model_max_length`` to ``max_length`` (otherwise a BERT tokenizer warns past 512 tokens and
``truncation=True`` cuts at 512).
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn


@dataclasses.dataclass(frozen=True)
class LongContext:
    """Long-input settings for :func:`mmcore.patch`.

    window: w (-> ``window=(w, w)``) or a ``(left, right)`` pair, ints >= 0.
    global_tokens: G >= 0, the first G tokens of every sequence are global.
    max_length: the longest input (in tokens) the patched model accepts; the position table
        is extended to cover it, longer input raises a ``ValueError``.

    A window changes the model: even at lengths the encoder was trained on (e.g. 512 tokens
    with ``window=256``), token i no longer sees tokens further than w away, so outputs differ
    from the unpatched model's.  Only a window >= the input length reproduces it.
    """
    window: object = 256
    global_tokens: int = 1
    max_length: int = 16384

    def __post_init__(self):
        w = self.window
        if isinstance(w, int) and not isinstance(w, bool):
            pair = (w, w)
        elif isinstance(w, (tuple, list)) and len(w) == 2:
            pair = tuple(w)
        else:
            raise ValueError(f"LongContext.window must be an int or a (left, right) pair, "
                             f"got {w!r}")
        for x in pair:
            if not isinstance(x, int) or isinstance(x, bool) or x < 0:
                raise ValueError(f"LongContext.window entries must be ints >= 0, got {w!r}")
        object.__setattr__(self, "window", pair)
        G = self.global_tokens
        if not isinstance(G, int) or isinstance(G, bool) or G < 0:
            raise ValueError(f"LongContext.global_tokens must be an int >= 0, got {G!r}")
        m = self.max_length
        if not isinstance(m, int) or isinstance(m, bool) or m < 1:
            raise ValueError(f"LongContext.max_length must be an int >= 1, got {m!r}")

    def fit_tokenizer(self, tokenizer):
        """Set ``tokenizer.model_max_length = max_length`` (in place) and return the tokenizer,
        so that it does not warn past the encoder's trained length and ``truncation=True``
        cuts at ``max_length`` instead of at 512."""
        if not hasattr(tokenizer, "model_max_length"):
            raise TypeError("LongContext.fit_tokenizer needs a Hugging Face tokenizer (an object "
                            f"with model_max_length), got {type(tokenizer).__name__}")
        tokenizer.model_max_length = self.max_length
        return tokenizer


def position_offset(emb) -> int:
    """First learned position row: RoBERTa-style embeddings start at padding_idx + 1."""
    if hasattr(emb, "create_position_ids_from_input_ids") and getattr(emb, "padding_idx", None) \
            is not None:
        return int(emb.padding_idx) + 1
    return 0


def _input_length(args, kwargs):
    """Sequence length of an embeddings call (input_ids (B, S) or inputs_embeds (B, S, H))."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    if isinstance(ids, torch.Tensor):
        return ids.shape[-1]
    embeds = kwargs.get("inputs_embeds", args[3] if len(args) > 3 else None)
    if isinstance(embeds, torch.Tensor):
        return embeds.shape[-2]
    return None


def guard_length(emb, max_length: int):
    """Refuse, before the embeddings run, an input longer than ``max_length`` tokens with an
    error naming both lengths (instead of HF's shape error deep inside the embeddings).
    Returns the hook handle."""
    def check(_module, args, kwargs):
        n = _input_length(args, kwargs)
        past = kwargs.get("cache_length", kwargs.get("past_key_values_length", 0))
        if n is not None and isinstance(past, int):
            n += past
        if n is not None and n > max_length:
            raise ValueError(
                f"input of {n} tokens is longer than LongContext max_length={max_length}: "
                f"patch with mmcore.LongContext(max_length>={n}), or cut the input to "
                f"{max_length} tokens (tokenizer(..., truncation=True, max_length={max_length}))")
    return emb.register_forward_pre_hook(check, with_kwargs=True)


def extend_embeddings(emb, config, max_length: int):
    """Extend ``emb.position_embeddings`` (and its buffers) to ``max_length`` positions by
    repeating the trained rows, and refuse longer inputs (:func:`guard_length`).

    Returns an undo record for :func:`restore_embeddings`; ``undo["extended"]`` is False when
    the table already covered ``max_length`` (then only the length guard was added)."""
    pe = emb.position_embeddings
    off = position_offset(emb)
    old_rows = pe.num_embeddings
    trained = old_rows - off
    new_rows = max_length + off
    undo = {"emb": emb, "hook": guard_length(emb, max_length), "extended": False}
    if new_rows <= old_rows:
        return undo
    if trained <= 0:
        undo["hook"].remove()
        raise ValueError("position table has no trained rows to repeat")
    w = pe.weight.detach()
    idx = torch.arange(new_rows, device=w.device)
    src = torch.where(idx < off, idx, off + (idx - off) % trained)
    new = nn.Embedding(new_rows, pe.embedding_dim, padding_idx=pe.padding_idx,
                       device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w[src])
    new.weight.requires_grad_(pe.weight.requires_grad)
    new.train(pe.training)
    undo.update({"extended": True, "position_embeddings": pe, "buffers": {},
                 "config": config, "max_position_embeddings": config.max_position_embeddings})
    emb.position_embeddings = new
    for name in ("position_ids", "token_type_ids"):
        buf = getattr(emb, name, None)
        if not isinstance(buf, torch.Tensor):
            continue
        undo["buffers"][name] = buf
        persistent = name not in getattr(emb, "_non_persistent_buffers_set", set())
        if name == "position_ids":
            nb = torch.arange(new_rows, dtype=buf.dtype, device=buf.device).expand(1, -1)
        else:
            nb = torch.zeros((1, new_rows), dtype=buf.dtype, device=buf.device)
        emb.register_buffer(name, nb, persistent=persistent)
    config.max_position_embeddings = new_rows
    return undo


def restore_embeddings(undo):
    undo["hook"].remove()
    if not undo["extended"]:
        return
    emb = undo["emb"]
    emb.position_embeddings = undo["position_embeddings"]
    for name, buf in undo["buffers"].items():
        persistent = name not in getattr(emb, "_non_persistent_buffers_set", set())
        emb.register_buffer(name, buf, persistent=persistent)
    undo["config"].max_position_embeddings = undo["max_position_embeddings"]
