"""Image-text matching: a dual encoder trained with symmetric InfoNCE, or a fused matcher (a
MultimodalReader with co-attention fusion and a match head) trained with hard negatives.

    mmcore train --task matching                                   # dual encoder, digits
    mmcore train --task matching --task-options matcher=fused      # fused matcher
    mmcore train --task matching --train-file captions.jsonl --val-file val.jsonl ...

Dual encoder (CLIP): text tower (a BERT-family TextEncoder, MiniLM-L6 by default, mean-pooled)
and vision tower (VisionEncoder's pooled CLS), each with a linear projection to `embed_dim`,
L2-normalised; loss = losses.info_nce with a learnable temperature (LearnableTemperature).

Fused matcher (ALBEF-style ITC + ITM): the same unimodal embeddings give an InfoNCE term and
a similarity used to mine hard negatives — for each caption an image and for each image a
caption, sampled ∝ softmax(similarity / τ) among the batch items that are not relevant to it.
Each (caption, image) pair runs through the reader's CoAttention fusion layers; the mean-pooled
fused text states go to a match head (a 2-layer MLP, one logit).  loss = InfoNCE + BCE(match logits) over the
B positives and 2B hard negatives.

Relevance: records with a label are grouped by it (class level: any image of the class is a
match for a caption of it); without labels, a caption belongs to its own image (records that
share an image path share a group).

Evaluation: each validation / test caption is scored against its image and against one fixed
negative image of another group (seeded); metrics pair_accuracy (positive scored above the
negative) and auc (every positive against every negative).
"""
from __future__ import annotations

import random
from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from ...models import MultimodalReader, ReaderConfig, TextEncoder, VisionEncoder, mean_pool
from ..losses import LearnableTemperature, info_nce
from . import Batch, register_task
from .multimodal import DIGITS_DEMO, MultimodalTask, fsdp_units, text_window

__all__ = ["DualEncoder", "FusedMatcher", "MatchingTask", "hard_negatives", "pair_auc",
           "assign_groups"]


class DualEncoder(nn.Module):
    """forward(input_ids (B, S), lengths (B,), pixels (B, 3, R, R), groups=None,
    neg_pixels (B, 3, R, R) | None) -> {"loss" (0-dim InfoNCE), "text_emb" (B, E),
    "image_emb" (B, E) L2-normalised [, "pos_score", "neg_score" (B,) scaled cosines]}."""

    head_modules = ("vision", "text_proj", "image_proj", "temperature")

    def __init__(self, text: TextEncoder, vision: VisionEncoder, embed_dim: int = 128,
                 init_temperature: float = 0.07, text_kw: dict = None):
        super().__init__()
        self.text, self.vision = text, vision
        self.text_proj = nn.Linear(text.config.hidden_size, embed_dim)
        self.image_proj = nn.Linear(vision.config.hidden_size, embed_dim)
        self.temperature = LearnableTemperature(init_temperature)
        self.text_kw = dict(text_kw or {})

    def fsdp_units(self):
        return fsdp_units(self.text, self.vision)

    def get_input_embeddings(self):
        return self.text.word

    def encode_text(self, input_ids, lengths=None):
        h = self.text(input_ids, lengths, **self.text_kw)  # (B, S, H)
        return F.normalize(self.text_proj(mean_pool(h, lengths)), dim=-1)  # (B, E)

    def encode_image(self, pixels):
        _, pooled = self.vision(pixels)  # (B, Hv)
        return F.normalize(self.image_proj(pooled), dim=-1)  # (B, E)

    def forward(self, input_ids, lengths=None, pixels=None, groups=None, neg_pixels=None):
        t, v = self.encode_text(input_ids, lengths), self.encode_image(pixels)
        scale = self.temperature()
        out = {"text_emb": t, "image_emb": v, "loss": info_nce(t, v, scale)}
        if neg_pixels is not None:
            out["pos_score"] = scale * (t * v).sum(-1)
            out["neg_score"] = scale * (t * self.encode_image(neg_pixels)).sum(-1)
        return out


