#!/usr/bin/env bash
# GPU acceptance in one short window (DESIGN.md "Where it must run", issue #14): one H100/H200
# whose Python has torch (2.11+), triton, numba and opencv only. Installs nothing, needs no
# network, no ffcv, no DALI and no fire.
#
#   bash tools/gpu_check.sh            the GPU run: stages in order of value, limits <= 480 s
#   bash tools/gpu_check.sh --dry-run  every stage on the CPU at tiny sizes (CI), same files
#   bash tools/gpu_check.sh --plan     the GPU run's stages and limits; runs nothing
#
# Writes three files to $OUT (./bench_out when unset), rewritten after every stage so that a
# run cut short keeps what it measured:
#   summary.md        tools/summarize_bench.py over everything below
#   stages.txt        one line per stage: name, exit code of its own command, seconds, limit
#   gpu_check.tar.gz  env.txt, plan.txt, stages.txt, summary.md, logs/<stage>.log and
#                     <stage>.jsonl (the JSON lines of that log)
# A failing stage is recorded and the next one still runs; the exit code is 0 only when every
# stage that ran exited 0. On SIGTERM, SIGINT or SIGHUP (a window closing) the running stage is
# stopped and recorded as 143 "interrupted", with its log, before the script exits.
#   GPU_CHECK_FAIL_STAGE=<stage>   that stage runs `exit 3` instead (tests the failure path)
#   GPU_CHECK_ONLY=<stage>,...     run only these (a rerun); the others are recorded as skip
#   PYTHON=<python>                the interpreter (default python3)
set -uo pipefail
cd "$(dirname "$0")/.."

MODE=gpu
case "${1:-}" in
  "") ;;
  --dry-run) MODE=dry ;;
  --plan) MODE=plan ;;
  *) echo "usage: bash tools/gpu_check.sh [--dry-run | --plan]" >&2; exit 2 ;;
esac
OUT=${OUT:-./bench_out}
PY=${PYTHON:-python3}
BUDGET=480      # s: the GPU run's stage limits plus its set-up must fit in it
DRY_LIMIT=300   # s per stage in the dry run: a loaded 2-core CI box, not the GPU plan
FAIL_STAGE=${GPU_CHECK_FAIL_STAGE:-}
ONLY=${GPU_CHECK_ONLY:-}
REST_STAGE=bench_step_bs256_compile  # the last stage also gets what the others left unused
START=$SECONDS
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ "$MODE" = dry ]; then
  DEV=cpu BIG=4 SMALL=2
  # One thread per process: on a 2-core box shared with other jobs, OpenMP's spinning made a
  # tiny training step about 10x slower.
  export TRITON_INTERPRET=1 OMP_NUM_THREADS=1 TORCHINDUCTOR_COMPILE_THREADS=1
  STEP_SIZE="--arch=resnet18 --global_size=32 --local_size=16 --local_crops=2 --precision=fp32"
  STEP_SIZE="$STEP_SIZE --num_classes=10"
  STEPS="--steps=1 --warmup=1" COMPILE_STEPS="--steps=1 --warmup=1"
  # A cold inductor compile takes minutes on 2 cores: the dry run checks the compile stage's
  # command, limit and record with dynamo disabled, i.e. eager.
  COMPILE_ENV="TORCHDYNAMO_DISABLE=1"
  KERNEL_SIZE="--n=40,17 --c=9 --d=37 --dtype=fp32 --impls=torch,triton --iters=1 --warmup=1"
  CROP_SIZE="--preset=demo --max_resolution=64 --steps=1 --warmup=1"
  TESTS=tests/test_gpu.py  # all of tests/ takes ~40 s to collect here; gpu tests skip on CPU
