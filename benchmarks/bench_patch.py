"""Benchmark: mmcore.patch end to end -- forward and training-step time and peak memory of
patched models vs the same models unpatched on HF's sdpa and eager paths.

Models are built from transformers config classes with random weights (no downloads), from
tiny to base size: BERT (full attention at <= 512 tokens; LongContext window + global token
past that, where the unpatched baselines get the same extended position table and an explicit
dense 4-D window mask, which is what makes them run out of memory), ModernBERT (local window
128 / global every 3rd layer), Mistral (causal sliding window) and Llama (full causal).
Rows whose dense mask / score matrix would not fit the memory budget are reported with a note
instead of run (CPU), or tried and reported as out of memory (CUDA).

    mmcore bench --op patch [--quick]
"""
from __future__ import annotations

import copy
import gc
import os

import torch

from mmcore.benchmarks import harness

OP = "patch"
CPU_BUDGET = int(os.environ.get("MMCORE_BENCH_CPU_BYTES", 3 << 30))


def _hf():
    import transformers as T
    from transformers.utils import logging
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    return T


def _models(quick):
    T = _hf()
    enc = dict(vocab_size=30522, attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)
    bert_mini = ("bert-mini", lambda: T.BertModel(T.BertConfig(
        hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
        **enc)), "encoder")
    bert_base = ("bert-base", lambda: T.BertModel(T.BertConfig(**enc)), "encoder")
    modern = ("modernbert-small", lambda: T.ModernBertModel(T.ModernBertConfig(
        vocab_size=50368, hidden_size=256, intermediate_size=384, num_hidden_layers=6,
        num_attention_heads=4, local_attention=128, global_attn_every_n_layers=3,
        max_position_embeddings=8192, attention_dropout=0.0, mlp_dropout=0.0,
        embedding_dropout=0.0)), "encoder")
    dec = dict(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
               num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=65536,
               attention_dropout=0.0)
    mistral = ("mistral-tiny-sw256", lambda: T.MistralForCausalLM(T.MistralConfig(
        sliding_window=256, **dec)), "decoder")
    llama = ("llama-tiny", lambda: T.LlamaForCausalLM(T.LlamaConfig(**dec)), "decoder")
    if quick:  # tiny models, two lengths, HF's sdpa path only, no peak memory: seconds
        bert_tiny = ("bert-tiny", lambda: T.BertModel(T.BertConfig(
            vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=256, attention_probs_dropout_prob=0.0,
            hidden_dropout_prob=0.0)), "encoder")
        return [(bert_tiny, [256, 1024], [])]  # training steps: `--op train`
    return [(bert_mini, [512, 2048, 8192, 16384], [512, 2048]),
            (bert_base, [512, 4096, 16384], [512]),
            (modern, [1024, 4096], [1024]),
            (mistral, [1024, 4096, 16384], [1024]),
            (llama, [1024, 4096], [1024])]


def _dense_bytes(model, B, S, impl):
    """What the unpatched path allocates per layer for its dense (S, S) mask and scores."""
    cfg = model.config
    H = cfg.num_attention_heads
    mask = B * S * S * 4
    if impl == "hf-eager":
        return mask + 2 * B * H * S * S * 4
    return mask + B * H * S * S * 4  # sdpa math / CPU path with a mask: scores once


def _window_mask(B, S, w, G, dtype, device):
    i = torch.arange(S, device=device)[:, None]
    j = torch.arange(S, device=device)[None, :]
    allowed = ((i - j).abs() <= w) | (j < G) | (i < G)
    m = torch.where(allowed, torch.zeros((), dtype=dtype, device=device),
                    torch.finfo(dtype).min)
    return m[None, None].expand(B, 1, S, S)


def _inputs(model, kind, B, S, device):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, min(model.config.vocab_size, 30000), (B, S), generator=g)
    return {"input_ids": ids.to(device)}


def _step_fns(model, kw, train):
    def fwd():
        with torch.no_grad():
            model(**kw)

    def step():
        out = model(**kw)
        h = out.logits if hasattr(out, "logits") else out.last_hidden_state
        h.float().pow(2).mean().backward()
        model.zero_grad(set_to_none=True)
    return step if train else fwd


