"""VisionEncoder: the CLIP ViT vision tower on mmcore.ops.window_attention (full attention).

Loads the vision tower of a CLIP checkpoint: the ``vision_model.*`` tensors of a CLIPModel
dir (text tower and projections ignored), or a CLIPVisionModel dir (unprefixed in
transformers >= 5).  forward(pixels (B, 3, R, R)) ->
(hidden (B, 1 + P, H) = CLIPVisionModel.last_hidden_state, pooled (B, H) = pooler_output).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Optional

import torch
from torch import nn

from ..ops import window_attention
from .loading import Checkpoint, load_into, read_config
from .text_encoder import _ACT

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class VisionConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_dict(cls, d: dict) -> "VisionConfig":
        d = d.get("vision_config", d)  # a full CLIPModel config nests it
        names = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in names})
        if cfg.hidden_act not in _ACT:
            raise ValueError(f"hidden_act {cfg.hidden_act!r} not supported")
        return cfg


class Block(nn.Module):
    """Pre-LN block: x += attn(LN1 x); x += fc2 act(fc1 LN2 x)."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        H = c.hidden_size
        self.h = c.num_attention_heads
        self.ln1 = nn.LayerNorm(H, eps=c.layer_norm_eps)
        self.q, self.k, self.v, self.o = (nn.Linear(H, H) for _ in range(4))
        self.ln2 = nn.LayerNorm(H, eps=c.layer_norm_eps)
        self.fc1 = nn.Linear(H, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, H)
        self.act = _ACT[c.hidden_act]

    def forward(self, x):
        B, S, H = x.shape  # (B, 1 + P, H)
        y = self.ln1(x)
        q, k, v = (p(y).view(B, S, self.h, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = window_attention(q, k, v)  # (B, h, S, D), full attention
        x = x + self.o(a.transpose(1, 2).reshape(B, S, H))
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        c = self.config = config
        H = c.hidden_size
        self.patch = nn.Conv2d(c.num_channels, H, c.patch_size, stride=c.patch_size, bias=False)
        self.cls = nn.Parameter(torch.randn(H) * 0.02)
        self.n_pos = (c.image_size // c.patch_size) ** 2 + 1
        self.pos = nn.Embedding(self.n_pos, H)
        self.pre_ln = nn.LayerNorm(H, eps=c.layer_norm_eps)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.num_hidden_layers))
        self.post_ln = nn.LayerNorm(H, eps=c.layer_norm_eps)

    def forward(self, pixels):
        """pixels (B, C, R, R) normalised -> hidden (B, 1 + P, H), pooled (B, H)."""
        B = pixels.shape[0]
        if tuple(pixels.shape[1:]) != (self.config.num_channels, self.config.image_size,
                                       self.config.image_size):
            raise ValueError(f"pixels must be (B, {self.config.num_channels}, "
                             f"{self.config.image_size}, {self.config.image_size}), got "
                             f"{tuple(pixels.shape)}")
        x = self.patch(pixels.to(self.patch.weight.dtype)).flatten(2).transpose(1, 2)  # (B,P,H)
        x = torch.cat([self.cls.expand(B, 1, -1), x], 1) + self.pos.weight[None]  # (B, 1+P, H)
        x = self.pre_ln(x)
        for blk in self.blocks:
            x = blk(x)
        return x, self.post_ln(x[:, 0])

    @classmethod
    def from_pretrained(cls, model_dir, dtype=torch.float32, device="cpu"):
        cfg = VisionConfig.from_dict(read_config(model_dir))
        with torch.device("meta"):
            model = cls(cfg)
        ckpt = Checkpoint(model_dir)
        # CLIPModel (and transformers < 5 CLIPVisionModel) prefix the tower with vision_model.
        prefixed = any(k.startswith("vision_model.") for k in ckpt.keys())
        load_into(model, ckpt, key_map=lambda k: _map_key(k, prefixed), dtype=dtype,
                  device=device)
        return model.eval()


_RULES = [(re.compile(p), r) for p, r in [
    (r"^embeddings\.patch_embedding\.", "patch."),
    (r"^embeddings\.class_embedding$", "cls"),
    (r"^embeddings\.position_embedding\.", "pos."),
    (r"^pre_layrnorm\.", "pre_ln."),
    (r"^post_layernorm\.", "post_ln."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.", r"blocks.\1.\2."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"blocks.\1.o."),
    (r"^encoder\.layers\.(\d+)\.layer_norm(1|2)\.", r"blocks.\1.ln\2."),
    (r"^encoder\.layers\.(\d+)\.mlp\.(fc1|fc2)\.", r"blocks.\1.\2."),
]]


def _map_key(k: str, prefixed: bool = True) -> Optional[str]:
    """CLIP key -> VisionEncoder key; None for everything outside the vision tower."""
    if prefixed:
        if not k.startswith("vision_model."):
            return None  # text_model.*, visual_projection, logit_scale, ...
        k = k[len("vision_model."):]
    if k == "embeddings.position_ids":
        return None
    for pat, rep in _RULES:
        new, n = pat.subn(rep, k)
        if n:
            return new
    return k  # unknown: strict loading reports it


def preprocess(paths, image_size: int = 224, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """CLIP preprocessing with PIL + numpy (no torchvision): RGB, resize the short side to
    `image_size` (bicubic), centre crop, scale to [0, 1], normalise.  -> (B, 3, R, R) fp32."""
    from .._optional import require

    Image = require("PIL.Image", feature="reading images")
    import numpy as np

    out = []
    for p in paths:
        with Image.open(p) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = image_size / min(w, h)
            im = im.resize((max(image_size, round(w * s)), max(image_size, round(h * s))),
                           Image.BICUBIC)
            w, h = im.size
            l, t = (w - image_size) // 2, (h - image_size) // 2
            im = im.crop((l, t, l + image_size, t + image_size))
            a = np.asarray(im, dtype=np.float32) / 255.0  # (R, R, 3)
        a = (a - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
        out.append(torch.from_numpy(a.transpose(2, 0, 1).copy()))
    return torch.stack(out)


__all__ = ["VisionConfig", "VisionEncoder", "preprocess"]