else
  DEV=cuda BIG=256 SMALL=64
  export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-$(nproc)}
  STEP_SIZE="--arch=resnet50 --precision=bf16"
  STEPS="--steps=20 --warmup=5" COMPILE_STEPS="--steps=10 --warmup=3"
  COMPILE_ENV=""
  KERNEL_SIZE="--shapes=2304x1000,16384x21841 --impls=torch,eager_bf16,compile_bf16,triton --dtype=bf16"
  CROP_SIZE=""
  TESTS=tests
fi
STEP="$PY tools/bench_step.py --preset=trex --channels_last=True --loss_impl=triton"
STEP="$STEP --device=$DEV $STEP_SIZE"
CROPS="$PY tools/bench_gpu_stage.py --device=$DEV --batch_size=$BIG $CROP_SIZE"
HAS_PYTEST=false; "$PY" -c "import pytest" >/dev/null 2>&1 && HAS_PYTEST=true

plan() {  # in order of value: a run cut short has measured what matters most
  stage bench_step_bs256 60 $STEP --batch_size=$BIG $STEPS
  stage bench_kernel 65 $PY tools/bench_kernel.py --device=$DEV $KERNEL_SIZE
  stage bench_gpu_stage_triton 30 $CROPS --impl=triton
  stage bench_gpu_stage_torch 25 $CROPS --impl=torch
  stage bench_gpu_stage_nvjpeg 35 $CROPS --decode=gpu --impl=triton  # nvJPEG batch + stage
  if $HAS_PYTEST; then
    stage gpu_tests 60 $PY -m pytest -q -m gpu $TESTS -p no:cacheprovider
  else
    skip gpu_tests 60 "pytest is not installed"
  fi
  stage bench_step_bs64 35 $STEP --batch_size=$SMALL $STEPS
  if [ -f tools/aot_check.py ]; then  # compiles with triton's own compiler, not interpreted
    stage aot_check 20 env -u TRITON_INTERPRET $PY tools/aot_check.py --target=sm_90a
  else
    skip aot_check 20 "tools/aot_check.py is absent"
  fi
  # a cold ResNet-50 compile takes more than 90 s; TORCHINDUCTOR_COMPILE_THREADS is set above
  stage bench_step_bs256_compile 130 env $COMPILE_ENV $STEP --batch_size=$BIG --compile=True \
    $COMPILE_STEPS
}

NAMES=() LIMITS=() PHASE=collect CURRENT="" status=0

stage() {  # stage NAME LIMIT CMD...: run CMD under its limit, log it, record its exit code
  local name=$1 limit=$2; shift 2
  if [ "$PHASE" = collect ]; then NAMES+=("$name"); LIMITS+=("$limit"); return; fi
  if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$name,"* ]]; then
    record "$name" skip 0 "$limit" "not in GPU_CHECK_ONLY"; return
  fi
  if [ "$MODE" = dry ]; then
    limit=$DRY_LIMIT
  elif [ "$name" = "$REST_STAGE" ]; then
    local rest=$((BUDGET - (SECONDS - START) - 10))
    [ "$rest" -gt "$limit" ] && limit=$rest
  fi
  if [ "$name" = "$FAIL_STAGE" ]; then
    set -- sh -c 'echo "GPU_CHECK_FAIL_STAGE: this stage fails on purpose"; exit 3'
  fi
  echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*"
  CURRENT=$name CURRENT_T0=$SECONDS CURRENT_LIMIT=$limit
  rm -f "$WORK.stage.rc" "$WORK.stage.pid"
  # In the background with `wait`, so that a signal to this script is handled at once (a
  # foreground pipeline would defer the trap until the stage ends); the command's own exit
  # code goes through stage.rc, not tee's.
  (
    timeout -k 5 "$limit" "$@" 2>&1 &
    echo $! > "$WORK.stage.pid"
    wait $!
    echo $? > "$WORK.stage.rc"
  ) | tee "$WORK/logs/$name.log" &
  TEE_PID=$!
  wait "$TEE_PID"
  local rc; rc=$(cat "$WORK.stage.rc" 2>/dev/null || echo 255)
  CURRENT=""
  extract_json "$name"
  local note=""
  [ "$rc" -eq 124 ] && note="time limit"
  [ "$rc" -eq 137 ] && note="killed"
  record "$name" "$rc" $((SECONDS - CURRENT_T0)) "$limit" "$note"
  echo "=== $name exit $rc"
  [ "$rc" -eq 0 ] || status=1
  pack
}

