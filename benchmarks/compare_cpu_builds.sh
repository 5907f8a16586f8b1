#!/usr/bin/env bash
# Interleaved comparison of this tree's C++ CPU kernels with another build (issue 21):
#   bash benchmarks/compare_cpu_builds.sh OLD_TREE [REPEATS] > results.jsonl
# OLD_TREE: a directory holding an importable mmcore/ with its built _C*.so (e.g. a copy of
# main's mmcore/).  Each repeat runs benchmarks/measure_cpu_vec.py (3 interleaved rounds of
# mmcore vs PyTorch, one thread) for: this tree on the default paths, the old tree on the
# default paths, and both with ATen and MKL forced to AVX2.  Then summarise with
#   python benchmarks/compare_cpu_builds.py results.jsonl
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OLD=${1:?usage: compare_cpu_builds.sh OLD_TREE [REPEATS]}
REPEATS=${2:-3}
PY=${PYTHON:-$HERE/.venv/bin/python}
run() {  # label tree [env...]
  local label=$1 tree=$2; shift 2
  env "$@" PYTHONPATH="$tree" "$PY" "$HERE/benchmarks/measure_cpu_vec.py" --rounds 3 \
    --label "$label"
}
for _ in $(seq "$REPEATS"); do
  run new-default "$HERE"
  run old-default "$OLD"
  run new-avx2 "$HERE" ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2
  run old-avx2 "$OLD" ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2
done
