"""Run transformers' own model tests with and without mmcore, family by family, and report what
mmcore breaks and how much of the attention its op served.

    python tests/peer/run_hf_models.py                          # the 19 families, both modes
    python tests/peer/run_hf_models.py mistral gemma3 --json out.json
    python tests/peer/run_hf_models.py --select slow mllama     # the slow eager-vs-sdpa tests
    python tests/peer/run_hf_models.py --tests-dir ~/src/transformers/tests qwen2

Test sources: transformers ships its model tests in neither the wheel nor the sdist, so they come
from a checkout: ``--tests-dir`` (an existing one's ``tests/``), else ``.peer/hf-tests-<version>``
(git-ignored), made on first use by a shallow, sparse ``git clone --branch v<version>`` of
github.com/huggingface/transformers (``tests/`` and ``utils/``), or ``--from-git GITDIR --rev REV``
(an export from a local clone).  Nothing of transformers is copied into this repository.  The
few pip packages the test helpers import and the venv lacks (TEST_DEPS) go to
``.peer/hf-test-deps`` (``pip install --no-deps --target``), never into the environment.

Each family's ``tests/models/<family>/test_modeling_<family>.py`` runs in two pytest subprocesses
(``tests/peer/mmcore_hf_plugin.py``): "base", transformers as is, and "mmcore", where every model
whose attention resolves to "sdpa" is patched with ``mmcore.patch`` when it is built (the eager
reference models of the eager-vs-sdpa tests stay eager, and so do the eager sub-models of a
composite model whose other parts are on sdpa: only the sdpa parts are patched; Longformer,
which transformers never runs on sdpa, is patched whatever its implementation, and Gemma-2,
also never on sdpa, wherever its "eager" was not asked for: FORCE_PATCH).
Reported per family: passed / failed / skipped per mode, REGRESSIONS (pass in base, not in
mmcore), the expected differences (EXPECTED_DIFFERENT: tests that assert the
implementation's name is "sdpa"), and the attention calls mmcore served with its op vs. its dense
path, with the reasons (``mmcore.patch.hf_interface.STATS``).  Exit status 1 if there is a
regression, else 0.

``--select``: "default" is what transformers' CI runs (RUN_SLOW unset: @slow tests skip);
"slow" runs the slow eager-vs-sdpa equivalence tests (RUN_SLOW=1, ``-k eager_matches_sdpa``),
the tests the issue's fallback numbers come from.  ``-k`` narrows either.
"""
from __future__ import annotations

import argparse
import ast
import collections
import importlib.metadata
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CACHE = os.environ.get("MMCORE_PEER_CACHE", os.path.join(ROOT, ".peer"))
REPO_URL = "https://github.com/huggingface/transformers"

# the families of issue 26, the most relevant to mmcore's masks first
FAMILIES = ("mistral", "gemma3", "mllama", "paligemma", "qwen2", "llava_onevision", "longformer",
            "gemma2", "modernbert", "llama", "llava", "llava_next", "idefics3", "vipllava",
            "clip", "siglip", "bert", "roberta", "gpt2")
# transformers never selects sdpa for these, so their models are "eager"; patch them anyway:
# "1" = whatever the implementation (Longformer: mmcore maps its own attention); "default" =
# where "eager" is transformers' own choice, not asked for (Gemma-2: a model built with
# attn_implementation="eager" -- the reference of a comparison, test_attention_outputs, which
# wants the weights and sets config.output_attentions, allowed by transformers on "eager"
# only -- stays eager).  A patched model asked for output_attentions=True in its forward
# returns the weights from mmcore's dense path (counted as a dense call with that reason).
FORCE_PATCH = {"longformer": "1", "gemma2": "default"}
SELECTIONS = {"default": ({}, None),
              "slow": ({"RUN_SLOW": "1"}, "eager_matches_sdpa")}
