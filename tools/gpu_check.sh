#!/usr/bin/env bash
# GPU acceptance in one short window (DESIGN.md "Where it must run", issues #14 and #22): one
# H100/H200 whose Python has torch (2.11+), triton, numba and opencv only. Installs nothing,
# needs no network, no ffcv, no DALI and no fire.
#
#   bash tools/gpu_check.sh            the GPU run: stages in order of value, all within 480 s
#   bash tools/gpu_check.sh --dry-run  every stage on the CPU at tiny sizes (CI), same files
#   bash tools/gpu_check.sh --plan     the GPU run's stages, limits and total; runs nothing
#   (bash tools/gpu_check.sh --prewarm=gpu|dry is the first stage's own command)
#
# The budget (issue #22, item 3). A GPU window is 15 min = 900 s of device time, and it must
# hold the machine's start, this run and one rerun of the stages that timed out:
#     900 s = 180 s machine start (2-3 min) + 480 s this run + 240 s one rerun
# A rerun (GPU_CHECK_ONLY=<stages>) on the same warm machine needs no start, and its own total
# must stay within 200 s (RERUN_BUDGET: the other 40 s are the call and the files' transfer);
# on a fresh machine, name triton_prewarm in it too (the Triton cache is gone).
# Every second the script can spend is inside the total that --plan prints:
#     total = setup + sum over stages of (limit + KILL_GRACE + PACK_LIMIT)
#     setup = NVSMI_LIMIT + PROBE_LIMIT + KILL_GRACE + 2 * PACK_LIMIT + SLACK (the env probe,
#             the packs after it and at the end, and bash's own work: mktemp, git rev-parse,
#             the pytest probe)
# where KILL_GRACE is how long `timeout` waits after its TERM before it KILLs, and PACK_LIMIT
# bounds the summary and the tar written after every stage (half each, under `timeout`). The
# script refuses a plan whose total exceeds BUDGET (RERUN_BUDGET for a rerun).
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
#   PYTHON=<python>                the interpreter (default: .venv/bin/python when the checkout
#                                  has one, as tools/setup_env.sh makes it; python3 otherwise)
set -uo pipefail
cd "$(dirname "$0")/.."

MODE=gpu
case "${1:-}" in
  "") ;;
  --dry-run) MODE=dry ;;
  --plan) MODE=plan ;;
  --prewarm=gpu | --prewarm=dry) MODE=prewarm; SIZES=${1#--prewarm=} ;;  # the first stage's job
  *) echo "usage: bash tools/gpu_check.sh [--dry-run | --plan]" >&2; exit 2 ;;
esac
OUT=${OUT:-./bench_out}
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; fi
export PYTHON=${PYTHON:-python3}  # the pre-warm's own run of this script uses the same one
PY=$PYTHON
BUDGET=480        # s: everything the GPU run can spend (see the arithmetic above)
RERUN_BUDGET=200  # s: the same for a GPU_CHECK_ONLY rerun
NVSMI_LIMIT=5 PROBE_LIMIT=13 SLACK=3  # s: nvidia-smi, python -m trex_fast.env, bash itself
KILL_GRACE=2      # s: timeout's TERM-to-KILL wait, spent at most once per stage
PACK_LIMIT=2      # s: the summary after a stage (standard library Python) plus the tar
DRY_LIMIT=300     # s per stage in the dry run: a loaded 2-core CI box, not the GPU plan
FAIL_STAGE=${GPU_CHECK_FAIL_STAGE:-}
ONLY=${GPU_CHECK_ONLY:-}
START=$SECONDS
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ "$MODE" = prewarm ] || SIZES=$MODE
# The machine's cores: GNU nproc would report OMP_NUM_THREADS instead (1 in the dry run).
CORES=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
if [ "$SIZES" = dry ]; then
  DEV=cpu BIG=4 SMALL=2
  # One thread per process: on a 2-core box shared with other jobs, OpenMP's spinning made a
  # tiny training step about 10x slower.
  export TRITON_INTERPRET=1 OMP_NUM_THREADS=1 TORCHINDUCTOR_COMPILE_THREADS=1
  STEP_SIZE="--arch=resnet18 --global_size=32 --local_size=16 --local_crops=2 --precision=fp32"
  STEP_SIZE="$STEP_SIZE --num_classes=10"
  # One step each, no warm-up: the dry run checks commands, limits and records, not speed.
  STEPS="--steps=1 --warmup=0" COMPILE_STEPS="--steps=1 --warmup=0"
  # A cold inductor compile takes minutes on 2 cores: the dry run's compile stage traces with
  # Dynamo (its graphs are counted, and none is an error) and runs the graphs eagerly.
  COMPILE_BACKEND="--compile_backend=eager"
  KERNEL_SIZE="--n=40,17 --c=9 --d=37 --dtype=fp32 --impls=torch,triton"
  KERNEL_ITERS="--iters=1 --warmup=0"
  CROP_SIZE="--preset=demo --max_resolution=64" CROP_STEPS="--steps=1 --warmup=0"
  TESTS=tests/unit/test_gpu.py  # all of tests/ takes ~40 s to collect here; gpu tests skip on CPU
