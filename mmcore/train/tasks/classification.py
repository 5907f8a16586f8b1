"""Text classification: a BERT-family encoder (mmcore.models.TextEncoder) read whole in
long-document mode + a pooled linear head; cross-entropy with label smoothing and class
weights; accuracy / macro-F1, and a classification report + confusion matrix at the end.

Long-document mode (window > 0): every layer runs ``window_attention`` with a (w, w) window
and [CLS] as a global token (it sees and is seen by every token), padded batches pass their
`lengths` as seqlens, positions past the learned table wrap onto it — the TextEncoder's
Longformer recipe.  window = 0: full attention, as BertModel (cut documents with max_tokens).
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...models import TextEncoder, default_text_model, mean_pool
from ..losses import cross_entropy
from ..metrics import classification_report, format_confusion, format_report
from . import Batch, Task, register_task

__all__ = ["SequenceClassifier", "AttentionPool", "ClassificationTask"]


class AttentionPool(nn.Module):
    """Multi-head additive attention pooling (Yang et al. 2016, hierarchical attention networks;
    several heads as in Lin et al. 2017, structured self-attentive embedding):

        u_t = tanh(W h_t + b),  a_kt = softmax_t(v_kᵀ u_t) over the valid tokens,
        pooled = [Σ_t a_1t h_t, ..., Σ_t a_Kt h_t]

    h (B, S, H), lengths (B,) -> (B, K·H).  It lets a classifier find the one passage of a long
    document that decides its label; with several heads one of them finds it early."""

    def __init__(self, hidden: int, attn_dim: int = 64, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.proj = nn.Linear(hidden, attn_dim)
        self.score = nn.Linear(attn_dim, heads, bias=False)  # a bias cancels in the softmax

    def forward(self, h, lengths=None):
        s = self.score(torch.tanh(self.proj(h))).float()  # (B, S, K)
        if lengths is not None:
            valid = torch.arange(h.shape[1], device=h.device)[None] < lengths[:, None]
            s = s.masked_fill(~valid[..., None], float("-inf"))
        a = s.softmax(1).to(h.dtype)  # (B, S, K)
        return torch.einsum("bsk,bsh->bkh", a, h).flatten(1)  # (B, K·H)


class SequenceClassifier(nn.Module):
    """encoder + pooling (cls | mean | attention: 4-head additive attention) + dropout +
    linear head.

    forward(input_ids (B, S), lengths (B,), labels (B,) | None) -> {"logits" (B, C),
    "loss" (0-dim, when labels are given)}."""

    head_modules = ("pool", "head")

    def __init__(self, encoder: TextEncoder, n_labels: int, *, pooling: str = "cls",
                 window: int = 128, dropout: float = 0.1, label_smoothing: float = 0.0,
                 class_weights: Optional[List[float]] = None):
        super().__init__()
        if pooling not in ("cls", "mean", "attention"):
            raise ValueError(f"pooling must be cls, mean or attention, got {pooling!r}")
        self.encoder = encoder
        H = encoder.config.hidden_size
        self.pooling = pooling
        self.pool = AttentionPool(H) if pooling == "attention" else nn.Identity()
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(H * (self.pool.heads if pooling == "attention" else 1), n_labels)
        self.window = int(window)
        self.label_smoothing = label_smoothing
        self.class_weights = class_weights

    def fsdp_units(self):
        return list(self.encoder.layers)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.encoder.word

    def encode(self, input_ids, lengths=None):
        """(B, S) -> hidden (B, S, H): long-document mode when window > 0."""
        if self.window > 0:
            return self.encoder(input_ids, lengths, window=(self.window, self.window),
                                global_tokens=1)
        return self.encoder(input_ids, lengths)

    def forward(self, input_ids, lengths=None, labels=None):
        h = self.encode(input_ids, lengths)  # (B, S, H)
        if self.pooling == "cls":
            pooled = h[:, 0]
        elif self.pooling == "mean":
            pooled = mean_pool(h, lengths)
        else:
            pooled = self.pool(h, lengths)
        logits = self.head(self.dropout(pooled))  # (B, C)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = cross_entropy(logits.float(), labels,
                                        label_smoothing=self.label_smoothing,
                                        class_weights=self.class_weights)
        return out


@register_task("classification")
class ClassificationTask(Task):
    """Records {"text", "label"} -> examples {"ids": [int], "label": int}.

    Labels: cfg.labels in that order, else the sorted distinct labels of the training split
    (written back to cfg.labels so checkpoints remember them)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        from ...reading import load_tokenizer

        if cfg.task_options:
            raise ValueError(f"task_options {sorted(cfg.task_options)}: task 'classification' "
                             f"takes no task options")
        self.model_dir = cfg.model or default_text_model()
        self.tokenizer = load_tokenizer(self.model_dir)
        self.labels = [str(x) for x in cfg.labels] if cfg.labels else None

    def prepare(self, records: Dict[str, list]) -> Dict[str, list]:
        from ..data import encode_texts

        field = self.cfg.label_field
        for split, recs in records.items():
            for n, r in enumerate(recs, 1):
                if r.get("label") is None:
                    where = r.get("where") or f"{split} record {n}"
                    raise ValueError(f"{where}: no label (field {field!r}); classification "
                                     f"needs a label on every record (set label_field)")
        if self.labels is None:
            if "train" not in records:
                raise ValueError("no labels given and no training split to take them from")
            self.labels = sorted({str(r["label"]) for r in records["train"]})
            self.cfg.labels = list(self.labels)
        if len(self.labels) < 2:
            raise ValueError(f"classification needs at least 2 labels, got {self.labels}")
        index = {name: i for i, name in enumerate(self.labels)}
        out = {}
        for split, recs in records.items():
            ids = encode_texts(self.tokenizer, [r["text"] for r in recs], self.cfg.max_tokens)
            ex = []
            for r, x in zip(recs, ids):
                lab = r.get("label")
                if str(lab) not in index:
                    raise ValueError(f"{r.get('where') or split}: label {lab!r} is not one of "
                                     f"{self.labels}")
                ex.append({"ids": x, "label": index[str(lab)]})
            out[split] = ex
        return out

    def length(self, example) -> int:
        return len(example["ids"])

    def collate(self, examples: list) -> Batch:
        from ..data import pad_batch

        ids, lengths = pad_batch([e["ids"] for e in examples], pad_id=0)
        labels = torch.tensor([e["label"] for e in examples], dtype=torch.long)
        return Batch({"input_ids": ids, "lengths": lengths, "labels": labels},
                     n_tokens=int(lengths.sum()))

    def build_model(self) -> nn.Module:
        enc = TextEncoder.from_pretrained(self.model_dir, dtype=torch.float32, device="cpu",
                                          pooler=False)
        c = self.cfg
        return SequenceClassifier(enc, len(self.labels), pooling=c.pooling, window=c.window,
                                  dropout=c.dropout, label_smoothing=c.label_smoothing,
                                  class_weights=c.class_weights)

    def outputs(self, out: dict, batch: Batch) -> Dict[str, torch.Tensor]:
        return {"pred": out["logits"].argmax(-1).cpu(), "label": batch.inputs["labels"].cpu(),
                "loss_sum": (F.cross_entropy(out["logits"].float(), batch.inputs["labels"],
                                             reduction="none")).detach().cpu()}

    def metrics(self, g: Dict[str, torch.Tensor]) -> dict:
        rep = classification_report(g["pred"], g["label"], self.labels)
        return {"accuracy": rep["accuracy"], "macro_f1": rep["macro_f1"],
                "loss": float(g["loss_sum"].double().mean()) if g["loss_sum"].numel() else 0.0}

    def report(self, g: Dict[str, torch.Tensor]) -> dict:
        return classification_report(g["pred"], g["label"], self.labels)

    def format_report(self, rep: dict) -> str:
        return (format_report(rep) + "\n\nconfusion matrix (rows: true, columns: predicted)\n"
                + format_confusion(rep["confusion"], self.labels))
