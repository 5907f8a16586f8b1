"""Turn benchmark JSON lines into markdown tables (per op and device) and plots: time vs
length (log-log) and the "mmcore x faster than <baseline>" ratios vs length (what
`mmcore bench --plot FILE` draws).

    python benchmarks/report.py results.jsonl [--plot out.png]
"""
import argparse
import json
import os
import re
import sys
from collections import defaultdict

try:
    from mmcore.benchmarks.harness import markdown_table
except ImportError:  # run as a script where mmcore is not importable: the sibling file
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
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


# the x axis: the op's own length, else the first of LENGTH_KEYS a row's shape has (LoRA
# shapes carry N = output features: their length is M, the tokens)
OP_LENGTH = {"window_attention": "N", "cross_attention": "Sq", "lora_linear": "M",
             "lora_peft": "M", "patch": "S", "train_step": "S"}
LENGTH_KEYS = ("N", "Sq", "S", "M")


def _length(r):
    shape = r.get("shape") or {}
    for k in (OP_LENGTH.get(r.get("op")),) + LENGTH_KEYS:
        if isinstance(shape.get(k), int):
            return k, shape[k]
    return None, None


def _stem(case, key):
    """The case label without its length ("fwd bidir w=±256 D=64 N=1024" -> "... D=64")."""
    return re.sub(rf"\s*\b{key}=\d+", "", case).strip()


def plot(rows, path):
    """Draw `rows` to `path`: per (op, device) a column of two panels --
    top: median ms vs length (log-log), one line per (impl, case without its length);
    bottom: "mmcore x faster than <baseline>" vs length (log y; the dashed line at 1 is
    parity, above it mmcore is faster), one line per (mmcore impl, baseline, case).
    The length is the op's (OP_LENGTH), else the first of N / Sq / S / M in a row's shape;
    a repeated point keeps the last row.  -> the number of series drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    times = defaultdict(lambda: defaultdict(dict))
    ratios = defaultdict(lambda: defaultdict(dict))
    shaky = defaultdict(list)  # panel -> (top/bottom, x, y) of unstable points
    axis = {}
    for r in rows:
        key, n = _length(r)
        if key is None or not r.get("median_ms"):
            continue
        panel = (r["op"], r.get("device_name", r.get("device", "?")))
        axis[panel] = key
        stem = _stem(r.get("case", ""), key)
        times[panel][(r["impl"], stem)][n] = r["median_ms"]
        if r.get("unstable"):
            shaky[panel].append((0, n, r["median_ms"]))
        if r.get("speedup") is not None:
            ratios[panel][(r["faster"], r["than"], stem)][n] = r["speedup"]
            if r.get("ratio_unstable"):
                shaky[panel].append((1, n, r["speedup"]))
    panels = sorted(times)
    if not panels:
        fig, ax = plt.subplots(figsize=(6, 2))
        ax.axis("off")
        ax.text(0.5, 0.5, "no timed rows with a length to plot", ha="center", va="center")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        print("plot: no timed rows with a length (N / Sq / S / M); wrote an empty figure",
              file=sys.stderr)
        return 0
    fig, axes = plt.subplots(2, len(panels), figsize=(7 * len(panels), 9), squeeze=False)
    colors = plt.get_cmap("tab20").colors  # 20 distinct colours: no repeats in a panel
    drawn = 0
    for col, panel in enumerate(panels):
        op, dev = panel
        top, bot = axes[0][col], axes[1][col]
        for i, ((impl, stem), pts) in enumerate(sorted(times[panel].items())):
            xs = sorted(pts)
            top.loglog(xs, [pts[x] for x in xs], marker="o", color=colors[i % len(colors)],
                       ls="-" if impl.startswith("mmcore") else "--", label=f"{impl} {stem}")
            drawn += 1
        top.set_title(f"{op} — {dev}", fontsize=9)
        top.set_xlabel(f"length {axis[panel]}")
        top.set_ylabel("median ms (lower is better)")
        top.grid(True, which="both", alpha=0.3)
        for i, ((faster, than, stem), pts) in enumerate(sorted(ratios[panel].items())):
            xs = sorted(pts)
            bot.loglog(xs, [pts[x] for x in xs], marker="s", color=colors[i % len(colors)],
                       label=f"{faster} vs {than} ({stem})")
            drawn += 1
        for k, ax in enumerate((top, bot)):
            pts = [(x, y) for j, x, y in shaky[panel] if j == k]
            if pts:
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker="x", s=60,
                           color="red", zorder=5, label="unstable (spread above limit)")
        bot.axhline(1.0, color="k", ls=":", lw=1)
        bot.set_title(f"{op}: mmcore x faster than baseline (> 1: mmcore faster)", fontsize=9)
        bot.set_xlabel(f"length {axis[panel]}")
        bot.set_ylabel("baseline ms / mmcore ms")
        bot.grid(True, which="both", alpha=0.3)
        top.legend(fontsize=6)
        if ratios[panel]:
            bot.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("jsonl")
    ap.add_argument("--plot", default=None)
    a = ap.parse_args()
    rows = load(a.jsonl)
    print(tables(rows))
    if a.plot:
        plot(rows, a.plot)
