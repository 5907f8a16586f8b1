"""`mmcore index` throughput on many documents vs Hugging Face BertModel (sdpa), and
`mmcore search` latency on a large index.

    python benchmarks/bench_index.py --docs 2000            # the issue's folder (long)
    python benchmarks/bench_index.py --docs 200 --rounds 2  # a shorter run
    python benchmarks/bench_index.py --docs 2000 --slices 20  # interleaved in 20 slices
    python benchmarks/bench_index.py --search-passages 100000 --docs 0

Throughput: a generated folder of `--docs` documents of 200-2,000 tokens (uniform, seeded).
Per round, in one process and alternating which goes first:
  * mmcore: `mmcore.index(folder, fresh_dir)` — reading the files, hashing, tokenizing,
    splitting passages, encoding (short files batched by length with per-sample lengths,
    window (128, 128), [CLS] global), pooling and writing the safetensors shards;
  * HF: `transformers.BertModel` (attn_implementation="sdpa") on the same texts, tokenized by
    the same tokenizer and cut into 512-token chunks ([CLS] 510 tokens [SEP]) in document
    order, batches of 16 padded to the longest, under torch.no_grad — encoding only.
Both count the same tokens (each document's tokens + [CLS]/[SEP]); the ratio is HF seconds /
mmcore seconds.  Same model weights (MiniLM-L6), fp32, torch's default threads.

``--slices K``: the documents are dealt round-robin into K sub-folders, and each round runs
the two sides slice by slice, alternating which goes first per slice, so that the two sides
are never more than one slice apart in time.  On a machine whose speed drifts (a shared or
throttled host: single rounds here swung 2.5x within minutes) the summed ratio then compares
like with like; the per-slice ratios' spread is printed to show how much the host drifted.
mmcore indexes each slice into its own index (its length batching sees one slice's files at
a time, which can only cost it).

Search: an index of `--search-passages` random unit vectors (384-d) with text, then
`Index.open(...).search(q, top_k=5)`: open + first search, and a warm search (model loaded).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402


def make_folder(path: str, docs: int, seed: int = 0, lo: int = 200, hi: int = 2000):
    """`docs` files of uniform(lo, hi) tokens of the reader's filler text."""
    from mmcore.models import default_text_model
    from mmcore.reading import _T, _W, Tokenizer

    tok = Tokenizer(default_text_model())
    rng = random.Random(seed)
    os.makedirs(path, exist_ok=True)
    total = 0
    for d in range(docs):
        target = rng.randint(lo, hi) - 2
        sents, n = [], 0
        while n < target:
            w = {k: rng.choice(v) for k, v in _W.items()}
            w["town2"], w["year"] = rng.choice(_W["town"]), rng.randint(1700, 1990)
            s = rng.choice(_T).format(**w)
            c = tok.count([s])[0]
            if n + c > target and sents:
                break
            sents.append(s)
            n += c
        with open(os.path.join(path, f"doc{d:05d}.txt"), "w") as f:
            f.write(" ".join(sents))
        total += n + 2
    return total


def hf_encode(model, tok, texts, chunk=512, batch=16):
    ids = [e.ids for e in tok.tok.encode_batch(texts, add_special_tokens=False)]
    pieces = [[tok.cls] + d[i:i + chunk - 2] + [tok.sep]
              for d in ids for i in range(0, max(len(d), 1), chunk - 2)]
    with torch.no_grad():
        for b in range(0, len(pieces), batch):
            group = pieces[b:b + batch]
            S = max(len(p) for p in group)
            x = torch.zeros(len(group), S, dtype=torch.long)
            m = torch.zeros(len(group), S, dtype=torch.long)
            for r, p in enumerate(group):
                x[r, :len(p)] = torch.tensor(p)
                m[r, :len(p)] = 1
            model(input_ids=x, attention_mask=m)
    return sum(len(d) + 2 for d in ids)


def _slices(folder: str, k: int) -> list:
    """Deal the files of `folder` round-robin into `k` sub-folders -> their paths (k == 1:
    [folder])."""
    if k <= 1:
        return [folder]
    names = sorted(os.listdir(folder))
    subs = [os.path.join(folder, f"slice{i:03d}") for i in range(k)]
    for p in subs:
        os.makedirs(p)
    for i, n in enumerate(names):
        os.rename(os.path.join(folder, n), os.path.join(subs[i % k], n))
    return subs