# Tests whose failure with mmcore is expected, by test function name: each asserts that the
# model's attention implementation is named "sdpa" after loading or switching, and under
# mmcore mode the name is "mmcore" by design.  Listed in the report, never counted as
# regressions.  Keep this small; every entry says why, and was seen failing for that reason
# (2026-12-07: the first in mistral, qwen2, gemma3, mllama; the second in llava_onevision).
EXPECTED_DIFFERENT = {
    "test_sdpa_can_dispatch_non_composite_models":
        "asserts model.config._attn_implementation == 'sdpa' after loading with sdpa",
    "test_sdpa_can_dispatch_composite_models":
        "asserts each sub-config's _attn_implementation == 'sdpa' after loading with sdpa",
}
# pip packages transformers' test helpers import at module level (installed, if the venv lacks
# them, into .peer/hf-test-deps with --no-deps): import name -> distribution
TEST_DEPS = {"parameterized": "parameterized", "httpx": "httpx", "httpcore": "httpcore",
             "sniffio": "sniffio", "certifi": "certifi", "requests": "requests",
             "urllib3": "urllib3", "charset_normalizer": "charset_normalizer"}
PASSED = ("passed", "xpassed")
SRC_COPY = "src-of-tests"  # export_tests: the checkout's testing_utils.py, for version_gap


class UsageError(Exception):
    """Bad command-line input: one line on stderr, exit status 2."""


# ------------------------------------------------------------------ test sources
def test_file(tests, family):
    return os.path.join(tests, "models", family, f"test_modeling_{family}.py")


def resolve_tests_dir(path):
    """`path` is a checkout or its tests/ -> the tests/ directory (UsageError if it is neither)."""
    path = os.path.abspath(os.path.expanduser(path))
    for cand in (path, os.path.join(path, "tests")):
        if os.path.isfile(os.path.join(cand, "test_modeling_common.py")):
            return cand
    raise UsageError(f"--tests-dir {path}: no test_modeling_common.py there nor in its tests/ "
                     "(give transformers' tests/ directory or the checkout holding it)")


def clone_tests(version, cache=CACHE):
    """-> tests/ of a shallow, sparse clone of transformers at tag v<version> (made once)."""
    dest = os.path.join(cache, f"hf-tests-{version}")
    tests = os.path.join(dest, "tests")
    if os.path.isfile(os.path.join(tests, "test_modeling_common.py")):
        return tests
    if shutil.which("git") is None:
        raise UsageError("git is not installed: pass --tests-dir (a checkout's tests/)")
    os.makedirs(cache, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f"hf-tests-{version}.", dir=cache)
    cmds = [["git", "clone", "-q", "--depth", "1", "--branch", f"v{version}", "--filter=blob:none",
             "--sparse", REPO_URL, tmp],
            ["git", "-C", tmp, "sparse-checkout", "set", "tests", "utils"]]
    for cmd in cmds:
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise UsageError(f"could not get transformers v{version}'s tests ({' '.join(cmd)}: "
                             f"{(r.stderr.strip().splitlines() or ['?'])[-1]}); pass --tests-dir")
    if os.path.isdir(dest):
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    link_installed_src(dest)
    return tests


def link_installed_src(dest):
    """dest/src/transformers -> the installed package.  Transformers' test helpers import the
    ``src/transformers`` next to ``tests/`` (``direct_transformers_import``): in a checkout of
    the tests alone that must be the installed version's package, as an editable install has."""
    link = os.path.join(dest, "src", "transformers")
    if not os.path.lexists(link):
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(importlib.util.find_spec("transformers").submodule_search_locations[0], link)


def export_tests(gitdir, rev, families, cache=CACHE):
    """-> tests/ exported from a local git repository of transformers at `rev` (made once):
    tests/ (of the other models only the families'), utils/, and src/transformers/testing_utils
    (where the version-gap shims take their constants from)."""
    r = subprocess.run(["git", f"--git-dir={_git_dir(gitdir)}", "rev-parse", "--verify",
                        f"{rev}^{{commit}}"], capture_output=True, text=True)
    if r.returncode != 0:
        raise UsageError(f"--from-git {gitdir}: no commit {rev!r} there")
    sha = r.stdout.strip()
    dest = os.path.join(cache, f"hf-tests-{sha[:12]}")
    tests = os.path.join(dest, "tests")
    ls = subprocess.run(["git", f"--git-dir={_git_dir(gitdir)}", "ls-tree", "--name-only", sha,
                         "tests/", "tests/models/"], capture_output=True, text=True, check=True)
    paths = [p for p in ls.stdout.split() if not p.startswith("tests/models")]
    paths += ["tests/models/__init__.py", "utils", "src/transformers/testing_utils.py"]
    paths += [f"tests/models/{f}" for f in families]
    os.makedirs(dest, exist_ok=True)
    arch = subprocess.Popen(["git", f"--git-dir={_git_dir(gitdir)}", "archive", sha, *paths],
                            stdout=subprocess.PIPE)
    subprocess.run(["tar", "x", "-C", dest], stdin=arch.stdout, check=True)
    if arch.wait() != 0:
        raise UsageError(f"--from-git {gitdir}: git archive of {sha[:12]} failed")
    # not under src/: some test helpers import a src/transformers they find next to tests/
    os.makedirs(os.path.join(dest, SRC_COPY), exist_ok=True)
    os.replace(os.path.join(dest, "src", "transformers"), os.path.join(dest, SRC_COPY,
                                                                     "transformers"))
    os.rmdir(os.path.join(dest, "src"))
    link_installed_src(dest)
    with open(os.path.join(dest, "SOURCE"), "w") as f:
        f.write(f"{os.path.abspath(gitdir)} {sha}\n")
    return tests


