"""`mmcore bench` / `mmcore info` for a user without a checkout: results where the user says
(default the current directory), the plot, bad input refused before any work (one line,
exit 2), one ratio convention, the spread check, the roofline, and info's account of what
backend="auto" picks.

The end-to-end runs use `--smoke` (two tiny window cases, a few seconds): CI checks the
runner, not the speed; `--quick`'s minute is measured by hand (docs/benchmarks.md)."""
import json
import os
import subprocess
import sys
import textwrap
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES="")
ENV.pop("MMCORE_BENCH_OUT", None)
ENV.pop("MMCORE_BACKEND", None)


def _mmcore(*args, cwd, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "mmcore", *args], cwd=cwd,
                          capture_output=True, text=True, env=dict(ENV, **(env or {})),
                          timeout=timeout)


# ------------------------------------------------------------------ end to end, outside the tree
def test_bench_writes_rows_and_plot_where_asked_outside_the_checkout(tmp_path):
    before = set(os.listdir(os.path.join(ROOT, "benchmarks")))
    r = _mmcore("bench", "--smoke", "--op", "window_attention", "--plot", "t.png",
                "--out", "r.jsonl", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert len(rows) >= 4 and {x["impl"] for x in rows} >= {"mmcore:cpu", "sdpa-dense-mask"}
    with open(tmp_path / "t.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # one ratio convention: speedup = baseline ms / mmcore ms, named both ways
    by = {(x["case"], x["impl"]): x for x in rows}
    for x in rows:
        if "speedup" not in x:
            continue
        assert x["faster"].startswith("mmcore") and not x["than"].startswith("mmcore")
        fast, slow = by[(x["case"], x["faster"])], by[(x["case"], x["than"])]
        assert x["speedup"] == pytest.approx(slow["median_ms"] / fast["median_ms"])
    assert "roofline:" in r.stdout and "% roof" in r.stdout
    assert "mmcore x faster" in r.stdout
    # each mmcore:cpu row is compared with its case's fastest baseline (dense mask or chunked:
    # which one wins at N = 256 depends on the run), and the table names that baseline
    for x in rows:
        if x["impl"] == "mmcore:cpu" and "than" in x:
            base = [y for y in rows if y["case"] == x["case"] and y.get("median_ms")
                    and not y["impl"].startswith("mmcore")]
            assert x["than"] == min(base, key=lambda y: y["median_ms"])["impl"]
            assert f"faster than {x['than']}" in r.stdout
    # nothing written into the checkout
    assert set(os.listdir(os.path.join(ROOT, "benchmarks"))) == before


def test_bench_default_output_is_a_file_in_the_current_directory(tmp_path, monkeypatch,
                                                                  capsys):
    from mmcore import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MMCORE_BENCH_OUT", raising=False)
    assert cli.main(["bench", "--smoke", "--op", "window_attention", "--device", "cpu"]) == 0
    out = tmp_path / "mmcore-bench.jsonl"
    assert out.exists() and len(out.read_text().splitlines()) >= 4
    assert str(out) in capsys.readouterr().out


def test_a_spent_budget_turns_the_remaining_cases_into_skipped_rows(tmp_path, monkeypatch,
                                                                   capsys):
    from mmcore import cli

    monkeypatch.chdir(tmp_path)
    assert cli.main(["bench", "--quick", "--op", "window_attention", "--op", "cross_attention",
                     "--device", "cpu", "--budget", "0.001", "--out", "r.jsonl"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert {r["op"] for r in rows} == {"window_attention", "cross_attention"}
    # a case that started before the deadline finishes; every later one is a skipped row
    ran = {r["case"] for r in rows if "median_ms" in r}
    assert len(ran) <= 1 and all(r["op"] == "window_attention" for r in rows
                                 if r["case"] in ran)
    skipped = [r for r in rows if r["case"] not in ran]
    assert len(skipped) >= 3 and all("median_ms" not in r and "time box" in r["note"]
                                     for r in skipped)


# ------------------------------------------------------------------ bad input: before any work
def _main(argv, capsys):
    """cli.main(argv) in this process -> (exit code, stderr, seconds); an exception that
    escapes main() (a traceback for the user) fails the test."""
    import time

    from mmcore import cli

    capsys.readouterr()
    t0 = time.monotonic()
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err, time.monotonic() - t0


def test_bench_bad_input_is_one_line_exit_2_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    (tmp_path / "adir").mkdir()
    q = ["bench", "--quick", "--op", "window_attention"]
    cases = [  # (argv, what the one line must name)
        (q + ["--out", str(tmp_path / "adir")], "--out"),
        (q + ["--out", str(tmp_path / "nope" / "r.jsonl")], "--out"),
        (q + ["--out", ""], "--out"),
        (q + ["--plot", str(tmp_path / "adir")], "--plot"),
        (q + ["--plot", ""], "--plot"),
        (q + ["--plot", str(tmp_path / "t.nope")], "--plot"),
        (q + ["--device", "bogus"], "--device"),
        (q + ["--device", "meta"], "--device"),
        (q + ["--budget", "-1"], "--budget"),
        (q + ["--budget", "0"], "--budget"),
        (q + ["--budget", "nan"], "--budget"),
        (q + ["--budget", "inf"], "--budget"),
        (q + ["--budget", "abc"], "--budget"),
        (q + ["--no-save", "--out", str(tmp_path / "r.jsonl")], "--no-save"),
    ]
    import torch

    if not torch.cuda.is_available():
        cases += [(q + ["--device", "cuda"], "--device"), (q + ["--device", "cuda:3"], "--device"),
                  (["bench", "--tune", "--device", "cuda"], "--device")]
    for argv, name in cases:
        code, err, seconds = _main(argv, capsys)
        what = "mmcore " + " ".join(argv)
        assert code == 2, f"{what}: exit {code}, stderr {err!r}"
        lines = err.strip().splitlines()
        assert len(lines) == 1 and name in lines[0], f"{what}: {err!r}"
        assert "running" not in err and seconds < 20, \
            f"{what}: benchmarked before refusing ({seconds:.0f} s)"
    assert sorted(os.listdir(tmp_path)) == ["adir"] and os.listdir(tmp_path / "adir") == []


def test_plot_without_matplotlib_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # an environment without it
    code, err, _ = _main(["bench", "--quick", "--op", "window_attention", "--plot", "t.png"],
                         capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "pip install 'mmcore[plot]'" in err and "--plot" in err
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------ mmcore info
def test_info_flags_a_bad_backend_variable(monkeypatch, capsys):
    monkeypatch.setenv("MMCORE_BACKEND", "bogus")
    code, err, _ = _main(["info"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "MMCORE_BACKEND" in err and "bogus" in err


def test_info_says_which_backend_auto_picks_and_why(monkeypatch, capsys):
    from mmcore import cli

    monkeypatch.delenv("MMCORE_BACKEND", raising=False)
    assert cli.main(["info"]) == 0
    text = capsys.readouterr().out.split('backend="auto" on cpu', 1)[1]
    for what in ("window ±256, N=8192", "causal decoder window", "Sq=8192, Sk=577",
                 "LoRA 4096x4096 r=16"):
        assert what in text
    picks = [ln for ln in text.splitlines() if ln.lstrip().startswith(("inference ->",
                                                                          "training  ->"))]
    assert len(picks) >= 10 and all("priority" in ln or "dispatch table" in ln for ln in picks)


def test_info_pick_is_what_dispatch_selects():
    """Each line of info's table names the backend registry.select gives the same problem."""
    import dataclasses

    import torch

    from mmcore import cli_bench
    from mmcore.ops import registry

    for op, _, build in cli_bench._problems(torch.float32):
        for grad in (False, True):
            p = dataclasses.replace(build(grad), device="cpu")
            picked, why = cli_bench._why_auto(op, p)
            assert picked == registry.select(op, p, "auto").backend, why


# ------------------------------------------------------------------ harness conventions
@pytest.fixture
def harness():
    from mmcore.benchmarks import harness as h

    saved = dict(h._ROOFLINE)
    yield h
    h._ROOFLINE.clear()
    h._ROOFLINE.update(saved)


def _rows(h, times, unstable=()):
    return [h.row("op", "case", impl, {"N": 8}, "float32", "cpu",
                  {"median_ms": ms, "p20_ms": ms, "p80_ms": ms, "spread": 1.0,
                   **({"unstable": True} if impl in unstable else {})})
            for impl, ms in times.items()]


def test_compare_ratio_is_baseline_over_mmcore_both_ways(harness):
    rows = harness.compare(_rows(harness, {"mmcore:cpu": 2.0, "dense": 8.0, "chunked": 4.0,
                                           "floor": 1.0}), "mmcore:cpu", exclude=("floor",))
    r = {x["impl"]: x for x in rows}
    assert (r["mmcore:cpu"]["speedup"], r["mmcore:cpu"]["than"]) == (2.0, "chunked")
    assert (r["dense"]["speedup"], r["dense"]["faster"]) == (4.0, "mmcore:cpu")
    assert "speedup" not in r["floor"]
    table = harness.markdown_table(rows)
    assert "2.00x faster than chunked" in table and "mmcore:cpu 4.00x faster than this row" \
        in table
    slow = harness.compare(_rows(harness, {"mmcore:cpu": 4.0, "sdpa": 1.0}), "mmcore:cpu")
    assert slow[0]["speedup"] == 0.25 and "(4.00x slower)" in harness.markdown_table(slow)


def test_an_unstable_time_marks_the_row_and_every_ratio_it_enters(harness):
    rows = harness.compare(_rows(harness, {"mmcore:cpu": 2.0, "sdpa": 4.0, "other": 8.0},
                                 unstable={"sdpa"}), "mmcore:cpu")
    r = {x["impl"]: x for x in rows}
    assert "UNSTABLE" in r["sdpa"]["note"]
    assert r["sdpa"]["ratio_unstable"] and r["mmcore:cpu"]["ratio_unstable"]
    assert "ratio_unstable" not in r["other"]


def test_a_wide_spread_is_measured_again_once(harness, monkeypatch):
    wide = {"median_ms": 10.0, "p20_ms": 5.0, "p80_ms": 50.0}
    narrow = {"median_ms": 6.0, "p20_ms": 5.9, "p80_ms": 6.1}
    calls = []

    def fake(results):
        def once(fn, device, warmup, rep):
            calls.append(warmup)
            return dict(results[len(calls) - 1])
        return once

    monkeypatch.setattr(harness, "_time_once", fake([wide, narrow]))
    t = harness.time_fn(lambda: None, "cpu")
    assert len(calls) == 2 and t["median_ms"] == 6.0 and t["remeasured"] == 10.0
    assert "unstable" not in t
    calls.clear()
    monkeypatch.setattr(harness, "_time_once", fake([wide, wide]))
    t = harness.time_fn(lambda: None, "cpu")
    assert len(calls) == 2 and t["unstable"] and t["spread"] == 10.0
    assert "UNSTABLE" in harness.row("op", "c", "mmcore:cpu", {}, "float32", "cpu", t)["note"]
    calls.clear()
    monkeypatch.setattr(harness, "_time_once", fake([narrow]))
    assert "remeasured" not in harness.time_fn(lambda: None, "cpu") and len(calls) == 1


@pytest.mark.parametrize("fma_gflops", [500.0, 20.0, None])
def test_roofline_is_the_higher_of_fma_peak_and_measured_gemm(harness, monkeypatch,
                                                             fma_gflops):
    # a 1024^3 GEMM in 21.47 ms is 0.1 TFLOP/s
    monkeypatch.setattr(harness, "_time_once",
                        lambda fn, device, warmup, rep: {"median_ms": 2 * 1024 ** 3 / 1e8})
    harness._ROOFLINE.clear()
    if fma_gflops is None:
        monkeypatch.setitem(sys.modules, "mmcore.cpu_info", None)  # not importable
    else:
        fake = types.ModuleType("mmcore.cpu_info")
        fake.fma_peak = lambda threads=None: dict(isa="avx2", vector_bits=256,
                                                  gflops_per_core=fma_gflops / 2,
                                                  gflops_all=fma_gflops, threads=threads or 2)
        fake.cpu_isa = lambda: "avx2"
        monkeypatch.setitem(sys.modules, "mmcore.cpu_info", fake)
    rl = harness.roofline("cpu")
    line = harness.roofline_line("cpu")
    assert rl["gemm_tflops"] == pytest.approx(0.1)
    if fma_gflops == 500.0:
        assert rl["roof"] == "fma" and rl["roof_tflops"] == pytest.approx(0.5)
        assert "FMA peak 0.5 TFLOP/s" in line and "(FMA peak)" in line
    elif fma_gflops == 20.0:  # the probe below a measured GEMM: the GEMM is the roof
        assert rl["roof"] == "gemm" and rl["roof_tflops"] == pytest.approx(0.1)
        assert "measured GEMM (above the FMA probe)" in line
    else:
        assert rl["roof"] == "gemm" and "no FMA peak" in line
    r = harness.row("op", "c", "mmcore:cpu", {}, "float32", "cpu",
                    {"median_ms": 1.0, "p20_ms": 1.0, "p80_ms": 1.0, "spread": 1.0},
                    flops=0.05e12 * 1e-3)
    assert r["pct_roofline"] == pytest.approx(100 * 0.05 / rl["roof_tflops"])


# ------------------------------------------------------------------ installed layout
def test_benchmarks_import_as_a_package_without_top_level_names(tmp_path):
    """Every module `mmcore bench` runs imports as mmcore.benchmarks.<name> from outside the
    tree, without putting benchmarks/ on sys.path (as from an installed wheel)."""
    from mmcore.cli_bench import BENCH_MODULES

    names = sorted({n for ns in BENCH_MODULES.values() for n in ns} | {"tune", "report"})
    code = textwrap.dedent(f"""
        import importlib, sys
        for n in {names!r}:
            importlib.import_module("mmcore.benchmarks." + n)
        top = sorted(m for m in sys.modules if m in ("benchmarks", "harness", "tune",
                     "report") or m.startswith("bench_"))
        print("TOP", top)
        print("PATH", [p for p in sys.path if p.rstrip("/").endswith("benchmarks")])
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV,
                       cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "TOP []" in r.stdout and "PATH []" in r.stdout, r.stdout
