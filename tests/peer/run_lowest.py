"""Run mmcore's transformers / peft tests against the LOWEST supported versions.

    python tests/peer/run_lowest.py            # the CI selection (LOWEST_TESTS)
    python tests/peer/run_lowest.py tests/test_patch_families.py ...   # any pytest arguments

The lower bounds come from requirements-hf.txt.  They are installed with ``pip install
--no-deps --target .peer/lowest-<versions>`` (git-ignored, kept between runs), together with
those of their requirements that the venv does not satisfy (e.g. transformers 5.17 wants
huggingface_hub < 2): nothing else, no second torch.  pytest then runs with that folder first
on PYTHONPATH, so it shadows the venv's newer transformers / peft.  Exit status: pytest's.
"""
from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CACHE = os.environ.get("MMCORE_PEER_CACHE", os.path.join(ROOT, ".peer"))
LIBRARIES = ("transformers", "peft")
# what CI runs on the lowest versions: attention on every padding layout, compiled generation,
# peft's API after conversion, the adapter loader, transformers' probe of Hugging Face's `kernels`
# from the project root (transformers 5.17 does not require that package), the import-order hook
LOWEST_TESTS = ["tests/test_patch_hf_interface.py::test_mmcore_equals_eager",
                "tests/test_kernels_name.py::test_project_root_without_hf_kernels_refuses_the_name",
                "tests/test_patch_import_order.py::test_attn_implementation_mmcore_any_import_order"
                "[mmcore_first]",
                "tests/test_patch_compile.py::test_compiled_generation_does_not_recompile_per_token"
                "[mistral-None-16-holey]",
                "tests/test_peft_layer.py", "tests/test_patch_lora.py"]


def lower_bounds(path=os.path.join(ROOT, "requirements-hf.txt")):
    """{library: lowest version} from the ">=" of each library in requirements-hf.txt."""
    from packaging.requirements import Requirement
    out = {}
    with open(path) as f:
        for line in f:
            line = line.split("#")[0].strip()
            if not line:
                continue
            r = Requirement(line)
            low = [s.version for s in r.specifier if s.operator == ">="]
            if r.name in LIBRARIES and low:
                out[r.name] = low[0]
    return out


def _unsatisfied(target, names):
    """Requirements (no extras) of the dists `names` in `target` that the venv does not meet."""
    from packaging.requirements import Requirement
    missing = []
    for dist in importlib.metadata.distributions(path=[target]):
        if dist.metadata["Name"].lower().replace("_", "-") not in names:
            continue
        for line in dist.requires or []:
            r = Requirement(line)
            if r.marker is not None and not r.marker.evaluate({"extra": ""}):
                continue
            if r.name.lower().replace("_", "-") in ("torch",):
                continue  # the venv's torch serves every version here
            try:
                have = importlib.metadata.version(r.name)
            except importlib.metadata.PackageNotFoundError:
                have = None
            if have is None or not r.specifier.contains(have, prereleases=True):
                missing.append(f"{r.name}{r.specifier}")
    return missing


def install(bounds):
    """-> the folder holding the lowest versions (installed once)."""
    tag = "-".join(f"{k}{v}" for k, v in sorted(bounds.items()))
    target = os.path.join(CACHE, f"lowest-{tag}")
    done = os.path.join(target, ".complete")
    if os.path.isfile(done):
        return target
    pins = [f"{k}=={v}" for k, v in bounds.items()]
    names = {k.lower() for k in bounds}
    for _ in range(6):  # the pins, then what they need that the venv lacks, level by level
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--upgrade",
               "--target", target, *pins]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
        extra = [p for p in _unsatisfied(target, names) if p not in pins]
        if not extra:
            break
        pins += extra
        names |= {p.split("<")[0].split(">")[0].split("=")[0].split("!")[0].lower()
                  .replace("_", "-") for p in extra}
    open(done, "w").close()
    return target


def main(argv=None):
    args = list(sys.argv[1:] if argv is None else argv) or LOWEST_TESTS
    bounds = lower_bounds()
    target = install(bounds)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [target, os.environ.get("PYTHONPATH", "")]))
    probe = subprocess.run([sys.executable, "-c", "import transformers, peft; "
                            "print(transformers.__version__, peft.__version__)"],
                           env=env, capture_output=True, text=True, cwd=ROOT)
    from packaging.version import Version
    got = probe.stdout.split()
    want = [bounds.get("transformers"), bounds.get("peft")]
    if probe.returncode != 0 or [Version(v) for v in got] != [Version(v) for v in want]:
        print(f"lowest versions not importable (want {want}, got {got}):\n{probe.stderr}")
        return 2
    print(f"[lowest] transformers {got[0]}, peft {got[1]} from {target}", flush=True)
    return subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            *args], env=env, cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main())
