"""Turn benchmark JSON lines into markdown tables (per op and device) and a log-log plot of
time vs sequence length for rows whose shape has "N".

    python benchmarks/report.py results.jsonl [--plot out.png]
"""
import argparse
import json
import os
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(__file__))
from harness import markdown_table  # noqa: E402


def load(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def tables(rows):
    groups = defaultdict(list)
    for r in rows:
        groups[(r["op"], r["device_name"])].append(r)
    out = []
    for (op, dev), rs in groups.items():
        v = rs[0]["versions"]
        out.append(f"### {op} — {dev}\n\nversions: " +
                   ", ".join(f"{k} {x}" for k, x in v.items()) + "\n\n" + markdown_table(rs))
    return "\n\n".join(out)


def plot(rows, path):
    """Log-log median ms vs N: one panel per (op, device), one line per (impl, case without
    its " N=..." part) with >= 2 sizes; a repeated point keeps the file's last row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        n = r.get("shape", {}).get("N")
        if n and "median_ms" in r:
            key = (r["impl"], r["case"].split(" N=")[0])
            panels[(r["op"], r.get("device_name", r["device"]))][key][n] = r["median_ms"]
    panels = {k: {s: sorted(p.items()) for s, p in v.items() if len(p) >= 2}
              for k, v in sorted(panels.items())}
    panels = {k: v for k, v in panels.items() if v}
    if not panels:
        print("plot: no series with two or more N; nothing drawn", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 5), squeeze=False)
    for ax, ((op, dev), series) in zip(axes[0], panels.items()):
        colors = plt.get_cmap("tab20").colors  # 20 distinct colours: no repeats in a panel
        for i, ((impl, case), pts) in enumerate(sorted(series.items())):
            ax.loglog([p[0] for p in pts], [p[1] for p in pts], marker="o",
                      color=colors[i % len(colors)],
                      ls="-" if impl.startswith("mmcore") else "--", label=f"{impl} {case}")
        ax.set_title(f"{op} — {dev}", fontsize=9)
        ax.set_xlabel("sequence length N")
        ax.set_ylabel("median ms")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("jsonl")
    ap.add_argument("--plot", default=None)
    a = ap.parse_args()
    rows = load(a.jsonl)
    print(tables(rows))
    if a.plot:
        plot(rows, a.plot)