def hard_negatives(sim: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """One negative per row, sampled ∝ softmax(sim) over the columns not relevant to it.

    sim (B, B) similarities (no gradient needed), same (B, B) bool relevance (diagonal true).
    A row with no irrelevant column samples uniformly among the other columns.  -> (B,) int64.
    Needs B >= 2."""
    B = sim.shape[0]
    if B < 2:
        raise ValueError("hard negatives need a batch of at least 2 pairs")
    s = sim.detach().float().masked_fill(same, float("-inf"))
    none = torch.isinf(s).all(1)
    if none.any():  # every other item is relevant: fall back to any other item
        eye = torch.eye(B, dtype=torch.bool, device=sim.device)
        s[none] = torch.zeros_like(s[none]).masked_fill(eye[none], float("-inf"))
    return torch.multinomial(s.softmax(1), 1).squeeze(1)


class FusedMatcher(nn.Module):
    """MultimodalReader (text tower, vision tower, vision_proj, CoAttention fusion) + match
    head, trained with ITC + ITM on mined hard negatives.

    forward(input_ids (B, S), lengths (B,), pixels (B, 3, R, R), groups (B,) | None,
    neg_pixels | None) -> {"loss", "text_emb", "image_emb" [, "pos_score", "neg_score" (B,)
    match logits]}."""

    head_modules = ("reader.vision", "reader.heads", "match_head", "text_proj", "image_proj",
                    "temperature")

    def __init__(self, reader: MultimodalReader, embed_dim: int = 128,
                 init_temperature: float = 0.07, text_kw: dict = None):
        super().__init__()
        if reader.vision is None or not len(reader.heads["fusion"]):
            raise ValueError("FusedMatcher needs a reader with a vision tower and fusion layers")
        self.reader = reader
        d = reader.text.config.hidden_size
        # an MLP: deciding "this caption matches this image" is an interaction of the two
        # streams' contributions to the fused states, which a linear head cannot compute
        self.match_head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, 1))
        self.text_proj = nn.Linear(d, embed_dim)
        self.image_proj = nn.Linear(d, embed_dim)
        self.temperature = LearnableTemperature(init_temperature)
        self.text_kw = dict(text_kw or {})

    def fsdp_units(self):
        return fsdp_units(self.reader.text, self.reader.vision)

    def get_input_embeddings(self):
        return self.reader.text.word

    def unimodal(self, input_ids, lengths, pixels):
        """-> h_t (B, S, d), h_v (B, T, d) (projected image tokens), t, v (B, E) normalised."""
        h_t = self.reader.text(input_ids, lengths, **self.text_kw)
        h_v, _ = self.reader.encode_images(pixels)  # (B, T, d)
        t = F.normalize(self.text_proj(mean_pool(h_t, lengths)), dim=-1)
        v = F.normalize(self.image_proj(h_v[:, 0]), dim=-1)
        return h_t, h_v, t, v

    def match_logits(self, h_t, lengths, h_v, ti, vi):
        """Fuse caption ti[p] with image vi[p] for each pair p -> (P,) match logits."""
        lt = None if lengths is None else lengths[ti]
        f_t, _ = self.reader.fuse(h_t[ti], lt, h_v[vi], None)
        return self.match_head(mean_pool(f_t, lt)).squeeze(-1)

    def forward(self, input_ids, lengths=None, pixels=None, groups=None, neg_pixels=None):
        h_t, h_v, t, v = self.unimodal(input_ids, lengths, pixels)
        B = t.shape[0]
        itc = info_nce(t, v, self.temperature())
        ar = torch.arange(B, device=t.device)
        out = {"text_emb": t, "image_emb": v}
        if neg_pixels is not None:  # evaluation: each caption vs its image and a fixed negative
            hv_neg, _ = self.reader.encode_images(neg_pixels)
            pos = self.match_logits(h_t, lengths, h_v, ar, ar)
            neg = self.match_logits(h_t, lengths, hv_neg, ar, ar)
            logits, target = torch.cat([pos, neg]), torch.cat([torch.ones(B), torch.zeros(B)])
            out.update(pos_score=pos, neg_score=neg)
        else:
            g = ar if groups is None else groups
            same = g[:, None] == g[None, :]  # (B, B) relevance
            sim = (self.temperature() * t @ v.t()).detach()  # (B, B) caption x image logits
            neg_v = hard_negatives(sim, same)  # an image for each caption
            neg_t = hard_negatives(sim.t(), same.t())  # a caption for each image
            ti, vi = torch.cat([ar, ar, neg_t]), torch.cat([ar, neg_v, ar])
            logits = self.match_logits(h_t, lengths, h_v, ti, vi)  # (3B,)
            target = torch.cat([torch.ones(B), torch.zeros(2 * B)])
        itm = F.binary_cross_entropy_with_logits(logits.float(), target.to(logits.device))
        out["loss"] = itc + itm
        return out


