"""PNG of a run's curves from its metrics.jsonl: training loss (and lr) per step, and each
evaluation metric per step."""
from __future__ import annotations

import json
import os
from typing import Optional


def read_metrics(path: str) -> list:
    with open(path) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def save_curves(metrics_path: str, png_path: str, metric: str = "accuracy",
                title: Optional[str] = None) -> Optional[str]:
    """Write the PNG; returns its path, or None when matplotlib is missing or nothing was
    logged."""
    from .._optional import optional

    matplotlib = optional("matplotlib")
    if matplotlib is None:  # curves are a nicety: off without mmcore[plot]
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if not os.path.isfile(metrics_path):
        return None
    rows = read_metrics(metrics_path)
    train = [r for r in rows if r.get("split") == "train"]
    evals = [r for r in rows if r.get("split") not in (None, "train", "test")]
    if not train:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    ax = axes[0]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if evals and "loss" in evals[0]:
        ax.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-",
                label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(loc="upper right")
    lr = ax.twinx()
    lr.plot([r["step"] for r in train], [r["lr"] for r in train], color="grey", alpha=0.4)
    lr.set_ylabel("lr", color="grey")
    ax = axes[1]
    keys = [k for k in (metric, "accuracy", "macro_f1") if evals and k in evals[0]]
    for k in dict.fromkeys(keys):
        ax.plot([r["step"] for r in evals], [r[k] for r in evals], "o-", label=k)
    ax.set_xlabel("step")
    ax.set_ylabel("validation")
    if keys:
        ax.legend(loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path
