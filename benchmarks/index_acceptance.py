"""Issue 25's acceptance run for `mmcore index` / `mmcore search` on a large generated folder.

    python benchmarks/index_acceptance.py --files 2000

1. `mmcore index DIR --out A` (a subprocess, as a user runs it) on `--files` files of the
   reader's filler text with five planted facts; each fact's question must return it at rank 1.
2. Change 10 files, run `mmcore index` again: exactly those 10 are encoded.
3. `mmcore index DIR --out B` killed with SIGKILL after its first commits, then run again to
   completion: B holds the same passages (files, offsets, text) as A after step 2, vectors
   equal within 1e-5.
Prints one JSON line per step.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

FACTS = [
    ("The treasurer of the rowing club is Philippa Quist.",
     "Who is the treasurer of the rowing club?"),
    ("Our new wifi password is marmalade sandwich.", "What is the new wifi password?"),
    ("The lighthouse keeper hides his spare keys inside a blue teapot.",
     "Where does the lighthouse keeper hide his spare keys?"),
    ("The annual cheese festival moved to the second weekend of September.",
     "When is the cheese festival?"),
    ("Doctor Okafor discovered the comet through a borrowed telescope.",
     "Who discovered the comet?"),
]


def make(folder, n, seed=0):
    from mmcore.reading import _T, _W

    rng = random.Random(seed)
    os.makedirs(folder, exist_ok=True)
    hosts = rng.sample(range(n), len(FACTS))
    for i in range(n):
        sents = []
        for _ in range(rng.randint(3, 9)):
            w = {k: rng.choice(v) for k, v in _W.items()}
            w["town2"], w["year"] = rng.choice(_W["town"]), rng.randint(1700, 1990)
            sents.append(rng.choice(_T).format(**w))
        if i in hosts:
            sents.insert(rng.randint(0, len(sents)), FACTS[hosts.index(i)][0])
        sub = os.path.join(folder, f"part{i % 10}")
        os.makedirs(sub, exist_ok=True)
        with open(os.path.join(sub, f"doc{i:05d}.txt"), "w") as f:
            f.write(" ".join(sents))
    return [f"part{h % 10}/doc{h:05d}.txt" for h in hosts]


def cli(*args, **kw):
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1")
    return subprocess.Popen([sys.executable, "-m", "mmcore", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def index_json(folder, out):
    t = time.perf_counter()
    p = cli("index", folder, "--out", out, "--json")
    o, e = p.communicate()
    assert p.returncode == 0, e
    r = json.loads(o)
    r["wall_s"] = round(time.perf_counter() - t, 1)
    r.pop("skipped")
    return r


def passages(out):
    from mmcore.indexing import Index

    _, rows = Index.open(out)._load()
    got = {}
    for sh, live in rows:
        for r in live.tolist():
            key = (sh.files[int(sh.t["file"][r])], int(sh.t["start"][r]), int(sh.t["end"][r]))
            got[key] = (sh.text(r), sh.t["vectors"][r])
    return got


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=2000)
    a = ap.parse_args(argv)
    from mmcore import indexing
    from mmcore.indexing import PassageEncoder

    work = tempfile.mkdtemp(prefix="index-acceptance-")
    folder, A, B = (os.path.join(work, x) for x in ("docs", "A", "B"))
    hosts = make(folder, a.files)
    r = index_json(folder, A)
    print(json.dumps(dict(step="index", **r)), flush=True)
    pe = PassageEncoder(window=(128, 128))
    ranks = []
    for (fact, q), host in zip(FACTS, hosts):
        hits = indexing.search(A, q, top_k=5, encoder=pe)
        ranks.append(next((h["rank"] for h in hits if h["file"] == host and fact in h["text"]),
                          None))
    print(json.dumps(dict(step="search", ranks=ranks, all_rank_1=ranks == [1] * len(FACTS))),
          flush=True)
    rng = random.Random(1)
    changed = rng.sample(sorted(os.path.relpath(os.path.join(d, f), folder)
                                for d, _, fs in os.walk(folder) for f in fs), 10)
    for c in changed:
        with open(os.path.join(folder, c), "a") as f:
            f.write(" A new line was added to this file today.")
    r = index_json(folder, A)
    print(json.dumps(dict(step="reindex_10_changed", encoded=r["encoded"],
                          unchanged=r["unchanged"], wall_s=r["wall_s"])), flush=True)
    p = cli("index", folder, "--out", B)
    man = os.path.join(B, "manifest.json")
    while p.poll() is None:
        if os.path.exists(man) and len(json.load(open(man))["files"]) >= a.files // 4:
            break
        time.sleep(0.5)
    p.send_signal(signal.SIGKILL)
    p.wait()
    before = len(json.load(open(man))["files"])
    r = index_json(folder, B)
    pa, pb = passages(A), passages(B)
    same_text = {k: v[0] for k, v in pa.items()} == {k: v[0] for k, v in pb.items()}
    diff = max(float((pa[k][1] - pb[k][1]).abs().max()) for k in pa) if same_text else None
    print(json.dumps(dict(step="kill_and_resume", files_at_kill=before, encoded_after=r["encoded"],
                          same_passages=same_text, max_vector_diff=diff,
                          ok=same_text and diff is not None and diff <= 1e-5)), flush=True)


if __name__ == "__main__":
    main()