def _git_dir(path):
    dot = os.path.join(path, ".git")
    return dot if os.path.exists(dot) else path


# ------------------------------------------------------------------ version gap
def _imports(path):
    """-> [(module, name)] of the ``from transformers... import name`` statements in `path`."""
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                node.module.split(".")[0] == "transformers":
            out += [(node.module, a.name) for a in node.names if a.name != "*"]
    return out


def _literal(src_root, module, name):
    """The value of a top-level ``name = <literal>`` in the checkout's source of `module`."""
    base = os.path.join(src_root, *module.split("."))
    for path in (base + ".py", os.path.join(base, "__init__.py")):
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(
                    isinstance(t, ast.Name) and t.id == name for t in node.targets):
                try:
                    return ast.literal_eval(node.value)
                except ValueError:
                    return None
    return None


def version_gap(tests, families):
    """{module: {name: value | None}}: what the test sources import from transformers and the
    installed version lacks (empty when the tests match the installed version)."""
    files = [os.path.join(tests, f) for f in os.listdir(tests) if f.endswith(".py")]
    for d in [os.path.join(tests, s) for s in ("generation", "exporters")] + [
            os.path.dirname(test_file(tests, f)) for f in families]:
        if os.path.isdir(d):
            files += [os.path.join(d, f) for f in os.listdir(d) if f.endswith(".py")]
    src = os.path.join(os.path.dirname(tests), SRC_COPY)
    if not os.path.isdir(src):
        src = os.path.join(os.path.dirname(tests), "src")
    gap: dict = {}
    for mod, name in sorted({imp for f in files for imp in _imports(f)}):
        try:
            m = importlib.import_module(mod)
        except Exception:  # noqa: BLE001 - a module of another version: the test errors alike
            continue
        if hasattr(m, name) or (hasattr(m, "__path__") and
                                importlib.util.find_spec(f"{mod}.{name}") is not None):
            continue
        gap.setdefault(mod, {})[name] = _literal(src, mod, name)
    return gap


