"""Visual question answering: answer classification over the fused representation of a
MultimodalReader (text tower + vision tower + CoAttention fusion), with the visual-consistency
loss L_vs as an optional term.

    mmcore train --task vqa                                    # the digits, generated questions
    mmcore train --task vqa --task-options vs_weight=0.5       # + 0.5 · L_vs
    mmcore train --task vqa --train-file qa.jsonl ...          # {"text": question, "images": ..., "label": answer}

Model (FusedClassifier): h_t = text tower(question) (long-document mode when window > 0),
h_v = vision_proj(vision tower(image)) (all patch tokens + CLS), fused by the reader's
CoAttention layers; the fused text states are pooled (mean, attention or CLS: cfg.pooling) and
the reader's cls_head scores every answer of the training set.

    loss = CE(answer logits, answer) + vs_weight · L_vs
    L_vs = losses.visual_consistency(mean-pooled pre-fusion text states, h_v[:, 0],
                                     projection = vs_proj)

L_vs asks the text side's own representation, projected into the image space, to point the
same way as the (stop-gradient) embedding of its paired image (the image's projected CLS).
Metrics: accuracy, macro F1, loss; the report is a classification report over the answers.
"""
from __future__ import annotations

from typing import Dict

from torch import nn

from ...models import MultimodalReader, ReaderConfig, mean_pool
from ..images import ANSWERS
from ..losses import cross_entropy, visual_consistency
from . import register_task
from .classification import AttentionPool, ClassificationTask
from .multimodal import DIGITS_DEMO, MultimodalTask, fsdp_units, text_window

__all__ = ["FusedClassifier", "VQATask"]


class FusedClassifier(nn.Module):
    """forward(input_ids (B, S), lengths (B,), pixels (B, 3, R, R) or (B, M, 3, R, R),
    image_counts (B,) | None, labels (B,) | None) -> {"logits" (B, C), "loss" (with labels),
    "ce", "vs_loss" (when vs_weight > 0)}."""

    def __init__(self, reader: MultimodalReader, *, pooling: str = "mean",
                 vs_weight: float = 0.0, label_smoothing: float = 0.0, text_kw: dict = None):
        super().__init__()
        if reader.vision is None or not len(reader.heads["fusion"]):
            raise ValueError("FusedClassifier needs a reader with a vision tower and fusion "
                             "layers")
        if pooling not in ("mean", "attention", "cls"):
            raise ValueError(f"pooling must be mean, attention or cls, got {pooling!r}")
        if not vs_weight >= 0:
            raise ValueError(f"vs_weight must be >= 0, got {vs_weight}")
        d = reader.text.config.hidden_size
        self.reader = reader
        self.pooling = pooling
        # one attention head: the pooled vector stays (B, d), the reader's cls_head's input
        self.pool = AttentionPool(d, heads=1) if pooling == "attention" else nn.Identity()
        self.vs_weight = float(vs_weight)
        self.vs_proj = nn.Linear(d, d) if vs_weight > 0 else None
        self.head_modules = ("reader.vision", "reader.heads", "pool") + \
            (("vs_proj",) if vs_weight > 0 else ())
        self.label_smoothing = label_smoothing
        self.text_kw = dict(text_kw or {})

    def fsdp_units(self):
        return fsdp_units(self.reader.text, self.reader.vision)

    def get_input_embeddings(self):
        return self.reader.text.word

    def _pool(self, h, lengths):
        if self.pooling == "cls":
            return h[:, 0]
        if self.pooling == "attention":
            return self.pool(h, lengths)
        return mean_pool(h, lengths)

    def forward(self, input_ids, lengths=None, pixels=None, image_counts=None, labels=None):
        r = self.reader
        h = r.text(input_ids, lengths, **self.text_kw)  # (B, S, d)
        hv, ilens = r.encode_images(pixels, image_counts)  # (B, M·T, d)
        f_t, _ = r.fuse(h, lengths, hv, ilens)
        logits = r.heads["cls_head"](self._pool(f_t, lengths))  # (B, C)
        out = {"logits": logits}
        if labels is not None:
            ce = cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
            out["ce"], out["loss"] = ce, ce
            if self.vs_proj is not None:
                vs = visual_consistency(mean_pool(h, lengths), hv[:, 0], projection=self.vs_proj)
                out["vs_loss"] = vs
                out["loss"] = ce + self.vs_weight * vs
        return out


@register_task("vqa")
class VQATask(MultimodalTask):
    """Options (task_options): vs_weight (0: no L_vs), n_fusion (1), fusion_heads (6), plus
    the vision options of multimodal.py.  Answers: cfg.labels, else the sorted answers of the
    training split."""

    options = {**MultimodalTask.options, "vs_weight": 0.0, "n_fusion": 1, "fusion_heads": 6}
    data_kind = "questions"
    demo_defaults = {**DIGITS_DEMO, "pooling": "mean", "out_dir": "mmcore-train-vqa"}

    def default_records(self) -> Dict[str, list]:
        """The digits with generated questions; the answer set is all 14 answers."""
        if self.labels is None:
            self.labels = list(ANSWERS)
            self.cfg.labels = list(ANSWERS)
        return super().default_records()

    def prepare(self, records: Dict[str, list]) -> Dict[str, list]:
        data = self.examples(records)
        if len(self.labels) < 2:
            raise ValueError(f"{self.name} needs at least 2 answers / labels, got {self.labels}")
        return data

    def reader(self) -> MultimodalReader:
        o = self.opts
        rc = ReaderConfig(text_model=self.model_dir, vision_model=o["vision_model"],
                          n_fusion=o["n_fusion"], n_heads=o["fusion_heads"],
                          n_labels=len(self.labels), labels=list(self.labels))
        return MultimodalReader(rc, self.text_tower(), self.vision)

    def build_model(self) -> nn.Module:
        c = self.cfg
        return FusedClassifier(self.reader(), pooling=c.pooling, vs_weight=self.opts["vs_weight"],
                               label_smoothing=c.label_smoothing, text_kw=text_window(c))

    # the answer is a class: the classification task's outputs, metrics and report
    outputs = ClassificationTask.outputs
    metrics = ClassificationTask.metrics
    report = ClassificationTask.report
    format_report = ClassificationTask.format_report