else
  DEV=cuda BIG=256 SMALL=64
  export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-$CORES}
  STEP_SIZE="--arch=resnet50 --precision=bf16"
  STEPS="--steps=20 --warmup=5" COMPILE_STEPS="--steps=10 --warmup=3"
  COMPILE_BACKEND=""
  KERNEL_SIZE="--shapes=production --impls=torch,eager_bf16,compile_bf16,triton"
  KERNEL_SIZE="$KERNEL_SIZE --dtype=bf16" KERNEL_ITERS=""
  CROP_SIZE="" CROP_STEPS=""
  TESTS=tests
fi
if [ "$MODE" = prewarm ]; then  # the same commands, one step each: compilation is the point
  STEPS="--steps=1 --warmup=0" KERNEL_ITERS="--iters=1 --warmup=0"
  CROP_STEPS="--steps=1 --warmup=0"
fi
STEP="$PY tools/bench_step.py --preset=trex --channels_last=True --loss_impl=triton"
STEP="$STEP --device=$DEV $STEP_SIZE"
CROPS="$PY tools/bench_gpu_stage.py --device=$DEV --batch_size=$BIG $CROP_SIZE $CROP_STEPS"
HAS_PYTEST=false; "$PY" -c "import pytest" >/dev/null 2>&1 && HAS_PYTEST=true

# Stage limits (s) on the GPU. Cold Triton compilation is a planned cost (issue #22, item 2):
# on a fresh machine the Triton cache is empty, and each kernel variant compiles serially in
# the process that first launches it. Measured on the 2-core CPU machine (loaded), cold: the
# gpu tests compile ~14 variants in ~50 s, the triton multi-crop stage 24-38 s. So the first
# stage, triton_prewarm, runs every Triton-launching stage's own command at one step each (the
# same code paths, shapes, dtypes and specialisations: nothing to keep in sync with the
# kernels' launch configurations), in parallel processes up to nproc, into the shared cache;
# its limit is the longest of its jobs: the gpu tests' ~50 s of compilation plus ~30 s of
# collection and run. With the cache warm, each later limit is its run time plus margin:
# imports and state ~10 s, then the timed steps (ResNet-50 t-ReX at batch 256: ~25 steps of
# ~0.1-0.3 s), the kernel's eager baselines at 16384 x 21841 and two inductor compiles of the
# loss (warm too: the pre-warm ran them, and inductor keeps its graphs and kernels on disk),
# nvJPEG's input encoded on the CPU, and pytest collecting tests/. The compile stage stays
# cold on purpose (a ResNet-50 train step through inductor takes more than 90 s with
# TORCHINDUCTOR_COMPILE_THREADS=nproc). aot_check is not here: it needs no GPU, and CI runs
# it. These are estimates until a GPU run has timed each stage; stages.txt records the
# seconds each one took.
PREWARM_STAGES="bench_step_bs256 bench_kernel bench_gpu_stage_triton bench_gpu_stage_nvjpeg"
PREWARM_STAGES="$PREWARM_STAGES gpu_tests bench_step_bs64"
plan() {  # in order of value: a run cut short has measured what matters most
  stage triton_prewarm 90 bash tools/gpu_check.sh --prewarm=$SIZES
  stage bench_step_bs256 35 $STEP --batch_size=$BIG $STEPS
  stage bench_kernel 50 $PY tools/bench_kernel.py --device=$DEV $KERNEL_SIZE $KERNEL_ITERS
  stage bench_gpu_stage_triton 15 $CROPS --impl=triton
  stage bench_gpu_stage_torch 15 $CROPS --impl=torch
  stage bench_gpu_stage_nvjpeg 25 $CROPS --decode=gpu --impl=triton  # nvJPEG batch + stage
  if $HAS_PYTEST; then
    stage gpu_tests 40 $PY -m pytest -q -m gpu $TESTS -p no:cacheprovider \
      --continue-on-collection-errors  # a module that needs numba does not stop the gpu tests
  else
    skip gpu_tests 40 "pytest is not installed"
  fi
  stage bench_step_bs64 20 $STEP --batch_size=$SMALL $STEPS
  stage bench_step_bs256_compile 125 $STEP --batch_size=$BIG --compile=True $COMPILE_BACKEND \
    $COMPILE_STEPS
}