# ------------------------------------------------------------------ dependencies
def test_deps(cache=CACHE):
    """-> a directory holding TEST_DEPS the venv lacks (installed there once), or None."""
    missing = [dist for mod, dist in TEST_DEPS.items() if importlib.util.find_spec(mod) is None]
    if not missing:
        return None
    target = os.path.join(cache, "hf-test-deps")
    have = set(os.listdir(target)) if os.path.isdir(target) else set()
    todo = [d for d in missing if not any(h.lower().startswith(d.lower().replace("-", "_"))
                                          for h in have)]
    if todo:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", target,
               *todo]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise UsageError(f"could not install the test helpers' packages {todo} into "
                             f"{target}: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    return target


# ------------------------------------------------------------------ one pytest run
def run_family(tests, family, mode, select="default", k=None, timeout=900.0, shims=None,
               deps=None, python=sys.executable, records=None):
    """-> dict(outcomes {nodeid: outcome}, errors {nodeid: line}, stats, status, rc, seconds,
    tail).  status: "ok", "timeout" (outcomes so far) or "error" (nothing ran)."""
    env_sel, k_sel = SELECTIONS[select]
    kexpr = " and ".join(f"({e})" for e in (k_sel, k) if e)
    with tempfile.TemporaryDirectory(prefix="mmcore-peer-") as tmp:
        out = os.path.join(tmp, "out.jsonl")
        ini = os.path.join(tmp, "pytest.ini")
        with open(ini, "w") as f:
            f.write("[pytest]\naddopts =\n")
        env = dict(os.environ, MMCORE_PEER_MODE=mode, MMCORE_PEER_OUT=out,
                   MMCORE_PEER_FORCE=FORCE_PATCH.get(family, "0"),
                   HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   TRANSFORMERS_VERBOSITY="error", PYTHONDONTWRITEBYTECODE="1", **env_sel)
        env.pop("MMCORE_PEER_SHIMS", None)
        if select != "slow":
            env.pop("RUN_SLOW", None)
        if shims:
            env["MMCORE_PEER_SHIMS"] = os.path.join(tmp, "shims.json")
            with open(env["MMCORE_PEER_SHIMS"], "w") as f:
                json.dump(shims, f)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (HERE, deps, ROOT,
                                                        os.environ.get("PYTHONPATH")) if p)
        root = os.path.dirname(tests)
        cmd = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "mmcore_hf_plugin",
               "-c", ini, "--rootdir", root, "-W", "ignore", "-rN",
               os.path.relpath(test_file(tests, family), root)]
        if kexpr:
            cmd += ["-k", kexpr]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            text, _ = proc.communicate(timeout=timeout)
            status = "ok"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            text, _ = proc.communicate()
            status = "timeout"
        res = read_records(out)
        if records is not None:  # keep the raw JSON lines
            os.makedirs(records, exist_ok=True)
            shutil.copy(out, os.path.join(records, f"{family}-{mode}-{select}.jsonl"))
        res.update(rc=proc.returncode, seconds=round(time.perf_counter() - t0, 1),
                   tail=(text or "")[-3000:])
        if status == "ok" and not res["outcomes"]:
            status = "error" if proc.returncode not in (0, 5) else "ok"
        res["status"] = status
        return res


def read_records(path):
    """The plugin's JSON lines -> {outcomes, errors, stats (the last cumulative counters)}.

    A test with subtests (``self.subTest``) has one record per subtest besides its own: it
    counts as failed if any of them failed, else as passed if any passed, else skipped."""
    seen: dict = collections.defaultdict(set)
    errors, stats, models, left = {}, None, 0, 0
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a line cut by the timeout's kill
                seen[rec["test"]].add(rec["outcome"])
                if "error" in rec:
                    errors.setdefault(rec["test"], rec["error"])
                stats = rec.get("stats", stats)
                models = rec.get("patched_models", models)
                left = rec.get("eager_parts_left", left)
    outcomes = {}
    for test, outs in seen.items():
        for o in ("failed", "xpassed", "passed", "xfailed", "skipped"):
            if o in outs:
                outcomes[test] = o
                break
        else:
            outcomes[test] = sorted(outs)[0]
    return {"outcomes": outcomes, "errors": errors, "stats": stats, "patched_models": models,
            "eager_parts_left": left}


# ------------------------------------------------------------------ comparison and report
def test_name(nodeid):
    """'path::Class::test_x[param]' -> 'test_x'."""
    return nodeid.rsplit("::", 1)[-1].split("[", 1)[0]


def counts(outcomes):
    c = collections.Counter(outcomes.values())
    return {"passed": c["passed"] + c["xpassed"], "failed": c["failed"],
            "skipped": c["skipped"] + c["xfailed"], "total": len(outcomes)}


def compare(base, mm, expected=EXPECTED_DIFFERENT):
    """-> (regressions, expected differences, passing only with mmcore): node ids; only tests
    run in both modes count (a timeout cuts one short)."""
    b, m = base["outcomes"], mm["outcomes"]
    both = [n for n in b if n in m]
    worse = sorted(n for n in both if b[n] in PASSED and m[n] not in PASSED)
    regressions = [n for n in worse if test_name(n) not in expected]
    differ = [n for n in worse if test_name(n) in expected]
    better = sorted(n for n in both if m[n] in PASSED and b[n] not in PASSED)
    return regressions, differ, better