skip() {  # skip NAME LIMIT REASON: a stage that cannot run here, recorded as such
  if [ "$PHASE" = collect ]; then NAMES+=("$1"); LIMITS+=("$2"); return; fi
  echo "=== $1 skipped: $3"
  record "$1" skip 0 "$2" "$3"
  pack
}

record() { echo "$*" >> "$WORK/stages.txt"; }

extract_json() {  # a step of its own: grep's exit code says nothing about the benchmark
  grep '^{' "$WORK/logs/$1.log" > "$WORK/$1.jsonl" 2>/dev/null || true
}

pack() {  # summary.md, stages.txt and the tar in $OUT, replaced whole (rename) each time
  if ! "$PY" tools/summarize_bench.py "$WORK" > "$WORK/summary.md" 2> "$WORK/logs/summary.log"
  then
    { echo; echo "tools/summarize_bench.py failed:"; cat "$WORK/logs/summary.log"; } \
      >> "$WORK/summary.md"
    status=1
  fi
  cp "$WORK/summary.md" "$WORK/stages.txt" "$OUT/"
  tar -czf "$OUT/gpu_check.tar.gz.part" -C "$WORK" . \
    && mv -f "$OUT/gpu_check.tar.gz.part" "$OUT/gpu_check.tar.gz"
}

on_signal() {  # the window is closing: stop the running stage, keep what it wrote
  trap '' TERM INT HUP
  if [ -n "$CURRENT" ]; then
    kill -TERM "$(cat "$WORK.stage.pid" 2>/dev/null)" 2>/dev/null  # timeout passes it on
    wait "$TEE_PID" 2>/dev/null  # the log is complete once tee has its end of file
    extract_json "$CURRENT"
    record "$CURRENT" 143 $((SECONDS - CURRENT_T0)) "$CURRENT_LIMIT" "interrupted"
  fi
  pack
  exit 143
}

# ---- the plan, checked before anything runs ---------------------------------------------
plan
total=0
for limit in "${LIMITS[@]}"; do total=$((total + limit)); done
if [ "$MODE" = plan ]; then
  for i in "${!NAMES[@]}"; do echo "${NAMES[$i]} ${LIMITS[$i]}"; done
  echo "total $total (budget $BUDGET)"
  exit 0
fi
if [ "$total" -gt $((BUDGET - 20)) ]; then  # 20 s for the set-up and packing between stages
  echo "the stage limits sum to ${total}s: more than the ${BUDGET}s budget allows" >&2; exit 2
fi
for name in $FAIL_STAGE ${ONLY//,/ }; do
  if [[ " ${NAMES[*]} " != *" $name "* ]]; then
    echo "unknown stage '$name'; stages: ${NAMES[*]}" >&2; exit 2
  fi
done

# ---- run ---------------------------------------------------------------------------------
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK" "$WORK".stage.*' EXIT
trap on_signal TERM INT HUP
mkdir -p "$OUT" "$WORK/logs"
: > "$WORK/stages.txt"
for i in "${!NAMES[@]}"; do echo "${NAMES[$i]} ${LIMITS[$i]}"; done > "$WORK/plan.txt"
{
  echo "mode: $MODE"
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo "unknown (not a git checkout)")"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  else
    echo "nvidia-smi: not found"
  fi
  timeout 60 "$PY" -m trex_fast.env || echo "python -m trex_fast.env failed (exit $?)"
} 2>&1 | tee "$WORK/env.txt"
pack

PHASE=run
plan
pack
echo "=== done in $((SECONDS - START))s, exit $status; $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit $status