def throughput(docs: int, rounds: int, seed: int, slices: int = 1):
    import transformers

    import mmcore
    from mmcore.indexing import PassageEncoder
    from mmcore.models import default_text_model
    from mmcore.reading import Tokenizer

    work = tempfile.mkdtemp(prefix="bench-index-")
    folder = os.path.join(work, "docs")
    tokens = make_folder(folder, docs, seed)
    parts = _slices(folder, slices)
    texts = [[open(os.path.join(p, n)).read() for n in sorted(os.listdir(p))] for p in parts]
    d = default_text_model()
    hf = transformers.BertModel.from_pretrained(d, attn_implementation="sdpa").eval()
    tok = Tokenizer(d)
    pe = PassageEncoder(d)
    hf_encode(hf, tok, texts[0][:4])  # warm-up both
    pe.encode([pe.tokenize(x) for x in texts[0][:4]])
    n_tok = [sum(len(tok.document(x)[0]) for x in t) for t in texts]  # what both sides count
    rows, pair = [], []
    for r in range(rounds):
        secs = {"mmcore": 0.0, "hf": 0.0}
        load = os.getloadavg()[0]
        for i, (p, t) in enumerate(zip(parts, texts)):
            order = ["mmcore", "hf"] if (r + i) % 2 == 0 else ["hf", "mmcore"]
            took = {}
            for who in order:
                t0 = time.perf_counter()
                if who == "hf":
                    n = hf_encode(hf, tok, t)
                else:
                    res = mmcore.index(p, os.path.join(work, f"idx{r}-{i}"), encoder=pe)
                    n = res["tokens"]
                    assert res["encoded"] == len(t), res
                assert n == n_tok[i], (who, n, n_tok[i])
                took[who] = time.perf_counter() - t0
                secs[who] += took[who]
            pair.append(took["hf"] / took["mmcore"])
        for who in ("mmcore", "hf"):
            rows.append(dict(round=r, who=who, docs=docs, slices=len(parts), tokens=sum(n_tok),
                             seconds=round(secs[who], 2),
                             tokens_per_s=round(sum(n_tok) / secs[who]),
                             load_before=round(load, 1)))
            print(json.dumps(rows[-1]), flush=True)
    tm = sum(x["seconds"] for x in rows if x["who"] == "mmcore")
    th = sum(x["seconds"] for x in rows if x["who"] == "hf")
    pair.sort()
    summary = dict(docs=docs, tokens=tokens, rounds=rounds, slices=len(parts),
                   mmcore_seconds=round(tm, 1), hf_seconds=round(th, 1),
                   ratio_mmcore_over_hf=round(th / tm, 3),
                   slice_ratio_min=round(pair[0], 3),
                   slice_ratio_median=round(pair[len(pair) // 2], 3),
                   slice_ratio_max=round(pair[-1], 3),
                   threads=torch.get_num_threads(), torch=torch.__version__,
                   transformers=transformers.__version__,
                   load_after=round(os.getloadavg()[0], 1))
    print(json.dumps(summary), flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return summary


def search_latency(passages: int, seed: int = 0):
    from mmcore import indexing
    from mmcore.indexing import Index, _write_json, _write_shard, model_fingerprint
    from mmcore.models import default_text_model

    work = tempfile.mkdtemp(prefix="bench-search-")
    d = os.path.abspath(default_text_model())
    g = torch.Generator().manual_seed(seed)
    per = 25_000
    m = dict(format=indexing.FORMAT, version=indexing.VERSION,
             model=dict(path=d, fingerprint=model_fingerprint(d)), dim=384, window=[128, 128],
             root="/synthetic", files={}, shards=[], next_shard=0)
    os.makedirs(os.path.join(work, "shards"))
    for s0 in range(0, passages, per):
        n = min(per, passages - s0)
        name = f"{len(m['shards']):06d}.safetensors"
        files = [f"f{(s0 + i) // 20:06d}.txt" for i in range(0, n, 20)]
        rows = [(i // 20, 100 * (i % 20), 100 * (i % 20) + 90, f"passage {s0 + i} " * 8)
                for i in range(n)]
        v = torch.nn.functional.normalize(torch.randn(n, 384, generator=g), dim=-1)
        _write_shard(os.path.join(work, "shards", name), files, rows, v)
        for f in files:
            m["files"][f] = dict(sha256="-", size=0, tokens=0, passages=20, shard=name)
        m["shards"].append(name)
    _write_json(os.path.join(work, "manifest.json"), m)
    t = time.perf_counter()
    idx = Index.open(work)
    idx._load()
    t_open = time.perf_counter() - t
    idx.encoder()  # model load, reported apart
    t = time.perf_counter()
    hits = idx.search("which passage mentions the harbour?", 5)
    t_first = time.perf_counter() - t
    times = []
    for q in ["a question about bridges", "who sold the mill?", "rain in April"] * 4:
        t = time.perf_counter()
        idx.search(q, 5)
        times.append(time.perf_counter() - t)
    res = dict(passages=len(idx), open_and_load_vectors_s=round(t_open, 3),
               first_search_s=round(t_first, 3), warm_search_s=round(min(times), 3),
               top=hits[0]["file"])
    print(json.dumps(res), flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--slices", type=int, default=1,
                    help="interleave the two sides slice by slice (see the module docstring)")
    ap.add_argument("--search-passages", type=int, default=0)
    a = ap.parse_args(argv)
    if a.docs and not 1 <= a.slices <= a.docs:
        ap.error(f"--slices must be between 1 and --docs ({a.docs}), got {a.slices}")
    if a.docs:
        throughput(a.docs, a.rounds, a.seed, a.slices)
    if a.search_passages:
        search_latency(a.search_passages, a.seed)


if __name__ == "__main__":
    main()
