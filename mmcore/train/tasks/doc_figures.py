"""Long documents with figures: a document read whole in long-document mode (window attention
+ global [CLS], never cut at 512 tokens) with its images fused through CoAttention, classified
end to end (text tower, vision tower, fusion and head all trained in one loss).

    mmcore train --task doc_figures                        # generated documents + digit figures
    mmcore train --task doc_figures --train-file docs.jsonl ...   # {"text": doc, "images": [fig, ...], "label": ...}

The model is vqa.FusedClassifier (optionally with L_vs) over a reader whose text tower runs
with window (cfg.window, cfg.window) and [CLS] global; a record may carry several figures
(batched as (B, M, 3, R, R) with per-document image counts; the fusion sees M·(1+P) image
tokens per document).

Offline data: the trainer's generated long documents (synthetic.py: the harbour board's
decision, stated by one sentence past token 512) each with one digit figure; the label joins
both — "granted, even" / "refused, odd" / ... — so neither the first 512 tokens nor the text
alone nor the figure alone can decide it.
"""
from __future__ import annotations

import random
from typing import Dict

from ..images import digits_records
from . import register_task
from .vqa import VQATask

__all__ = ["DocFiguresTask", "documents_with_figures"]


def documents_with_figures(seed: int = 0, sizes=(96, 32, 96), tokens=(560, 760),
                           image_size: int = 32, model_dir=None) -> Dict[str, list]:
    """{split: [{"text", "label": "<decision>, <even|odd>", "pixels" (3, R, R), "digit"}]}:
    synthetic.long_document_splits with a held-out-per-split digit image attached to each."""
    from ..synthetic import long_document_splits

    docs = long_document_splits(*sizes, seed=seed, tokens=tuple(tokens), model_dir=model_dir)
    figs = digits_records("captions", seed=seed, image_size=image_size)
    rng = random.Random(seed + 7)
    out = {}
    for split, recs in docs.items():
        pool = figs[split]
        out[split] = []
        for r in recs:
            f = pool[rng.randrange(len(pool))]
            parity = "even" if f["digit"] % 2 == 0 else "odd"
            out[split].append({**r, "label": f"{r['label']}, {parity}", "pixels": f["pixels"],
                               "digit": f["digit"], "image_id": f["image_id"]})
    return out


@register_task("doc_figures")
class DocFiguresTask(VQATask):
    """Options as vqa (vs_weight, n_fusion, fusion_heads, vision options).  Any number (>= 1)
    of images per record."""

    max_images = None
    demo_defaults = dict(VQATask.demo_defaults, window=128, pooling="attention", batch_size=8,
                         epochs=4, eval_batch_size=16, synthetic_sizes=[160, 32, 96],
                         out_dir="mmcore-train-doc-figures")

    def default_records(self) -> Dict[str, list]:
        c = self.cfg
        return documents_with_figures(c.seed, c.synthetic_sizes, c.synthetic_tokens,
                                      self.image_size, c.model)

