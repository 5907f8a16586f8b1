"""Classification metrics: accuracy, a classification report (precision, recall, F1 and
support per class, macro and weighted averages — the table sklearn prints) and a confusion
matrix, from integer predictions and labels."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = ["confusion_matrix", "classification_report", "format_report", "format_confusion"]


def confusion_matrix(preds, labels, n_classes: int) -> torch.Tensor:
    """(C, C) int64: row = true class, column = predicted class."""
    p = torch.as_tensor(preds, dtype=torch.long).reshape(-1)
    y = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"preds {tuple(p.shape)} and labels {tuple(y.shape)} differ in size")
    for name, t in (("preds", p), ("labels", y)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n_classes):
            raise ValueError(f"{name} must lie in [0, {n_classes})")
    return torch.bincount(y * n_classes + p, minlength=n_classes * n_classes).reshape(
        n_classes, n_classes)


def classification_report(preds, labels, names: Sequence[str]) -> dict:
    """{"accuracy", "macro_f1", "weighted_f1", "per_class": {name: {precision, recall, f1,
    support}}, "macro avg": {...}, "weighted avg": {...}, "confusion": [[...]]}.
    A class never predicted has precision 0 (as sklearn's zero_division=0)."""
    C = len(names)
    cm = confusion_matrix(preds, labels, C).double()
    tp = cm.diag()
    support = cm.sum(1)
    predicted = cm.sum(0)
    prec = torch.where(predicted > 0, tp / predicted.clamp_min(1), torch.zeros_like(tp))
    rec = torch.where(support > 0, tp / support.clamp_min(1), torch.zeros_like(tp))
    f1 = torch.where(prec + rec > 0, 2 * prec * rec / (prec + rec).clamp_min(1e-300),
                     torch.zeros_like(tp))
    n = float(support.sum())
    per = {str(names[c]): dict(precision=float(prec[c]), recall=float(rec[c]), f1=float(f1[c]),
                               support=int(support[c])) for c in range(C)}
    w = support / max(n, 1.0)
    macro = dict(precision=float(prec.mean()), recall=float(rec.mean()), f1=float(f1.mean()),
                 support=int(n))
    weighted = dict(precision=float((prec * w).sum()), recall=float((rec * w).sum()),
                    f1=float((f1 * w).sum()), support=int(n))
    return {"accuracy": float(tp.sum()) / max(n, 1.0), "macro_f1": macro["f1"],
            "weighted_f1": weighted["f1"], "per_class": per, "macro avg": macro,
            "weighted avg": weighted, "confusion": cm.long().tolist()}


def format_report(rep: dict, digits: int = 3) -> str:
    """The report as sklearn's text table."""
    names = list(rep["per_class"])
    width = max([len(n) for n in names] + [len("weighted avg")])
    head = f"{'':>{width}} {'precision':>9} {'recall':>9} {'f1-score':>9} {'support':>9}"
    lines = [head, ""]

    def row(n, d):
        nums = " ".join(f"{d[k]:>9.{digits}f}" for k in ("precision", "recall", "f1"))
        return f"{n:>{width}} {nums} {d['support']:>9}"

    lines += [row(n, rep["per_class"][n]) for n in names]
    n = rep["macro avg"]["support"]
    lines += ["", f"{'accuracy':>{width}} {'':>9} {'':>9} {rep['accuracy']:>9.{digits}f} {n:>9}",
              row("macro avg", rep["macro avg"]), row("weighted avg", rep["weighted avg"])]
    return "\n".join(lines)


def format_confusion(cm, names: Optional[Sequence[str]] = None) -> str:
    """Rows = true class, columns = predicted class."""
    cm = [list(map(int, r)) for r in cm]
    names = [str(n) for n in (names or range(len(cm)))]
    w = max(max(len(n) for n in names), max(len(str(v)) for r in cm for v in r), 4)
    corner = "true\\pred"
    lines = [f"{corner:>{w + 2}} " + " ".join(f"{n:>{w}}" for n in names)]
    for n, r in zip(names, cm):
        lines.append(f"{n:>{w + 2}} " + " ".join(f"{v:>{w}}" for v in r))
    return "\n".join(lines)