def _bench(rows, name, kind, base_model, S, B, train, device, dtype, quick):
    import mmcore
    T = _hf()
    max_pos = getattr(base_model.config, "max_position_embeddings", 0)
    long_ctx = kind == "encoder" and isinstance(base_model, T.BertModel) and S > max_pos
    w, G = (64, 1) if quick else (256, 1)
    case = f"{'train' if train else 'fwd'} {name} S={S}" + \
        (f" LongContext w={w} G={G}" if long_ctx else "")
    shape = {"B": B, "S": S, "layers": base_model.config.num_hidden_layers,
             "hidden": base_model.config.hidden_size}
    if harness.out_of_time():  # --budget spent
        rows.append(harness.skipped(OP, case, shape, dtype, device))
        return rows
    kw = _inputs(base_model, kind, B, S, device)
    results = {}
    for impl in ("mmcore", "hf-sdpa") if quick else ("mmcore", "hf-sdpa", "hf-eager"):
        m = copy.deepcopy(base_model)
        note = None
        args = dict(kw)
        if impl == "mmcore":
            mmcore.patch(m, long_context=mmcore.LongContext(window=w, global_tokens=G,
                                                            max_length=S)
                         if long_ctx else None)
        else:
            m.set_attn_implementation(impl.replace("hf-", ""))
            if long_ctx:
                from mmcore.patch.long_context import extend_embeddings
                extend_embeddings(m.embeddings, m.config, S)
            need = _dense_bytes(m, B, S, impl)
            if long_ctx:
                note_mask = "dense 4-D window mask"
            else:
                note_mask = "dense mask/scores"
            if device == "cpu" and need > CPU_BUDGET:
                note = (f"not run: the unpatched {note_mask} path needs ~{need / 2**30:.1f} "
                        f"GiB per layer (budget {CPU_BUDGET / 2**30:.0f} GiB on this shared "
                        "CPU) -- out of memory")
            elif long_ctx:
                args["attention_mask"] = _window_mask(B, S, w, G, dtype, device)
        if note is None:
            m = m.to(device=device, dtype=dtype)
            m.train(train)
            fn = _step_fns(m, args, train)
            try:
                t = harness.time_fn(fn, device, warmup=1, rep=2 if quick else 5)
                peak = None if quick else harness.peak_memory(fn, device)
            except torch.OutOfMemoryError as e:  # CUDA: the dense path does not fit
                t, peak, note = None, None, f"out of memory: {str(e).splitlines()[0][:120]}"
            results[impl] = t
        else:
            t, peak = None, None
        rows.append(harness.row(OP, case, impl, shape, dtype, device, t, peak=peak, note=note))
        del m
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    # mmcore's row against HF sdpa (the default HF path); each HF row: mmcore vs it
    harness.compare([r for r in rows if r["case"] == case], "mmcore", against="hf-sdpa")
    return rows


def _cache_bytes(cache):
    tot = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                tot += t.numel() * t.element_size()
    return tot


def _bench_generate(rows, device, dtype, quick):
    """Greedy generate with a sliding-window decoder: time, and the KV bytes the cache keeps
    (HF's sliding-window layers keep w - 1 positions) vs what a full cache would hold."""
    import mmcore
    T = _hf()
    cfg = T.MistralConfig(vocab_size=1000, hidden_size=128, intermediate_size=256,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          sliding_window=128, max_position_embeddings=65536,
                          attention_dropout=0.0)
    base = T.MistralForCausalLM(cfg).eval()
    P, N = (512, 8) if quick else (4096, 64)
    ids = torch.randint(5, 900, (1, P), generator=torch.Generator().manual_seed(0)).to(device)
    seqs = {}
    for impl in ("mmcore", "hf-sdpa"):
        m = copy.deepcopy(base)
        if impl == "mmcore":
            mmcore.patch(m)
        else:
            m.set_attn_implementation("sdpa")
        m = m.to(device=device, dtype=dtype)
        out = {}

        def gen():
            out["r"] = m.generate(ids, max_new_tokens=N, do_sample=False,
                                  return_dict_in_generate=True, pad_token_id=0)
        t = harness.time_fn(gen, device, warmup=1, rep=2 if quick else 3)
        kept = _cache_bytes(out["r"].past_key_values)
        per_pos = kept / max(1, out["r"].past_key_values.layers[0].keys.shape[2])
        full = per_pos * (P + N - 1)
        seqs[impl] = out["r"].sequences.cpu()
        rows.append(harness.row(OP, f"generate mistral-tiny-sw128 prompt={P} new={N}", impl,
                                {"B": 1, "prompt": P, "new": N}, dtype, device, t,
                                note=f"KV kept {kept / 2**20:.2f} MiB vs full cache "
                                     f"{full / 2**20:.2f} MiB"))
    same = torch.equal(seqs["mmcore"], seqs["hf-sdpa"])
    rows[-2]["note"] += f"; tokens identical to hf-sdpa: {same}"
    harness.compare(rows[-2:], "mmcore", against="hf-sdpa")


def run(quick: bool, device: str) -> list:
    _hf()
    torch.manual_seed(0)
    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    rows = []
    for (name, make, kind), fwd_lens, train_lens in _models(quick):
        base = make().eval()
        for S in fwd_lens:
            _bench(rows, name, kind, base, S, 1, False, device, dtype, quick)
        for S in train_lens:
            _bench(rows, name, kind, base, S, 1, True, device, dtype, quick)
        del base
        gc.collect()
    if not quick:
        _bench_generate(rows, device, dtype, quick)
    return rows


if __name__ == "__main__":  # python benchmarks/bench_patch.py [--quick] [--device cpu]
    import argparse
    import sys
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    sys.stdout.write(harness.markdown_table(run(a.quick, a.device)) + "\n")
