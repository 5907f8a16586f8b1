"""`mmcore read --tokens N` at scale: time, tokens/s, the reader's peak memory and the
process's maximum RSS (/usr/bin/time -v), for this tree and optionally a baseline tree (an
older checkout with its built mmcore/_C*.so), interleaved run by run.

    python benchmarks/read_scale.py --tokens 131072                     # this tree
    python benchmarks/read_scale.py --tokens 131072 --base /tmp/old    # + a baseline tree
    python benchmarks/read_scale.py --tokens 1048576 --seeds 0 1 2

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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[131072])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--base", help="a baseline tree (run before this tree, per case)")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                    help="more `mmcore read` options (e.g. --chunk 2048)")
    a = ap.parse_args(argv)
    for n in a.tokens:
        for s in a.seeds:
            for tree in ([a.base] if a.base else []) + [ROOT]:
                print(json.dumps(run(tree, n, s, a.extra)), flush=True)


if __name__ == "__main__":
    main()
