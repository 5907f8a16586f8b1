"""A LoRA fine-tuning step (forward, loss, backward, AdamW step) of MiniLM-L6 for sequence
classification: mmcore.train's model (fused LoRA op, window attention) against Hugging Face
BertForSequenceClassification + peft LoRA, same weights, same LoRA config (r=8, alpha=16,
query/value), same batch, fused AdamW over the trainable parameters on both sides.

    python benchmarks/bench_train.py            # 512 and 4096 tokens, prints a table
    python benchmarks/bench_train.py --quick    # 512 tokens, batch 1, fewer repeats
    mmcore bench --op train --device cpu        # the same through the runner

At 512 tokens both sides use full attention.  At 4096 tokens mmcore reads in long-document
mode (window (128, 128) + global [CLS]); HF + peft has no such mode for BERT and uses full
attention (SDPA) over 4096 positions, its 512-entry position table tiled to 4096 (what mmcore's
wrapped positions compute).  Dropout is off on both sides (mmcore's encoder has none), so the
two compute the same function at 512 tokens.
"""
from __future__ import annotations

import torch

from mmcore.benchmarks import harness

OP = "train_step"


def _hf(model_dir, S, device):
    from peft import LoraConfig, get_peft_model
    from transformers import BertForSequenceClassification

    m = BertForSequenceClassification.from_pretrained(
        model_dir, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        attn_implementation="sdpa")
    if S > m.config.max_position_embeddings:  # tile the learned positions, as mmcore wraps
        emb = m.bert.embeddings
        old = emb.position_embeddings.weight.data
        reps = -(-S // old.shape[0])
        emb.position_embeddings = torch.nn.Embedding.from_pretrained(old.repeat(reps, 1)[:S],
                                                                     freeze=False)
        for name in ("position_ids", "token_type_ids"):
            if hasattr(emb, name):
                buf = getattr(emb, name)
                new = torch.arange(S)[None] if name == "position_ids" else \
                    torch.zeros(1, S, dtype=buf.dtype)
                emb.register_buffer(name, new, persistent=False)
        m.config.max_position_embeddings = S
    pm = get_peft_model(m, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                      modules_to_save=["classifier"]))
    return pm.to(device).train()


def _ours(model_dir, window, device):
    from mmcore.models import TextEncoder
    from mmcore.train.modes import apply_mode
    from mmcore.train.tasks.classification import SequenceClassifier

    enc = TextEncoder.from_pretrained(model_dir, pooler=True)
    m = SequenceClassifier(enc, 2, pooling="cls", window=window, dropout=0.0)
    apply_mode(m, "lora", target_modules=["q", "v"], r=8, lora_alpha=16)
    return m.to(device).train()


def _opt(model, device):
    from mmcore.train.optim import fused_available

    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                             fused=fused_available(device))


def _step(model, opt, kwargs):
    def step():
        opt.zero_grad(set_to_none=True)
        out = model(**kwargs)
        loss = out["loss"] if isinstance(out, dict) else out.loss
        loss.backward()
        opt.step()
    return step


def run(quick: bool, device: str) -> list:
    """Rows for `mmcore bench --op train`: per length, HF + peft (the baseline) and mmcore."""
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return [harness.row(OP, "all", "hf+peft", {}, torch.float32, device, None,
                            note="transformers / peft not installed: nothing measured")]
    from mmcore.models import default_text_model

    model_dir = default_text_model()
    # (tokens, batch, window): full attention at 512 for both; long-document mode for mmcore
    # beyond (and, for reference, at 512 too)
    cases = [(512, 1, 0)] if quick else \
        [(512, 4, 0), (512, 4, 128), (4096, 1, 128)]
    timer = (lambda fn: harness.time_fn(fn, device, warmup=1, rep=2)) if quick else \
        (lambda fn: harness.time_fn(fn, device, warmup=1, rep=5))
    rows, hf_ms = [], {}
    for S, B, window in cases:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(1000, 28000, (B, S), generator=g).to(device)
        labels = torch.randint(0, 2, (B,), generator=g).to(device)
        lengths = torch.full((B,), S, device=device)
        shape = {"B": B, "S": S, "r": 8, "window": window or None}
        mode = "full attention" if not window else f"long-document mode, window {window}"
        case = f"LoRA step S={S} B={B}"
        if (S, B) not in hf_ms:  # the baseline once per shape
            torch.manual_seed(0)
            hf = _hf(model_dir, S, device)
            t_hf = timer(_step(hf, _opt(hf, device), dict(input_ids=ids, labels=labels)))
            rows.append(harness.row(OP, case, "hf+peft (sdpa, full attention)", shape,
                                    torch.float32, device, t_hf))
            hf_ms[(S, B)] = t_hf["median_ms"]
            del hf
        ours = _ours(model_dir, window, device)
        t_ours = timer(_step(ours, _opt(ours, device),
                             dict(input_ids=ids, lengths=lengths, labels=labels)))
        rows.append(harness.row(OP, case, f"mmcore.train ({mode})", shape, torch.float32,
                                device, t_ours, baseline_ms=hf_ms[(S, B)],
                                baseline="hf+peft (sdpa, full attention)"))
        del ours
    return rows


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="append rows to this JSON-lines file")
    a = ap.parse_args()
    rows = run(a.quick, a.device)
    print(f"device: {harness.device_name(a.device)}; versions {harness.versions()}")
    print(harness.markdown_table(rows))
    if a.out:
        harness.emit(rows, a.out)