NAMES=() LIMITS=() PHASE=collect CURRENT="" status=0

stage() {  # stage NAME LIMIT CMD...: run CMD under its limit, log it, record its exit code
  local name=$1 limit=$2; shift 2
  if [ "$PHASE" = collect ]; then NAMES+=("$name"); LIMITS+=("$limit"); return; fi
  if [ "$PHASE" = prewarm ]; then prewarm_job "$name" "$@"; return; fi
  if ! selected "$name"; then
    record "$name" skip 0 "$limit" "not in GPU_CHECK_ONLY"; return
  fi
  [ "$MODE" = dry ] && limit=$DRY_LIMIT
  if [ "$name" = "$FAIL_STAGE" ]; then
    set -- sh -c 'echo "GPU_CHECK_FAIL_STAGE: this stage fails on purpose"; exit 3'
  fi
  echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*"
  CURRENT=$name CURRENT_T0=$SECONDS CURRENT_LIMIT=$limit
  rm -f "$WORK.stage.rc" "$WORK.stage.pid"
  # In the background with `wait`, so that a signal to this script is handled at once (a
  # foreground pipeline would defer the trap until the stage ends); the command's own exit
  # code goes through stage.rc, not tee's. GPU_CHECK_STAGE names the stage to its processes.
  (
    GPU_CHECK_STAGE=$name timeout -k "$KILL_GRACE" "$limit" "$@" 2>&1 &
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
  [ "$PHASE" = prewarm ] && return
  echo "=== $1 skipped: $3"
  record "$1" skip 0 "$2" "$3"
  pack
}

selected() { [ -z "$ONLY" ] || [[ ",$ONLY," == *",$1,"* ]]; }

record() { echo "$*" >> "$WORK/stages.txt"; }

extract_json() {  # a step of its own: grep's exit code says nothing about the benchmark
  grep '^{' "$WORK/logs/$1.log" > "$WORK/$1.jsonl" 2>/dev/null || true
}

pack() {  # summary.md, stages.txt and the tar in $OUT, replaced whole (rename) each time
  local limit=$((PACK_LIMIT / 2)); [ "$MODE" = dry ] && limit=$DRY_LIMIT  # half each
  if ! timeout "$limit" "$PY" tools/summarize_bench.py "$WORK" > "$WORK/summary.md" \
       2> "$WORK/logs/summary.log"; then
    { echo; echo "tools/summarize_bench.py failed:"; cat "$WORK/logs/summary.log"; } \
      >> "$WORK/summary.md"
    status=1
  fi
  cp "$WORK/summary.md" "$WORK/stages.txt" "$OUT/"
  timeout "$limit" tar -czf "$OUT/gpu_check.tar.gz.part" -C "$WORK" . \
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

# ---- the pre-warm (bash tools/gpu_check.sh --prewarm=gpu|dry, the first stage's command) --
# Each Triton-launching stage's command, one step each, in parallel processes up to nproc; the
# two training steps one after the other (two ResNet-50 states would share the GPU's memory;
# the other jobs hold a few GB each: the kernel's eager baselines at 16384 x 21841, the
# multi-crop stage at batch 256, the gpu tests' ResNet-18 at batch 32).
# Under the first stage's time limit: `timeout` ends this whole process group.
prewarm_job() {  # prewarm_job NAME CMD...: one job's script, its output kept for the log
  [[ " $PREWARM_STAGES " == *" $1 "* ]] && selected "$1" || return 0
  local job=$1; shift
  [ "$job" = bench_step_bs64 ] && job=bench_step_bs256
  printf '%q ' "$@" >> "$PW/$job.sh"
  printf '|| rc=$?\n' >> "$PW/$job.sh"
}

prewarm() {
  PW=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_prewarm.XXXXXX")
  trap 'rm -rf "$PW"' EXIT
  PHASE=prewarm
  plan
  local width=$CORES jobs=0 failed=0 script
  for script in "$PW"/*.sh; do
    if [ "$jobs" -ge "$width" ]; then wait -n || failed=$((failed + 1)); jobs=$((jobs - 1)); fi
    { echo "rc=0"; cat "$script"; echo 'exit $rc'; } > "$script.run"
    (bash "$script.run" > "${script%.sh}.log" 2>&1) &
    jobs=$((jobs + 1))
  done
  while [ "$jobs" -gt 0 ]; do wait -n || failed=$((failed + 1)); jobs=$((jobs - 1)); done
  for script in "$PW"/*.sh; do
    echo "--- $(basename "${script%.sh}"): $(tr '\n' ' ' < "$script")"
    cat "${script%.sh}.log"
  done
  echo "pre-warm: $(ls "$PW"/*.sh | wc -l) jobs, at most $width at once, $failed failed"
  [ "$failed" -eq 0 ]
}

# ---- the plan, checked before anything runs ---------------------------------------------
plan
if [ "$MODE" = prewarm ]; then prewarm; exit $?; fi
per_stage=$((KILL_GRACE + PACK_LIMIT))
setup=$((NVSMI_LIMIT + PROBE_LIMIT + KILL_GRACE + 2 * PACK_LIMIT + SLACK))
total=$setup limit_sum=0 budget=$BUDGET
[ -n "$ONLY" ] && budget=$RERUN_BUDGET
for i in "${!NAMES[@]}"; do
  selected "${NAMES[$i]}" || continue
  total=$((total + LIMITS[i] + per_stage)) limit_sum=$((limit_sum + LIMITS[i]))
done
if [ "$MODE" = plan ]; then
  echo "python $PY"
  for i in "${!NAMES[@]}"; do
    if selected "${NAMES[$i]}"; then echo "${NAMES[$i]} ${LIMITS[$i]}"
    else echo "${NAMES[$i]} ${LIMITS[$i]} skip"; fi
  done
  echo "setup $setup, per stage $per_stage"
  echo "total $total (limits $limit_sum; budget $budget)"
fi
if [ "$total" -gt "$budget" ]; then
  echo "the plan can spend ${total}s: more than its ${budget}s budget" >&2; exit 2
fi
[ "$MODE" = plan ] && exit 0
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
  echo "python: $PY"
  if command -v nvidia-smi >/dev/null; then
    timeout -k 1 "$NVSMI_LIMIT" nvidia-smi --query-gpu=name,memory.total,driver_version \
      --format=csv,noheader || echo "nvidia-smi failed (exit $?)"
  else
    echo "nvidia-smi: not found"
  fi
  probe_limit=$PROBE_LIMIT; [ "$MODE" = dry ] && probe_limit=$DRY_LIMIT
  timeout -k "$KILL_GRACE" "$probe_limit" "$PY" -m trex_fast.env \
    || echo "python -m trex_fast.env failed (exit $?)"
} 2>&1 | tee "$WORK/env.txt"
pack

PHASE=run
plan
pack  # the stages.txt lines of skipped stages after the last one that ran
echo "=== done in $((SECONDS - START))s, exit $status; $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit $status