def family_summary(family, base, mm):
    s = {"family": family}
    if base is not None:
        s["base"] = {**counts(base["outcomes"]), "status": base["status"],
                     "seconds": base["seconds"]}
    if mm is not None:
        st = mm["stats"] or {"op_calls": 0, "fallback_calls": 0, "fallback_reasons": {}}
        s["mmcore"] = {**counts(mm["outcomes"]), "status": mm["status"],
                       "seconds": mm["seconds"], "patched_models": mm["patched_models"],
                       "eager_parts_left": mm.get("eager_parts_left", 0)}
        calls = st["op_calls"] + st["fallback_calls"]
        s["attention"] = {**st, "calls": calls, "fallback_pct":
                          round(100.0 * st["fallback_calls"] / calls, 1) if calls else None}
    if base is not None and mm is not None:
        reg, differ, better = compare(base, mm)
        s["regressions"] = [{"test": n, "error": mm["errors"].get(n, mm["outcomes"].get(n))}
                            for n in reg]
        s["expected_different"] = [{"test": n, "why": EXPECTED_DIFFERENT[test_name(n)]}
                                   for n in differ]
        s["pass_only_with_mmcore"] = better
    for mode, res in (("base", base), ("mmcore", mm)):
        if res is not None and res["status"] != "ok":
            s.setdefault("problems", {})[mode] = f"{res['status']} (rc {res['rc']}): " + \
                res["tail"][-600:]
    return s


def _pfs(c):
    if c is None:
        return "-"
    flag = {"timeout": " T", "error": " E"}.get(c["status"], "")
    return f"{c['passed']}/{c['failed']}/{c['skipped']}{flag}"


def render(summary, markdown=False):
    """-> the report table (text, or Markdown)."""
    rows = [("family", "base p/f/s", "mmcore p/f/s", "regr", "op calls", "dense calls",
             "main dense reason")]
    for s in summary["families"]:
        att = s.get("attention")
        reason = "-"
        if att and att["fallback_reasons"]:
            why, n = max(att["fallback_reasons"].items(), key=lambda kv: kv[1])
            reason = f"{n}x {why}"[:70]
        dense = "-" if att is None else (
            f"{att['fallback_calls']}" + (f" ({att['fallback_pct']}%)" if att["calls"] else ""))
        rows.append((s["family"], _pfs(s.get("base")), _pfs(s.get("mmcore")),
                     str(len(s["regressions"])) if "regressions" in s else "-",
                     "-" if att is None else str(att["op_calls"]), dense, reason))
    if markdown:
        lines = ["| " + " | ".join(r) + " |" for r in rows]
        lines.insert(1, "|" + "---|" * len(rows[0]))
    else:
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
    notes = []
    for s in summary["families"]:
        for r in s.get("regressions", []):
            notes.append(f"REGRESSION {r['test']}: {r['error']}")
        att = s.get("attention")
        if att and len(att["fallback_reasons"]) > 1:
            for why, n in sorted(att["fallback_reasons"].items(), key=lambda kv: -kv[1]):
                notes.append(f"{s['family']}: dense {n}x {why}")
        for mode, p in s.get("problems", {}).items():
            notes.append(f"{s['family']} {mode}: {_problem_line(p)}")
    notes.append("p/f/s: passed/failed/skipped (T: cut by the timeout, E: nothing ran)")
    if summary.get("version_gap"):
        names = [f"{m}.{n}" for m, d in summary["version_gap"].items() for n in d]
        notes.append(f"version gap: the tests import {len(names)} names the installed "
                     f"transformers lacks (stand-ins set): {', '.join(names)}")
    if markdown:
        return "\n".join(lines + [""] + [f"- {n}" for n in notes])
    return "\n".join(lines + notes)


def _problem_line(text):
    """The status and the first 'E ...' line (else the last line) of a run's output tail."""
    head = text.split(":", 1)[0]
    es = [ln[1:].strip() for ln in text.splitlines() if ln.startswith("E ") and ln[1:].strip()]
    last = es[0] if es else (text.strip().splitlines() or [""])[-1]
    return f"{head}: {last[:200]}"


