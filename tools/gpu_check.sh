#!/usr/bin/env bash
# GPU acceptance in one short window (DESIGN.md "Where it must run"): on one H100/H200 whose
# Python has torch (2.11+), triton, numba and opencv only. Installs nothing, needs no network,
# no ffcv and no DALI; at most 8 minutes (stage limits sum to 480 s). Writes JSON lines, logs and summary.md to $OUT
# (./bench_out when OUT is unset). Each stage has its own time limit; a failing stage is
# recorded and the next one still runs. Usage: bash tools/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./bench_out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0

stage() {  # stage NAME SECONDS CMD... : run, tee into $OUT/NAME.log, record the exit code
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*"
  timeout "$limit" "$@" > >(tee "$OUT/$name.log") 2>&1
  local rc=$?
  echo "=== $name exit $rc"
  echo "$name $rc" >> "$OUT/stages.txt"
  [ $rc -eq 0 ] || status=1
}

: > "$OUT/stages.txt"
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} | tee "$OUT/env.txt"

stage gpu_tests 80 $PY -m pytest -q -m gpu tests -p no:cacheprovider
stage bench_kernel 50 sh -c "$PY tools/bench_kernel.py --device=cuda --n=2304,16384 \
  --c=1000,21841 --dtype=bf16 | grep '^{' > $OUT/bench_kernel.jsonl; cat $OUT/bench_kernel.jsonl"
for bs in 64 256; do
  for compile in False True; do
    limit=45; [ "$compile" = True ] && limit=90  # compilation of ResNet-50 takes a minute
    stage "bench_step_bs${bs}_compile${compile}" $limit sh -c "$PY tools/bench_step.py \
      --arch=resnet50 --preset=trex --batch_size=$bs --precision=bf16 --channels_last=True \
      --compile=$compile --loss_impl=triton --steps=20 --warmup=5 --device=cuda \
      | grep '^{' >> $OUT/bench_step.jsonl; tail -n1 $OUT/bench_step.jsonl"
  done
done
stage bench_gpu_stage 40 sh -c "$PY tools/bench_gpu_stage.py --device=cuda --batch_size=256 \
  | grep '^{' >> $OUT/bench_gpu_stage.jsonl; tail -n1 $OUT/bench_gpu_stage.jsonl"
# FFCV's decode="gpu" mode: nvJPEG batch decode + the same stage, and nvJPEG vs the CPU decoder
stage bench_gpu_stage_nvjpeg 40 sh -c "$PY tools/bench_gpu_stage.py --device=cuda \
  --batch_size=256 --decode=gpu | grep '^{' >> $OUT/bench_gpu_stage.jsonl; \
  tail -n1 $OUT/bench_gpu_stage.jsonl"
$PY tools/summarize_bench.py "$OUT" > "$OUT/summary.md" 2>&1
cat "$OUT/summary.md"
exit $status
