"""Run peft's own LoRA tests with and without mmcore, and list what mmcore breaks.

    python tests/peer/run_peft_suite.py            # full: the LoRA tests of the cases mmcore
                                                   # converts (mmcore_peft_plugin, ~1,760 tests)
    python tests/peer/run_peft_suite.py --fast     # the CI selection (mmcore_peft_plugin.FAST)
    python tests/peer/run_peft_suite.py -k DoRA    # a pytest -k filter on top of the selection
    python tests/peer/run_peft_suite.py --json out.json

peft's ``tests/`` come from the source distribution on PyPI of the installed peft version
(``pip download --no-binary :all: --no-deps peft==<version>``), cached under ``.peer/`` at the
repository root (git-ignored); nothing of peft is copied into the repository.  The selected cases
of ``tests/test_custom_models.py`` run twice in subprocesses: once as they are, once with every
peft model that ``get_peft_model`` / ``PeftModel.from_pretrained`` return converted by
``mmcore.nn.convert_peft_model`` (``tests/peer/mmcore_peft_plugin.py``).  Prints the counts, the
converted layers per kind (nn.Linear / Conv1D bases, layers with lora_bias / DoRA adapters), the
LoRA calls served by ``mmcore.ops.lora_linear`` (per kind) and those left to peft's forward
(with reasons), and every test that passes without mmcore and fails with it.  Exit status 1 if there is one (or
if mmcore converted nothing / served no call), else 0.
"""
from __future__ import annotations

import argparse
import collections
import importlib.metadata
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CACHE = os.path.join(ROOT, ".peer")


def peft_tests(version, cache=CACHE):
    """-> the directory of peft `version`'s tests/, from its sdist (downloaded once)."""
    dest = os.path.join(cache, f"peft-{version}")
    tests = os.path.join(dest, "tests")
    if os.path.isfile(os.path.join(tests, "test_custom_models.py")):
        return tests
    os.makedirs(cache, exist_ok=True)
    sdist = os.path.join(cache, f"peft-{version}.tar.gz")
    if not os.path.isfile(sdist):
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:",
                   "--no-deps", f"peft=={version}", "-d", tmp]
            r = subprocess.run(cmd, capture_output=True, text=True)
            got = [f for f in os.listdir(tmp) if f.endswith(".tar.gz")]
            if r.returncode != 0 or not got:
                raise RuntimeError(f"could not download peft=={version}'s sdist "
                                   f"({' '.join(cmd)}):\n{r.stderr[-2000:]}")
            os.replace(os.path.join(tmp, got[0]), sdist)
    with tarfile.open(sdist) as tf:
        prefix = f"peft-{version}/tests/"
        members = [m for m in tf.getmembers() if m.name.startswith(prefix) and m.isfile()
                   and "/" not in m.name[len(prefix):]]
        if not members:
            raise RuntimeError(f"{sdist} holds no {prefix}")
        os.makedirs(tests, exist_ok=True)
        for m in members:
            with tf.extractfile(m) as src, open(os.path.join(tests, os.path.basename(m.name)),
                                                "wb") as out:
                out.write(src.read())
    # the sdist ships no tests/__init__.py, but the test modules import each other relatively
    open(os.path.join(tests, "__init__.py"), "a").close()
    return tests


