"""Memory of the chunked top-k retrieval over a 1M × 384 gallery (issue 14's target: within
2 GB of extra memory).

    python benchmarks/retrieval_memory.py [--n 1000000] [--dim 384] [--queries 1000]

The gallery is built the way a task builds it — embeddings added batch by batch to a
RetrievalIndex (normalised, kept as chunks) — then searched (top-10) and ranked (first
relevant item, 1,000 classes).  Peak RSS is sampled every 2 ms (reading.PeakMemory); "extra"
is the peak minus the RSS before the step.  Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from mmcore.reading import PeakMemory
from mmcore.train.retrieval_index import RetrievalIndex


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=65_536, help="gallery embeddings per add()")
    ap.add_argument("--classes", type=int, default=1000)
    a = ap.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    idx = RetrievalIndex(a.dim)
    out = {"n": a.n, "dim": a.dim, "queries": a.queries, "threads": torch.get_num_threads(),
           "max_bytes": idx.max_bytes}
    with PeakMemory("cpu") as m:
        for i in range(0, a.n, a.batch):
            b = min(a.batch, a.n - i)
            idx.add(torch.randn(b, a.dim, generator=g), torch.arange(i, i + b) % a.classes)
    out["gallery_bytes"] = a.n * a.dim * 4
    out["build_peak_rss_delta"] = m.peak
    q = torch.randn(a.queries, a.dim, generator=g)
    ql = torch.randint(0, a.classes, (a.queries,), generator=g)
    for name, fn in (("search_top10", lambda: idx.search(q, 10)),
                     ("ranks", lambda: idx.ranks(q, ql))):
        t = time.perf_counter()
        with PeakMemory("cpu") as m:
            fn()
        out[f"{name}_seconds"] = round(time.perf_counter() - t, 1)
        out[f"{name}_extra_bytes"] = m.peak
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
