"""MultimodalReader: TextEncoder + VisionEncoder + N CoAttention fusion layers + heads.

Heads: sequence classification (mean-pooled text -> n_labels), extractive span QA (start /
end logits per token) and a retrieval embedding (mean-pooled, L2-normalised).  The encoders
load from their own HF dirs; the reader's own parts (vision projection, fusion layers, heads)
save to ``reader.safetensors`` next to ``reader_config.json``.

Fusion layers are ``mmcore.nn.CoAttention`` (shared projections, both directions).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import CoAttention
from .loading import Checkpoint, load_into, save_safetensors
from .text_encoder import TextEncoder, mean_pool
from .vision_encoder import VisionEncoder


@dataclass
class ReaderConfig:
    text_model: str
    vision_model: Optional[str] = None
    n_fusion: int = 2
    n_heads: int = 8
    n_labels: int = 2
    labels: List[str] = field(default_factory=list)


@dataclass
class ReaderOutput:
    hidden: torch.Tensor  # (B, S, d) fused text states
    logits: torch.Tensor  # (B, n_labels)
    start_logits: torch.Tensor  # (B, S), -inf past each sample's length
    end_logits: torch.Tensor  # (B, S)
    embedding: torch.Tensor  # (B, d), L2-normalised
    image_hidden: Optional[torch.Tensor] = None  # (B, Sv, d)


class MultimodalReader(nn.Module):
    def __init__(self, config: ReaderConfig, text: TextEncoder,
                 vision: Optional[VisionEncoder] = None):
        super().__init__()
        self.config = config
        self.text, self.vision = text, vision
        d = text.config.hidden_size
        heads = nn.ModuleDict()
        if vision is not None:
            heads["vision_proj"] = nn.Linear(vision.config.hidden_size, d)
        heads["fusion"] = nn.ModuleList(CoAttention(d, config.n_heads)
                                        for _ in range(config.n_fusion if vision else 0))
        heads["cls_head"] = nn.Linear(d, config.n_labels)
        heads["qa_head"] = nn.Linear(d, 2)
        self.heads = heads  # everything the reader saves itself

    def encode_images(self, pixels, image_counts=None):
        """pixels (B, M, 3, R, R) (or (B, 3, R, R): M = 1) -> h_v (B, M·(1+P), d), lengths."""
        if pixels.dim() == 4:
            pixels = pixels[:, None]
        B, M = pixels.shape[:2]
        hv, _ = self.vision(pixels.flatten(0, 1))  # (B·M, 1+P, Hv)
        T = hv.shape[1]
        hv = self.heads["vision_proj"](hv).view(B, M * T, -1)  # (B, M·T, d)
        lens = None if image_counts is None else torch.as_tensor(image_counts,
                                                                 device=hv.device) * T
        return hv, lens

    def fuse(self, h_t, lengths=None, h_v=None, image_lengths=None):
        for layer in self.heads["fusion"]:
            h_t, h_v = layer(h_t, h_v, text_lengths=lengths, image_lengths=image_lengths)
        return h_t, h_v

    def forward(self, input_ids, lengths=None, pixels=None, image_counts=None, *, window=None,
                global_tokens=0) -> ReaderOutput:
        h = self.text(input_ids, lengths, window=window, global_tokens=global_tokens)  # (B,S,d)
        hv = None
        if pixels is not None:
            if self.vision is None:
                raise ValueError("pixels given but this reader has no vision encoder")
            hv, ilens = self.encode_images(pixels, image_counts)
            h, hv = self.fuse(h, lengths, hv, ilens)
        return self.head_outputs(h, lengths, hv)

    def head_outputs(self, h, lengths=None, hv=None) -> ReaderOutput:
        pooled = mean_pool(h, lengths)  # (B, d)
        se = self.heads["qa_head"](h)  # (B, S, 2)
        if lengths is not None:
            pad = torch.arange(h.shape[1], device=h.device)[None] >= lengths[:, None]
            se = se.masked_fill(pad[..., None], float("-inf"))
        return ReaderOutput(hidden=h, logits=self.heads["cls_head"](pooled),
                            start_logits=se[..., 0], end_logits=se[..., 1],
                            embedding=F.normalize(pooled, dim=-1), image_hidden=hv)

    # -------------------------------------------------------------- save / load
    def save(self, out_dir):
        """Writes reader_config.json + reader.safetensors (vision_proj, fusion, heads)."""
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "reader_config.json"), "w") as f:
            json.dump(asdict(self.config), f, indent=2)
        save_safetensors(self.heads.state_dict(), os.path.join(out_dir, "reader.safetensors"),
                         metadata={"format": "pt", "fusion": CoAttention.__module__})

    @classmethod
    def build(cls, text_model, vision_model=None, dtype=torch.float32, device="cpu", **kw):
        """A new reader (fresh fusion layers and heads) over pretrained encoders."""
        text = TextEncoder.from_pretrained(text_model, dtype=dtype, device=device)
        vision = (VisionEncoder.from_pretrained(vision_model, dtype=dtype, device=device)
                  if vision_model else None)
        cfg = ReaderConfig(text_model=os.fspath(text_model),
                           vision_model=os.fspath(vision_model) if vision_model else None, **kw)
        return cls(cfg, text, vision).to(device=device, dtype=dtype)

    @classmethod
    def from_pretrained(cls, reader_dir, dtype=torch.float32, device="cpu", text_model=None,
                        vision_model=None):
        """Load a saved reader; the encoders come from the dirs named in its config (or the
        `text_model` / `vision_model` overrides)."""
        with open(os.path.join(reader_dir, "reader_config.json")) as f:
            cfg = ReaderConfig(**json.load(f))
        cfg.text_model = os.fspath(text_model or cfg.text_model)
        cfg.vision_model = os.fspath(vision_model) if vision_model else cfg.vision_model
        text = TextEncoder.from_pretrained(cfg.text_model, dtype=dtype, device=device)
        vision = (VisionEncoder.from_pretrained(cfg.vision_model, dtype=dtype, device=device)
                  if cfg.vision_model else None)
        model = cls(cfg, text, vision)
        load_into(model.heads, Checkpoint(os.path.join(reader_dir, "reader.safetensors")),
                  dtype=dtype, device=device)
        return model.eval()


def is_reader_dir(path) -> bool:
    return os.path.isfile(os.path.join(os.fspath(path), "reader_config.json"))


__all__ = ["MultimodalReader", "ReaderConfig", "ReaderOutput", "CoAttention", "is_reader_dir"]