def run_once(tests, mmcore_on, select, timeout, only=None, kfilter=None):
    """-> (result dict from the plugin, seconds).  only: node ids to run (else the selection)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        extra = {}
        if only is not None:
            extra["MMCORE_PEER_ONLY"] = os.path.join(tmp, "only.json")
            with open(extra["MMCORE_PEER_ONLY"], "w") as f:
                json.dump(sorted(only), f)
        env = dict(os.environ, MMCORE_PEER_MMCORE="1" if mmcore_on else "0",
                   MMCORE_PEER_SELECT=select, MMCORE_PEER_OUT=out, **extra,
                   PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]),
                   HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
                   PYTHONDONTWRITEBYTECODE="1")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               "-p", "mmcore_peft_plugin", "-o", "addopts=", "-W", "ignore",
               "--rootdir", os.path.dirname(tests), "tests/test_custom_models.py"]
        if kfilter:
            cmd += ["-k", kfilter]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, cwd=os.path.dirname(tests), env=env, capture_output=True,
                           text=True, timeout=timeout)
        dt = time.perf_counter() - t0
        if not os.path.isfile(out):
            raise RuntimeError(f"peft's suite did not run (exit {r.returncode}):\n"
                               f"{(r.stdout + r.stderr)[-4000:]}")
        with open(out) as f:
            res = json.load(f)
        res["pytest_tail"] = (r.stdout + r.stderr)[-3000:]
        return res, dt


def compare(off, on):
    """-> dict of counts and the regressions (pass without mmcore, not with it)."""
    o1, o2 = off["outcomes"], on["outcomes"]
    reg = sorted(n for n, v in o1.items() if v == "passed" and o2.get(n) != "passed")
    fixed = sorted(n for n, v in o2.items() if v == "passed" and o1.get(n) != "passed")
    both = sorted(n for n, v in o2.items() if v in ("failed", "error")
                  and o1.get(n) in ("failed", "error"))
    return {"tests": len(o1), "without_mmcore": dict(collections.Counter(o1.values())),
            "with_mmcore": dict(collections.Counter(o2.values())), "regressions": reg,
            "pass_only_with_mmcore": fixed, "fail_either_way": both}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fast", action="store_true",
                    help="the CI selection, run with mmcore; only tests that do not pass are "
                         "rerun without it")
    ap.add_argument("--json", help="write the summary here")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per pytest run")
    ap.add_argument("-k", dest="kfilter", help="a pytest -k expression on top of the selection")
    args = ap.parse_args(argv)
    version = importlib.metadata.version("peft")
    tests = peft_tests(version)
    select = "fast" if args.fast else "full"
    on, t_on = run_once(tests, True, select, args.timeout, kfilter=args.kfilter)
    if args.fast:  # the baseline only for the tests that failed with mmcore
        redo = [n for n, v in on["outcomes"].items() if v in ("failed", "error")]
        off, t_off = run_once(tests, False, select, args.timeout, only=redo) if redo else (
            {"outcomes": {}}, 0.0)
        off["outcomes"] = {**on["outcomes"], **off["outcomes"]}
    else:
        off, t_off = run_once(tests, False, select, args.timeout, kfilter=args.kfilter)
    summary = compare(off, on)
    summary.update(peft=version, selection=select, seconds={"without": round(t_off, 1),
                                                            "with": round(t_on, 1)},
                   converted_models=on.get("converted_models", 0),
                   converted_layers=on.get("converted_layers", 0),
                   converted_kinds=on.get("converted_kinds", {}), lora=on.get("lora", {}))
    print(f"peft {version} tests/test_custom_models.py, LoRA selection ({select}"
          f"{', -k ' + repr(args.kfilter) if args.kfilter else ''}): {summary['tests']} tests")
    print(f"  without mmcore: {summary['without_mmcore']}  ({t_off:.0f} s"
          f"{'; only the tests that failed with mmcore were run' if args.fast else ''})")
    print(f"  with mmcore:    {summary['with_mmcore']}  ({t_on:.0f} s)")
    lo = summary["lora"]
    print(f"  mmcore: {summary['converted_layers']} peft layers converted in "
          f"{summary['converted_models']} models; {lo.get('op_calls', 0)} LoRA calls on "
          f"mmcore.ops.lora_linear, {lo.get('fallback_calls', 0)} on peft's forward")
    kinds = summary["converted_kinds"]
    print("  converted layers per kind: " + (", ".join(
        f"{k} {kinds.get(k, 0)}" for k in ("Linear", "Conv1D", "lora_bias", "DoRA")) or "-"))
    kc = lo.get("kind_calls", {})
    print("  op calls per kind: " + ", ".join(
        f"{k} {kc.get(k, 0)}" for k in ("Conv1D", "lora_bias", "DoRA")))
    for why, n in sorted(lo.get("fallback_reasons", {}).items(), key=lambda kv: -kv[1]):
        print(f"    peft's forward {n:6d}x: {why}")
    for n in summary["fail_either_way"][:10]:
        print(f"  fails with and without mmcore (peft's own): {n}")
    print(f"  pass without mmcore, fail with it: {len(summary['regressions'])}")
    for n in summary["regressions"][:40]:
        print(f"    {n}  ->  {on['outcomes'].get(n, 'not run')}")
    if len(summary["regressions"]) > 40:
        print(f"    ... and {len(summary['regressions']) - 40} more (--json for all)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    bad = summary["regressions"] or not summary["converted_layers"] or not lo.get("op_calls")
    if bad and not summary["regressions"]:
        print("  mmcore converted no layer or served no call: the run proves nothing")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
