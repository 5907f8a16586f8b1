"""Every example in README.md and docs/*.md runs, and the documentation site builds strictly.

A page's fenced ```python and ```bash blocks run in the order they appear, in ONE subprocess
with a fresh temporary directory as cwd: python blocks share one namespace (as in one Python
session; tracebacks name the page and its line), bash blocks run with ``bash -euo pipefail``
and the venv's bin first on PATH, so a later block can read what an earlier one wrote.
Offline: HF_HUB_OFFLINE=1, models come from the shipped MiniLM or are built from configs.

A block that cannot run here (needs a GPU, the network, minutes, or is CI itself) is fenced
```python no-run: <why>  /  ```bash no-run: <why>
(the reason may instead be the block's first line, as a # comment) and is only checked:
``compile()`` for python, ``bash -n`` for bash.  Blocks of any other language (text, yaml,
json, ...) are not run.

    python tests/test_docs_examples.py          # counts per page (no run)
    pytest tests/test_docs_examples.py          # run them, then mkdocs build --strict
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_LANGS = {"python": "python", "py": "python", "bash": "bash", "sh": "bash",
             "shell": "bash"}
PAGE_TIMEOUT_S = 300
_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`\n]*)$")


@dataclass
class Block:
    page: str       # path relative to the repository root
    line: int       # 1-based line of the first code line
    lang: str       # "python" | "bash" | another fence language (not run)
    run: bool       # False: no-run (syntax check only)
    reason: str     # why not run ("" when run)
    src: str


def pages() -> list:
    out = [os.path.join(ROOT, "README.md")]
    docs = os.path.join(ROOT, "docs")
    if os.path.isdir(docs):
        out += sorted(os.path.join(docs, f) for f in os.listdir(docs) if f.endswith(".md"))
    return [p for p in out if os.path.exists(p)]


def blocks(path: str) -> list:
    """The fenced code blocks of a Markdown file (indented fences, e.g. in lists, dedented)."""
    rel = os.path.relpath(path, ROOT)
    lines = open(path, encoding="utf-8").read().split("\n")
    out, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, info = m["indent"], m["fence"], m["info"].strip()
        body, j = [], i + 1
        while j < len(lines):
            c = _FENCE.match(lines[j])
            if c and c["fence"][0] == fence[0] and len(c["fence"]) >= len(fence) and \
                    not c["info"].strip():
                break
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j])
            j += 1
        if j == len(lines):
            raise ValueError(f"{rel}:{i + 1}: code fence {fence!r} is never closed")
        words = info.split(None, 1)
        lang = words[0].lower() if words else ""
        rest = words[1] if len(words) > 1 else ""
        no_run = rest.startswith("no-run")
        reason = rest[len("no-run"):].lstrip(" :-—") if no_run else ""
        if no_run and not reason:
            first = next((b.strip() for b in body if b.strip()), "")
            reason = first.lstrip("# ").strip() if first.startswith("#") else ""
        out.append(Block(rel, i + 2, RUN_LANGS.get(lang, lang), not no_run, reason,
                         "\n".join(body) + "\n"))
        i = j + 1
    return out


def runnable(page: str) -> list:
    return [b for b in blocks(page) if b.run and b.lang in ("python", "bash")]


def checked_only(page: str) -> list:
    return [b for b in blocks(page) if not b.run and b.lang in ("python", "bash")]


# the subprocess that runs one page's blocks in order
_DRIVER = r'''
import json, subprocess, sys, traceback
steps = json.load(open(sys.argv[1]))
ns = {"__name__": "__main__"}
for st in steps:
    where = "%s:%d" % (st["page"], st["line"])
    print("--- %s (%s)" % (where, st["lang"]), flush=True)
    if st["lang"] == "python":
        try:
            # leading newlines: tracebacks give the page's own line numbers
            exec(compile("\n" * (st["line"] - 1) + st["src"], st["path"], "exec"), ns)
        except BaseException:
            traceback.print_exc()
            print("DOCS EXAMPLE FAILED: " + where, flush=True)
            sys.exit(1)
        sys.stdout.flush()
    else:
        rc = subprocess.run(["bash", "-euo", "pipefail", "-c", st["src"]]).returncode
        if rc:
            print("DOCS EXAMPLE FAILED: %s (bash exit %d)\n%s" % (where, rc, st["src"]),
                  flush=True)
            sys.exit(1)
'''


def _env() -> dict:
    env = dict(os.environ)
    bindir = os.path.dirname(sys.executable)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg",
               PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    return env


def _page_ids():
    return [os.path.relpath(p, ROOT) for p in pages()]


@pytest.mark.parametrize("page", _page_ids())
def test_examples_run(page, tmp_path):
    path = os.path.join(ROOT, page)
    steps = [dict(page=b.page, path=path, line=b.line, lang=b.lang, src=b.src)
             for b in runnable(path)]
    if not steps:
        return  # a page without runnable examples (its no-run blocks: test_examples_parse)
    spec = tmp_path / "steps.json"
    spec.write_text(json.dumps(steps))
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER)
    work = tmp_path / "work"
    work.mkdir()
    try:
        r = subprocess.run([sys.executable, str(driver), str(spec)], cwd=work, env=_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           timeout=PAGE_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"{page}: examples still running after {PAGE_TIMEOUT_S} s\n{out[-4000:]}")
    assert r.returncode == 0, f"{page}: an example failed\n{r.stdout[-6000:]}"


@pytest.mark.parametrize("page", _page_ids())
def test_examples_parse(page, tmp_path):
    """no-run blocks: a reason, and valid syntax (compile / bash -n)."""
    path = os.path.join(ROOT, page)
    for b in checked_only(path):
        where = f"{b.page}:{b.line}"
        assert b.reason, f"{where}: a no-run block needs a reason (```{b.lang} no-run: why)"
        if b.lang == "python":
            compile("\n" * (b.line - 1) + b.src, path, "exec")
        else:
            r = subprocess.run(["bash", "-n"], input=b.src, text=True, capture_output=True)
            assert r.returncode == 0, f"{where}: bash -n: {r.stderr}"


def test_mkdocs_build_strict(tmp_path):
    """The site builds with broken links, missing nav pages and bad anchors as errors."""
    try:
        import mkdocs  # noqa: F401
    except ImportError:
        pytest.fail("mkdocs is not installed: pip install mkdocs==1.6.1 (./bootstrap.sh does)")
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet",
                        "-f", os.path.join(ROOT, "mkdocs.yml"), "-d", str(tmp_path / "site")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"mkdocs build --strict failed:\n{r.stdout}\n{r.stderr}"


def test_parser_reads_fences():
    """The runner finds what it must run and what it must only check."""
    md = ("text\n```python\nx = 1\n```\n\n1. item\n\n   ```bash no-run: needs a GPU\n"
          "   nvidia-smi\n   ```\n```text\nnot code\n```\n```python no-run\n# downloads\n"
          "import x\n```\n")
    with tempfile.NamedTemporaryFile("w", suffix=".md", dir=ROOT, delete=False) as f:
        f.write(md)
    try:
        bs = blocks(f.name)
    finally:
        os.unlink(f.name)
    assert [(b.lang, b.run, b.line) for b in bs] == [("python", True, 3), ("bash", False, 9),
                                                     ("text", True, 12),
                                                     ("python", False, 15)]
    assert bs[1].src == "nvidia-smi\n" and bs[1].reason == "needs a GPU"
    assert bs[3].reason == "downloads"


def _slug(heading):
    """GitHub's (and mkdocs' toc) anchor of a heading: lower case, punctuation dropped,
    spaces to hyphens."""
    h = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", h))


def _anchors(path):
    text = open(path, encoding="utf-8").read()
    text = re.sub(r"^(`{3,}|~{3,}).*?^\1\s*$", "", text, flags=re.M | re.S)  # not in code
    return {_slug(m[1]) for m in re.finditer(r"^#{1,6}\s+(.*)$", text, flags=re.M)}


def test_readme_links():
    """README.md is not part of the mkdocs site: its relative links and anchors are checked
    here (files exist, #anchors name a heading of the target)."""
    readme = os.path.join(ROOT, "README.md")
    text = open(readme, encoding="utf-8").read()
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        full = os.path.join(ROOT, path) if path else readme
        if not os.path.exists(full):
            bad.append(f"{target}: no such file")
        elif anchor and full.endswith(".md") and anchor not in _anchors(full):
            bad.append(f"{target}: no heading with anchor #{anchor}")
    assert not bad, "README.md links:\n" + "\n".join(bad)


def _grids(text):
    """Mask grids drawn as text: rows 'query N  x . g ...' or 'qN  x . ...' -> list of
    (S_q x S_k) bool rows per grid (x and g = allowed)."""
    grids, cur = [], []
    for line in text.split("\n"):
        m = re.match(r"\s*(?:query |q)(\d+)\s+((?:[x.g] )*[x.g])(?:\s|$)", line)
        if m:
            cur.append([c in "xg" for c in m[2].split()])
        elif cur:
            grids.append(cur)
            cur = []
    return grids + ([cur] if cur else [])


def _allowed(Sq, Sk, window, global_tokens):
    from mmcore.ops.attention_maps import window_attention_rows
    import torch
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, Sq, 8, generator=g), torch.randn(1, 1, Sk, 8, generator=g)
    p = window_attention_rows(q, k, k, rows=list(range(Sq)), window=window,
                              global_tokens=global_tokens)
    return (p[0, 0] > 0).tolist()


def test_mask_grids_match_the_op():
    """The ASCII masks in docs/ops.md and window_attention's docstring are what the op does."""
    import mmcore
    ops = _grids(open(os.path.join(ROOT, "docs", "ops.md"), encoding="utf-8").read())
    assert len(ops) == 2
    assert ops[0] == _allowed(7, 7, (1, 1), 1)          # window=(1, 1), global_tokens=1
    assert ops[1] == _allowed(3, 6, (1, 0), 0)          # Sq=3, Sk=6, window=(1, 0)
    doc = _grids(mmcore.window_attention.__doc__)
    assert doc == [_allowed(3, 6, (1, 0), 0)]


if __name__ == "__main__":
    tot_run = tot_chk = 0
    for p in pages():
        n_run, n_chk = len(runnable(p)), len(checked_only(p))
        tot_run += n_run
        tot_chk += n_chk
        print(f"{os.path.relpath(p, ROOT):28s} run {n_run:3d}   syntax-checked {n_chk:3d}")
    print(f"{'total':28s} run {tot_run:3d}   syntax-checked {tot_chk:3d}")