# ------------------------------------------------------------------ command line
def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("families", nargs="*", help=f"default: all {len(FAMILIES)}: "
                                                f"{' '.join(FAMILIES)}")
    ap.add_argument("--modes", default="base,mmcore",
                    help="comma-separated: base, mmcore (default both)")
    ap.add_argument("--select", choices=sorted(SELECTIONS), default="default")
    ap.add_argument("-k", dest="k", help="pytest -k expression (narrows the selection)")
    ap.add_argument("--tests-dir", help="transformers' tests/ (or the checkout holding it)")
    ap.add_argument("--from-git", metavar="GITDIR",
                    help="export the tests from this local clone of transformers (with --rev)")
    ap.add_argument("--rev", help="the commit or tag for --from-git")
    ap.add_argument("--timeout", type=float, default=900.0,
                    help="seconds per family and mode (default 900)")
    ap.add_argument("--json", help="write the summary here")
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    ap.add_argument("--from-json", metavar="FILE",
                    help="print the report of a saved --json summary (runs nothing)")
    ap.add_argument("--records", metavar="DIR",
                    help="keep each run's raw per-test records (JSON lines) in DIR")
    args = ap.parse_args(argv)
    bad = [f for f in args.families if f not in FAMILIES]
    if bad:
        raise UsageError(f"unknown family {bad[0]!r} (known: {', '.join(FAMILIES)})")
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or any(m not in ("base", "mmcore") for m in args.modes):
        raise UsageError(f"--modes {','.join(args.modes)!r}: give base, mmcore or both")
    if args.timeout <= 0:
        raise UsageError(f"--timeout must be > 0, got {args.timeout}")
    if (args.from_git is None) != (args.rev is None):
        raise UsageError("--from-git and --rev go together")
    if args.from_git is not None and args.tests_dir is not None:
        raise UsageError("give --tests-dir or --from-git, not both")
    return args


def main(argv=None):
    try:
        args = parse_args(argv)
        if args.from_json:
            try:
                with open(args.from_json) as f:
                    summary = json.load(f)
                print(render(summary, args.markdown))
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise UsageError(f"--from-json {args.from_json}: not a summary of this script "
                                 f"({type(e).__name__}: {e})")
            return 1 if any(s.get("regressions") for s in summary["families"]) else 0
        families = args.families or list(FAMILIES)
        version = importlib.metadata.version("transformers")
        if args.tests_dir:
            tests = resolve_tests_dir(args.tests_dir)
        elif args.from_git:
            tests = export_tests(args.from_git, args.rev, FAMILIES)
        else:
            tests = clone_tests(version)
        absent = [f for f in families if not os.path.isfile(test_file(tests, f))]
        if absent:
            raise UsageError(f"{tests}: no tests/models/{absent[0]}/test_modeling_{absent[0]}.py")
        deps = test_deps()
    except UsageError as e:
        print(f"run_hf_models: {e}", file=sys.stderr)
        return 2
    shims = version_gap(tests, families)
    summary = {"transformers": version, "torch": importlib.metadata.version("torch"),
               "tests_dir": tests, "select": args.select, "k": args.k, "modes": args.modes,
               "version_gap": shims, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "families": []}
    src = os.path.join(os.path.dirname(tests), "SOURCE")
    if os.path.isfile(src):
        with open(src) as f:
            summary["tests_source"] = f.read().strip()
    for fam in families:
        res = {}
        for mode in args.modes:
            r = res[mode] = run_family(tests, fam, mode, args.select, args.k, args.timeout,
                                       shims, deps, records=args.records)
            print(f"[{fam} {mode}] {_pfs({**counts(r['outcomes']), 'status': r['status']})} "
                  f"in {r['seconds']:.0f} s", file=sys.stderr, flush=True)
        summary["families"].append(family_summary(fam, res.get("base"), res.get("mmcore")))
        if args.json:  # as it goes: a long run interrupted still leaves its families
            _dump(summary, args.json)
    print(f"transformers {version}'s model tests ({args.select}"
          f"{', -k ' + args.k if args.k else ''}) from {tests}, modes {', '.join(args.modes)}")
    print(render(summary, args.markdown))
    if args.json:
        _dump(summary, args.json)
    return 1 if any(s.get("regressions") for s in summary["families"]) else 0


def _dump(summary, path):
    with open(path, "w") as f:
        json.dump(summary, f, indent=1, sort_keys=True, default=str)


if __name__ == "__main__":
    sys.exit(main())
