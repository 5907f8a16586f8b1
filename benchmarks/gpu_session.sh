#!/usr/bin/env bash
# One GPU session, within 8 minutes on a fresh machine with no network (image: torch, triton,
# transformers, peft, safetensors, pytest, ninja; no MiniLM package):
#
#   bash benchmarks/gpu_session.sh OUT_DIR MODEL_DIR          # on the GPU machine
#   bash benchmarks/gpu_session.sh --dry-run OUT_DIR MODEL_DIR  # here: every step on the CPU
#
# MODEL_DIR: a bf16 copy of MiniLM-L6 (python benchmarks/export_minilm_bf16.py MODEL_DIR
# writes it; about 45 MB).  Steps, each time-boxed with `timeout` so that one stall cannot
# eat the run (seconds; override with the variables):
#   env      versions, GPU, clocks                                   -> OUT/env.txt
#   build    pip install -e . (the C++ / CUDA extension)    BUILD_S=100  -> OUT/build.log
#   tests    pytest -m gpu via tests/run_gpu.py (per-test watchdog, resumes after a hang;
#            autotuning off)                                  TESTS_S=170  -> OUT/tests.log
#   first    compile (first call) vs steady-state per op      FIRST_S=30   -> OUT/first_call.log
#   bench    mmcore bench per op (the grid; BENCH_ARGS, e.g. --quick)
#                                         BENCH_S=100 (split 50/25/25)  -> OUT/bench_*.log
#   read     mmcore read --device cuda --tokens 131072 --model MODEL_DIR  READ_S=60
#                                                                         -> OUT/read.json
# Result rows (JSON lines) of every step go to OUT/results.jsonl; OUT/summary.txt has one line
# per step (exit code, seconds).  Exit code: 0 when every step passed.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT=${1:-${OUT:-/tmp/out}}
MODEL=${2:-${MINILM_BF16:-}}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 MMCORE_BENCH_OUT="$OUT/results.jsonl"
: > "$OUT/summary.txt"
status=0
T0=$(date +%s)

step() {  # step NAME SECONDS LOG CMD...: run CMD under timeout, log, record exit code + time
  local name=$1 secs=$2 log=$3; shift 3
  local t0=$(date +%s)
  echo "== $name (time box ${secs} s): $*" | tee -a "$OUT/summary.txt"
  timeout --kill-after=10 "$secs" "$@" > "$log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  tail -25 "$log"
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && echo "   (time box of ${secs} s reached)" | tee -a "$OUT/summary.txt"
  echo "   $name: exit $rc after ${dt} s" | tee -a "$OUT/summary.txt"
  [ $rc -eq 0 ] || status=1
}

if [ $DRY = 1 ]; then
  DEV=cpu; TOKENS=${TOKENS:-2048}
  export TRITON_INTERPRET=1 MMCORE_TEST_TIMEOUT=${MMCORE_TEST_TIMEOUT:-120}
  BENCH_ARGS=${BENCH_ARGS:---quick}
  TEST_ARGS=${TEST_ARGS:--m gpu tests/test_lora_kernels.py tests/test_cross_attention.py}
else
  DEV=cuda; TOKENS=${TOKENS:-131072}
  BENCH_ARGS=${BENCH_ARGS:-}
  TEST_ARGS=${TEST_ARGS:--m gpu tests}
fi

# -- env: versions and the device
{
  echo "date $(date -u +%FT%TZ)  dry_run=$DRY  commit $(git rev-parse --short HEAD 2>/dev/null)"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu --format=csv
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__); print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
  "$PY" -c "import transformers, peft, safetensors; print('transformers', transformers.__version__, 'peft', peft.__version__, 'safetensors', safetensors.__version__)" 2>&1
  echo "model dir: ${MODEL:-<none>}"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# -- build: the extension against the machine's torch (no network: no deps, no isolation)
if [ $DRY = 1 ] && "$PY" -c "import mmcore._C" 2>/dev/null; then
  echo "== build: mmcore._C present (dry run: not rebuilt)" | tee -a "$OUT/summary.txt"
else
  step build "${BUILD_S:-100}" "$OUT/build.log" env MAX_JOBS="$(nproc)" \
    "$PY" -m pip install -q --no-build-isolation --use-pep517 --no-deps -e .
fi

# -- tests: the compiled suite; a hung test fails itself and the run goes on
# shellcheck disable=SC2086
step tests "${TESTS_S:-170}" "$OUT/tests.log" "$PY" tests/run_gpu.py \
  --budget $(( ${TESTS_S:-170} - 10 )) $TEST_ARGS

# -- first call (compile) vs steady state
step first "${FIRST_S:-30}" "$OUT/first_call.log" "$PY" benchmarks/first_call.py --device $DEV

# -- the benchmark grid, one op at a time (rows are written when an op finishes)
B=${BENCH_S:-100}
for op_s in "window_attention:$(( B / 2 ))" "cross_attention:$(( B / 4 ))" "lora_linear:$(( B / 4 ))"; do
  op=${op_s%%:*}; s=${op_s##*:}
  # shellcheck disable=SC2086
  step "bench $op" "$s" "$OUT/bench_$op.log" "$PY" -m mmcore bench --device $DEV --op "$op" \
    --out "$OUT/results.jsonl" $BENCH_ARGS
done

# -- the long-document reader from the bf16 MiniLM copy
if [ -n "$MODEL" ] && [ -f "$MODEL/model.safetensors" ]; then
  step read "${READ_S:-60}" "$OUT/read.log" "$PY" -m mmcore read --device $DEV \
    --tokens "$TOKENS" --model "$MODEL" --json --no-progress
  "$PY" - "$OUT/read.log" "$OUT/read.json" "$OUT/results.jsonl" <<'EOF' || status=1
import json, sys
txt = open(sys.argv[1]).read()
start = txt.find("{")
res = json.loads(txt[start:txt.rfind("}") + 1]) if start >= 0 else {}
json.dump(res, open(sys.argv[2], "w"), indent=1)
row = {"bench": "read", **{k: res.get(k) for k in ("tokens", "seconds", "tokens_per_s",
       "peak_memory_bytes", "backend", "device", "dtype")},
       "found_at_rank_1": res.get("demo", {}).get("found_at_rank_1")}
open(sys.argv[3], "a").write(json.dumps(row) + "\n")
print("read:", row)
sys.exit(0 if row["found_at_rank_1"] else 1)
EOF
else
  echo "== read: no MODEL_DIR with model.safetensors given; skipped" | tee -a "$OUT/summary.txt"
  status=1
fi

echo "== total $(( $(date +%s) - T0 )) s, status $status" | tee -a "$OUT/summary.txt"
exit $status