def assign_groups(examples: list) -> None:
    """Relevance groups in place: e["group"] = the class index when labelled, else one id per
    distinct image (records sharing an image path are relevant to each other's captions)."""
    keys: Dict[str, int] = {}
    for e in examples:
        e["group"] = e["label"] if e["label"] >= 0 else keys.setdefault(e["image_key"], len(keys))


def pair_auc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """P(score of a random positive > score of a random negative), ties counted ½ (the
    Mann-Whitney U statistic / (n_pos · n_neg)).  pos (P,), neg (N,)."""
    s = torch.cat([pos, neg]).double()
    order = s.argsort()
    ranks = torch.empty_like(s)
    ranks[order] = torch.arange(1, s.numel() + 1, dtype=torch.float64)
    for v in s.unique():  # average ranks over ties
        m = s == v
        if int(m.sum()) > 1:
            ranks[m] = ranks[m].mean()
    n_p, n_n = pos.numel(), neg.numel()
    return float((ranks[:n_p].sum() - n_p * (n_p + 1) / 2) / (n_p * n_n))


@register_task("matching")
class MatchingTask(MultimodalTask):
    """Options (task_options): matcher "dual" | "fused", embed_dim (128), temperature (0.07,
    initial τ), n_fusion (1) and fusion_heads (6) of the fused matcher, plus the vision
    options of multimodal.py."""

    options = {**MultimodalTask.options, "matcher": "dual", "embed_dim": 128,
               "temperature": 0.07, "n_fusion": 1, "fusion_heads": 6}
    labelled = False
    metric = "pair_accuracy"
    demo_defaults = {**DIGITS_DEMO, "out_dir": "mmcore-train-matching"}

    def __init__(self, cfg):
        super().__init__(cfg)
        if self.opts["matcher"] not in ("dual", "fused"):
            raise ValueError(f"task_options matcher must be 'dual' or 'fused', got "
                             f"{self.opts['matcher']!r}")

    def prepare(self, records: Dict[str, list]) -> Dict[str, list]:
        data = self.examples(records)
        for split, ex in data.items():
            assign_groups(ex)
            if split != "train":
                self._fixed_negatives(ex, split)
        return data

    def _fixed_negatives(self, ex: list, split: str) -> None:
        """Each evaluation example gets the image of a seeded random example of another
        group as its negative."""
        rng = random.Random(f"{self.cfg.seed}/{split}")
        groups = [e["group"] for e in ex]
        if len(set(groups)) < 2:
            raise ValueError(f"{split}: matching needs at least two groups (labels or images) "
                             f"to draw negatives from")
        for e in ex:
            while True:
                o = ex[rng.randrange(len(ex))]
                if o["group"] != e["group"]:
                    break
            e["neg"] = o["images"][0]

    def collate(self, examples: list) -> Batch:
        from ..images import load_pixels

        inputs = self.collate_inputs(examples)
        inputs["groups"] = torch.tensor([e["group"] for e in examples], dtype=torch.long)
        if all("neg" in e for e in examples):
            inputs["neg_pixels"] = load_pixels([e["neg"] for e in examples], self.image_size)
        return Batch(inputs, n_tokens=int(inputs["lengths"].sum()))

    def build_model(self) -> nn.Module:
        o, kw = self.opts, text_window(self.cfg)
        if o["matcher"] == "dual":
            return DualEncoder(self.text_tower(), self.vision, o["embed_dim"], o["temperature"],
                               text_kw=kw)
        rc = ReaderConfig(text_model=self.model_dir, vision_model=o["vision_model"],
                          n_fusion=o["n_fusion"], n_heads=o["fusion_heads"], n_labels=1)
        return FusedMatcher(MultimodalReader(rc, self.text_tower(), self.vision),
                            o["embed_dim"], o["temperature"], text_kw=kw)

    def outputs(self, out: dict, batch: Batch) -> Dict[str, torch.Tensor]:
        if "pos_score" not in out:
            raise ValueError("matching evaluation needs fixed negatives (validation / test "
                             "examples prepared by this task)")
        return {"pos": out["pos_score"].detach().float().cpu(),
                "neg": out["neg_score"].detach().float().cpu()}

    def metrics(self, g: Dict[str, torch.Tensor]) -> dict:
        pos, neg = g["pos"], g["neg"]
        return {"pair_accuracy": float((pos > neg).double().mean()) if pos.numel() else 0.0,
                "auc": pair_auc(pos, neg) if pos.numel() else 0.0}
