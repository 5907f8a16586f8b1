"""Summary of benchmarks/compare_cpu_builds.sh output: per (label, case), the median ratio vs
PyTorch over every round's median, its min / max, mmcore's median ms and the load seen.

    python benchmarks/compare_cpu_builds.py results.jsonl
"""
import collections
import json
import statistics
import sys


def main(path):
    rows = collections.defaultdict(list)
    with open(path) as f:
        for line in f:
            if line.startswith("{") and "ratio_median" in line:
                r = json.loads(line)
                rows[(r["case"], r["label"])].append(r)
    print("| case | build / paths | ratio vs PyTorch, median (min–max) | mmcore ms (median) | "
          "best GFLOP/s (wall) | best GFLOP/s per CPU-s | load |")
    print("|---|---|---|---|---|---|---|")
    for (case, label), rs in sorted(rows.items()):
        ratios = [r["ratio_median"] for r in rs]
        ms = statistics.median(r["ms_mmcore"] for r in rs)
        best = max(r.get("gflops_mmcore_best", r["gflops_mmcore"]) for r in rs)
        cpu = max((r.get("gflops_mmcore_per_cpu_s") or 0) for r in rs)
        load = f'{min(r["load1"] for r in rs):.1f}–{max(r["load1"] for r in rs):.1f}'
        print(f"| {case} | {label} | {statistics.median(ratios):.2f} ({min(ratios):.2f}–"
              f"{max(ratios):.2f}) | {ms:.1f} | {best:.1f} | {cpu:.1f} | {load} |")


if __name__ == "__main__":
    main(sys.argv[1])
