"""LongContext: let an absolute-position encoder (BERT / RoBERTa / XLM-R) read long inputs.

The Longformer recipe: every self-attention layer becomes a bidirectional sliding window
``window=(w, w)`` plus ``G`` global tokens (the first G tokens: CLS / a question prefix, seen
by and seeing every token), and the learned position table is extended by repeating its
trained rows (``table[offset:offset + trained]`` copied again and again), so that position ids
past ``max_position_embeddings`` are valid.  The position_ids / token_type_ids buffers are
extended to match.  :func:`mmcore.unpatch` restores the original table, buffers and config.
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
    max_length: the longest input (in tokens) the extended position table must cover.
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


def position_offset(emb) -> int:
    """First learned position row: RoBERTa-style embeddings start at padding_idx + 1."""
    if hasattr(emb, "create_position_ids_from_input_ids") and getattr(emb, "padding_idx", None) \
            is not None:
        return int(emb.padding_idx) + 1
    return 0


def extend_embeddings(emb, config, max_length: int):
    """Extend ``emb.position_embeddings`` (and its buffers) to ``max_length`` positions by
    repeating the trained rows.  Returns an undo record, or None if already long enough."""
    pe = emb.position_embeddings
    off = position_offset(emb)
    old_rows = pe.num_embeddings
    trained = old_rows - off
    new_rows = max_length + off
    if new_rows <= old_rows:
        return None
    if trained <= 0:
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
    undo = {"emb": emb, "position_embeddings": pe, "buffers": {},
            "config": config, "max_position_embeddings": config.max_position_embeddings}
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
    emb = undo["emb"]
    emb.position_embeddings = undo["position_embeddings"]
    for name, buf in undo["buffers"].items():
        persistent = name not in getattr(emb, "_non_persistent_buffers_set", set())
        emb.register_buffer(name, buf, persistent=persistent)
    undo["config"].max_position_embeddings = undo["max_position_embeddings"]
