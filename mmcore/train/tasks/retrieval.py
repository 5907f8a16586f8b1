"""Cross-modal retrieval: a dual encoder (matching.DualEncoder, symmetric InfoNCE) evaluated
by text→image and image→text recall@1/5/10 and mean rank over the split's whole gallery.

    mmcore train --task retrieval          # offline demo: MiniLM-L6 + a small ViT on the digits
    mmcore train --task retrieval --train-file tr.jsonl --val-file va.jsonl --test-file te.jsonl

Evaluation: the trainer embeds the split batch by batch (`outputs`), then each direction is
searched with retrieval_index.topk_search — the gallery is scanned in chunks with a running
top-k merge, never the full (queries × gallery) matrix — and ranked with
first_relevant_ranks (two chunked passes).

Relevance, and so recall: with labels it is class level — the text query "a photo of the
digit seven" is a hit at k when one of the first k images retrieved is a 7 (and an image
query when one of the first k captions names its class); random ranking then gets recall@1
≈ 1/classes.  Without labels a caption's only relevant image is its own (records sharing an
image path share it).  Mean rank: the rank of the first relevant item (1 = best).
"""
from __future__ import annotations

import os
from typing import Dict

import torch
from torch import nn

from ..retrieval_index import first_relevant_ranks, random_recall_at_k, recall_at_k, \
    topk_search
from . import Batch, register_task
from .matching import DualEncoder, assign_groups
from .multimodal import DIGITS_DEMO, MultimodalTask, text_window

__all__ = ["RetrievalTask", "retrieval_metrics"]

KS = (1, 5, 10)
DIRECTIONS = (("t2i", "text -> image"), ("i2t", "image -> text"))


def retrieval_metrics(text_emb, image_emb, groups, ks=KS) -> dict:
    """Both directions over one split: queries = the captions (gallery = the images) and the
    images (gallery = the captions); relevant iff same group.  text_emb, image_emb (N, E)
    normalised, groups (N,).  -> {"t2i_recall@k", "t2i_mean_rank", "i2t_...",
    "mean_recall@1" (of the two directions: the default eval_metric)}."""
    out = {}
    for key, (q, g) in (("t2i", (text_emb, image_emb)), ("i2t", (image_emb, text_emb))):
        _, top = topk_search(q.float(), g.float(), max(ks))
        for k, r in recall_at_k(top, groups, groups, ks).items():
            out[f"{key}_recall@{k}"] = r
        out[f"{key}_mean_rank"] = float(first_relevant_ranks(q.float(), g.float(), groups,
                                                             groups).double().mean())
    out["mean_recall@1"] = (out["t2i_recall@1"] + out["i2t_recall@1"]) / 2
    return out


@register_task("retrieval")
class RetrievalTask(MultimodalTask):
    """Options (task_options): embed_dim (128), temperature (0.07, initial τ), plus the vision
    options of multimodal.py."""

    options = {**MultimodalTask.options, "embed_dim": 128, "temperature": 0.07}
    labelled = False
    metric = "mean_recall@1"
    demo_defaults = {**DIGITS_DEMO, "out_dir": "mmcore-train-retrieval"}

    def prepare(self, records: Dict[str, list]) -> Dict[str, list]:
        data = self.examples(records)
        for ex in data.values():
            assign_groups(ex)
        return data

    def collate(self, examples: list) -> Batch:
        inputs = self.collate_inputs(examples)
        inputs["groups"] = torch.tensor([e["group"] for e in examples], dtype=torch.long)
        return Batch(inputs, n_tokens=int(inputs["lengths"].sum()))

    def build_model(self) -> nn.Module:
        o = self.opts
        return DualEncoder(self.text_tower(), self.vision, o["embed_dim"], o["temperature"],
                           text_kw=text_window(self.cfg))

    def outputs(self, out: dict, batch: Batch) -> Dict[str, torch.Tensor]:
        return {"text": out["text_emb"].detach().float().cpu(),
                "image": out["image_emb"].detach().float().cpu(),
                "group": batch.inputs["groups"].cpu()}

    def metrics(self, g: Dict[str, torch.Tensor]) -> dict:
        return retrieval_metrics(g["text"], g["image"], g["group"])

    def report(self, g: Dict[str, torch.Tensor]) -> dict:
        m = self.metrics(g)
        rnd = random_recall_at_k(g["group"], g["group"], KS)
        rep = {"queries": int(g["group"].numel()), "gallery": int(g["group"].numel()),
               "relevance": "class" if self.labels else "instance", "metrics": m,
               "random": {**{f"recall@{k}": rnd[k] for k in KS}, "mean_rank": rnd["mean_rank"]}}
        if _main_process():
            rep["curves"] = save_retrieval_curves(self.cfg.out_dir, rep["random"])
        return rep

    def format_report(self, rep: dict) -> str:
        m, rnd = rep["metrics"], rep["random"]
        if rep["relevance"] == "class":
            rule = ("class-level relevance: a text query such as \"a photo of the digit seven\" "
                    "is a hit at k when one of the first k images retrieved shows its class (a "
                    "7); an image query when one of the first k captions names its class")
        else:
            rule = ("instance-level relevance: a caption's hit is its own image, an image's "
                    "hits are its own captions")
        lines = [f"retrieval over {rep['queries']} captions x {rep['gallery']} images", rule, "",
                 f"{'':>16}" + "".join(f"{'recall@' + str(k):>11}" for k in KS)
                 + f"{'mean rank':>11}"]
        for key, name in DIRECTIONS:
            lines.append(f"{name:>16}" + "".join(f"{m[f'{key}_recall@{k}']:>11.3f}" for k in KS)
                         + f"{m[f'{key}_mean_rank']:>11.2f}")
            lines.append(f"{'random':>16}" + "".join(f"{rnd[f'recall@{k}']:>11.3f}" for k in KS)
                         + f"{rnd['mean_rank']:>11.2f}")
        if rep.get("curves"):
            lines.append(f"\nrecall curves: {rep['curves']}")
        return "\n".join(lines)


def _main_process() -> bool:
    d = torch.distributed
    return not (d.is_available() and d.is_initialized()) or d.get_rank() == 0


def save_retrieval_curves(out_dir: str, random_baseline: dict):
    """out_dir/retrieval_curves.png: validation recall@1 and @5 in both directions per step
    (from metrics.jsonl), the random baselines dashed.  None without matplotlib or data."""
    from ..plots import read_metrics

    path = os.path.join(out_dir, "metrics.jsonl")
    from ..._optional import optional

    matplotlib = optional("matplotlib")
    if matplotlib is None:  # curves are a nicety: off without mmcore[plot]
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if not os.path.isfile(path):
        return None
    rows = [r for r in read_metrics(path) if r.get("split") == "validation"]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4))
    steps = [r["step"] for r in rows]
    for (key, name), color in zip(DIRECTIONS, ("tab:blue", "tab:orange")):
        for k, style in ((1, "o-"), (5, "s--")):
            ax.plot(steps, [r[f"{key}_recall@{k}"] for r in rows], style, color=color,
                    label=f"{name} recall@{k}")
    for k, style in ((1, ":"), (5, "-.")):
        ax.axhline(random_baseline[f"recall@{k}"], color="grey", ls=style, lw=1,
                   label=f"random recall@{k}")
    ax.set_xlabel("step")
    ax.set_ylabel("validation recall")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("retrieval recall during training")
    fig.tight_layout()
    png = os.path.join(out_dir, "retrieval_curves.png")
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
