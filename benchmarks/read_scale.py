"""`mmcore read --tokens N` at scale: time, tokens/s, the reader's peak memory and the
process's maximum RSS (/usr/bin/time -v), for this tree and optionally a baseline tree (an
older checkout with its built mmcore/_C*.so), interleaved run by run.

    python benchmarks/read_scale.py --tokens 131072                     # this tree
    python benchmarks/read_scale.py --tokens 131072 --base /tmp/old    # + a baseline tree
    python benchmarks/read_scale.py --tokens 1048576 --seeds 0 1 2
    python benchmarks/read_scale.py --store-check 8192   # bf16 hidden storage vs the rule

Prints one JSON line per run (tree, tokens, seed, seconds, tokens_per_s, peak_memory_bytes,
max_rss_bytes, found_rank, load average before the run).  Threads: torch's default (all
cores); the machine's load is recorded because a shared machine slows every run alike.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(tree: str, tokens: int, seed: int, extra=()) -> dict:
    env = dict(os.environ, PYTHONPATH=tree, HF_HUB_OFFLINE="1")
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
        cmd = ["/usr/bin/time", "-v", "-o", tf.name, sys.executable, "-m", "mmcore", "read",
               "--tokens", str(tokens), "--seed", str(seed), "--json", "--no-progress",
               *extra]
        load = os.getloadavg()[0]
        p = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True)
        tv = tf.read()
    if p.returncode not in (0, 3):
        raise SystemExit(f"{tree}: exit {p.returncode}: {p.stderr[-2000:]}")
    res = json.loads(p.stdout)
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", tv).group(1)) * 1024
    wall = re.search(r"Elapsed \(wall clock\) time.*: (.+)", tv).group(1).strip()
    return dict(tree=tree, tokens=res["tokens"], seed=seed, seconds=round(res["seconds"], 1),
                tokens_per_s=round(res["tokens_per_s"]), peak_memory_bytes=res[
                    "peak_memory_bytes"], max_rss_bytes=rss, process_wall=wall,
                found_rank=res["demo"]["found_rank"], backend=res["backend"],
                load_before=round(load, 1))


def store_check(tokens: int, seed: int = 0) -> dict:
    """Would bf16 storage of the hidden states between layers keep the passage scores within
    the tolerance rule?  scores of encode_long(store_dtype=bf16) and of the fp32 default vs
    the fp64 forward (oracle) and the fp32 full-length forward (base)."""
    import numpy as np
    import torch

    sys.path.insert(0, ROOT)
    from mmcore import reading
    from mmcore.models import TextEncoder, default_text_model, mean_pool

    d = default_text_model()
    tok = reading.Tokenizer(d)
    enc, enc64 = TextEncoder.from_pretrained(d), TextEncoder.from_pretrained(d, dtype=torch.float64)
    doc = reading.needle_document(tokens, seed=seed, tokenizer=tok)
    ids, offs = tok.document(doc.text)
    spans = reading.split_passages(doc.text, offs)
    x = torch.from_numpy(ids.astype(np.int64))[None]
    w = (128, 128)
    with torch.no_grad():
        qvec = mean_pool(enc64(torch.tensor([tok.query(doc.query)])))[0]
        sc = {k: reading.passage_scores(h, spans, qvec) for k, h in dict(
            oracle=enc64(x, window=w, global_tokens=1)[0],
            base=enc(x, window=w, global_tokens=1)[0],
            fp32=enc.encode_long(x, window=w, global_tokens=1),
            bf16=enc.encode_long(x, window=w, global_tokens=1,
                                 store_dtype=torch.bfloat16)).items()}
    berr = float((sc["base"] - sc["oracle"]).abs().max())
    tol = 2 * berr + 1e-5 + 4 * torch.finfo(torch.float32).eps * float(sc["oracle"].abs().max())
    out = dict(tokens=len(ids), passages=len(spans), tolerance=tol, base_err=berr)
    for k in ("fp32", "bf16"):
        err = float((sc[k] - sc["oracle"]).abs().max())
        out[k] = dict(max_err=err, within_rule=err <= tol,
                      same_top1=int(sc[k].argmax()) == int(sc["oracle"].argmax()))
    print(json.dumps(out), flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[131072])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--base", help="a baseline tree (run before this tree, per case)")
    ap.add_argument("--store-check", type=int, metavar="TOKENS",
                    help="only: the bf16-storage check at TOKENS tokens")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                    help="more `mmcore read` options (e.g. --chunk 2048)")
    a = ap.parse_args(argv)
    if a.store_check:
        store_check(a.store_check)
        return
    for n in a.tokens:
        for s in a.seeds:
            for tree in ([a.base] if a.base else []) + [ROOT]:
                print(json.dumps(run(tree, n, s, a.extra)), flush=True)


if __name__ == "__main__":
    main()
