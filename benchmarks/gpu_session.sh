#!/usr/bin/env bash
# One call on a lent GPU machine (its image has torch + triton + transformers + peft):
# build, compiled-Triton tests, then benchmarks; logs and JSON lines go to $OUT.
#   bash benchmarks/gpu_session.sh [tests|bench|all] [bench args...]
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MMCORE_BENCH_OUT="$OUT/results.jsonl"
what=${1:-all}; shift || true
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
python3 -m pip install -q --no-build-isolation --use-pep517 --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; echo BUILD FAILED; }
if [ "$what" = tests ] || [ "$what" = all ]; then
  # compiled Triton: the whole suite with CUDA present runs the triton tests on the GPU
  timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -x -p no:cacheprovider ${PYTEST_ARGS:-tests} 2>&1 | tee "$OUT/tests.log" | tail -40
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  timeout ${BENCH_TIMEOUT:-300} python3 -m mmcore bench --device cuda "$@" 2>&1 | tee "$OUT/bench.log" | tail -80
fi
