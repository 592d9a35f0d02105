#!/usr/bin/env bash
# Training on a CUDA GPU, as run once on a lent NVIDIA H200 (docs/gpu.md has what it gave):
#   1. the default CNN recipe exactly as `make train` runs it, on the GPU (the CUDA path, timed);
#   2. TEACHERS CNNs of the default recipe, TEACHER_EPOCHS epochs each, seeds 1..TEACHERS, one validation split
#      (seed 0), all at once on the one GPU: longer runs, and an ensemble to distil;
#   3. students distilled from the teachers' mean logits (training/train.py, `--teachers`), as many epochs as the
#      time left allows (STUDENT_EPOCHS caps it).
# Everything runs under BUDGET_S seconds; results land in $OUT (phase1.tgz, phase2.tgz, log.txt, gpu.csv).
#   OUT=/tmp/out BUDGET_S=440 MNIST_DATA_DIR=data/mnist bash scripts/gpu-train.sh   (the documented run)
set -u
OUT=${OUT:-/tmp/gpu-train}
BUDGET_S=${BUDGET_S:-450}
TEACHERS=${TEACHERS:-8}
TEACHER_EPOCHS=${TEACHER_EPOCHS:-30}
STUDENT_EPOCHS=${STUDENT_EPOCHS:-60}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
EXTRA=${EXTRA:-}  # more train flags for every run (a dry run on a CPU: DEVICE=cpu EXTRA="--train-subset 500")
export PYTHONUNBUFFERED=1
mkdir -p "$OUT" runs logs-gpu
START=$(date +%s)
DEADLINE=$((START + BUDGET_S))
exec > >(tee -a "$OUT/log.txt") 2>&1
say() { echo "[$(date +%T) +$(($(date +%s) - START))s] $*"; }

say "machine: $(nproc) cores, $(free -g | awk '/Mem/ {print $2}') GiB"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -l 5 > "$OUT/gpu.csv" &
GPU_LOG=$!
trap 'kill $GPU_LOG 2>/dev/null' EXIT

pack() {  # pack <name> <run dirs...>: checkpoints, metrics, curves and logs of the finished runs
  local name=$1; shift
  tar czf "$OUT/$name.tgz.tmp" logs-gpu $(for d in "$@"; do ls "$d"/best.pt "$d"/metrics.json "$d"/*.png 2>/dev/null; done)
  mv "$OUT/$name.tgz.tmp" "$OUT/$name.tgz"
}
run_dir() { sed -n 's/^training.train.run: writing //p' "logs-gpu/$1.log" | tail -1; }  # logged as a run starts

# Phase 1: the default recipe and the teachers, all at once.
say "phase 1: default recipe + $TEACHERS teachers x $TEACHER_EPOCHS epochs"
PHASE1_CAP=$((BUDGET_S * 55 / 100))
timeout "$PHASE1_CAP" $PY -m training train --model cnn --device $DEVICE $EXTRA > logs-gpu/default.log 2>&1 &
pids=($!)
for s in $(seq 1 "$TEACHERS"); do
  timeout "$PHASE1_CAP" $PY -m training train --model cnn --device $DEVICE $EXTRA --seed "$s" --split-seed 0 \
    --epochs "$TEACHER_EPOCHS" > "logs-gpu/teacher$s.log" 2>&1 &
  pids+=($!)
done
wait "${pids[@]}"
say "phase 1 done"
dirs=()
for f in logs-gpu/default.log logs-gpu/teacher*.log; do
  d=$(run_dir "$(basename "$f" .log)")
  echo "$f -> ${d:-none}"; [ -n "$d" ] && dirs+=("$d")
  grep -E "^(best epoch|test accuracy|training wall)" "$f"
done
pack phase1 "${dirs[@]}"

teachers=()
for s in $(seq 1 "$TEACHERS"); do
  d=$(run_dir "teacher$s"); [ -n "$d" ] && [ -f "$d/best.pt" ] && teachers+=("$d/best.pt")
done
say "${#teachers[@]} teachers finished"
[ "${#teachers[@]}" -ge 2 ] || { say "too few teachers for phase 2"; exit 1; }

# Phase 2: students, sized to the time left from the teachers' measured seconds per epoch.
epoch_s=$($PY -c "
import json, pathlib, statistics, sys
files = [pathlib.Path(p).with_name('metrics.json') for p in sys.argv[1:]]
s = [h['seconds'] for f in files if f.exists() for h in json.loads(f.read_text())['history']]
print(statistics.median(s) if s else 10.0)" "${teachers[@]}")
left=$((DEADLINE - $(date +%s) - 45))
epochs=$($PY -c "print(max(6, min($STUDENT_EPOCHS, int($left / (1.3 * $epoch_s)))))")
say "phase 2: teacher epoch ${epoch_s}s, ${left}s left: students of $epochs epochs"
CAP2=$((DEADLINE - $(date +%s) - 20))
timeout "$CAP2" $PY -m training train --model cnn --device $DEVICE $EXTRA --split-seed 0 --epochs "$epochs" \
  --teachers "${teachers[@]}" > logs-gpu/student-w0.9-t4.log 2>&1 &
p1=$!
timeout "$CAP2" $PY -m training train --model cnn --device $DEVICE $EXTRA --split-seed 0 --epochs "$epochs" \
  --teachers "${teachers[@]}" --distill-weight 0.5 --distill-temperature 2 > logs-gpu/student-w0.5-t2.log 2>&1 &
p2=$!
timeout "$CAP2" $PY -m training train --model cnn --device $DEVICE $EXTRA --split-seed 0 --epochs "$epochs" --channels 32 64 \
  --teachers "${teachers[@]}" > logs-gpu/student-wide-w0.9-t4.log 2>&1 &
p3=$!
wait $p1 $p2 $p3
say "phase 2 done"
dirs=()
for f in logs-gpu/student-*.log; do
  d=$(run_dir "$(basename "$f" .log)")
  echo "$f -> ${d:-none}"; [ -n "$d" ] && dirs+=("$d")
  grep -E "^(best epoch|test accuracy|training wall)" "$f"
done
pack phase2 "${dirs[@]}"
say "done"
