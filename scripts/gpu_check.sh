#!/bin/bash
# GPU figures for the README, on a machine with a CUDA GPU and the project installed (`make
# install`, or its wheels carried and put on PYTHONPATH). One prepared run, ~15 min on one GPU:
#   1. the default pipeline end to end (`alphaloom run`, default config, train.device=cuda);
#   2. an epoch's samples/s on its shard set against the model-only bound (benchmarks/model.py:
#      forward + loss + backward on batches already on the device, no loading);
#   3. `compare` of 4 fits (2 variants x 2 seeds) sharing the GPU, 1 worker against 4
#      (benchmarks/fit_fanout.py, the same metrics either way).
#   4. DDP with NCCL, one rank, then a rerun that must resume from the checkpoint.
# Usage: bash scripts/gpu_check.sh [python]   (writes logs and summary.txt under $OUT)
set -u
PY=${1:-.venv/bin/python}
OUT=${OUT:-/tmp/alphaloom-gpu-out}; mkdir -p "$OUT"
W=${W:-/tmp/alphaloom-gpu}; rm -rf "$W"; mkdir -p "$W"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120 PREFECT_SERVER_ANALYTICS_ENABLED=false
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=1
export MLFLOW_TRACKING_URI="sqlite:///$W/mlflow.db"
date -u +%F | tee "$OUT/summary.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/summary.txt"
"$PY" -c "import mlflow; mlflow.MlflowClient().search_experiments()"  # the store, once

SECONDS=0
"$PY" -m alphaloom.flows.cli run --config configs/default.yaml --set "work_dir=$W/work" \
    --set train.device=cuda > "$OUT/run.log" 2>&1
echo "1. alphaloom run (default config, cuda): rc=$? wall=${SECONDS}s" | tee -a "$OUT/summary.txt"
grep -h "test rank IC\|Rank IC\|epoch" "$OUT/run.log" | tail -12 >> "$OUT/summary.txt"

SHARDS=$(ls -d "$W"/work/shards/*/ | head -1)
"$PY" benchmarks/train_epoch.py --shards "$SHARDS" --epochs 2 --set train.device=cuda \
    --set train.num_threads=4 > "$OUT/epoch.log" 2>&1
echo "2a. epochs on the default shard set (cuda): rc=$?" | tee -a "$OUT/summary.txt"
grep -h '"epoch"\|train_model' "$OUT/epoch.log" >> "$OUT/summary.txt"
"$PY" benchmarks/model.py --batch 512 --steps 30 --features 158 > "$OUT/model.log" 2>&1
echo "2b. model-only bound (batch on the device): rc=$?" | tee -a "$OUT/summary.txt"
grep -h "samples/s\|overhead" "$OUT/model.log" >> "$OUT/summary.txt"

"$PY" benchmarks/fit_fanout.py --only compare --workers 4 --seeds 2 --set train.device=cuda \
    --set train.epochs=2 > "$OUT/fanout.log" 2>&1
echo "3. compare, 4 fits sharing the GPU: rc=$?" | tee -a "$OUT/summary.txt"
tail -4 "$OUT/fanout.log" >> "$OUT/summary.txt"

ARGS=(--config configs/smoke.yaml --set "work_dir=$W/ddp" --set train.device=cuda
      --set text.enabled=false --set train.epochs=3 --set train.patience=3
      --checkpoint-dir "$W/ckpt" --backend nccl)
for attempt in first rerun; do
  SECONDS=0
  "$PY" -m torch.distributed.run --nnodes=1 --nproc-per-node=1 --master-addr=127.0.0.1 \
      --master-port=29533 -m alphaloom.tasks.training.distributed "${ARGS[@]}" \
      > "$OUT/ddp-$attempt.log" 2>&1
  echo "4. DDP nccl $attempt: rc=$? wall=${SECONDS}s" | tee -a "$OUT/summary.txt"
  grep -h '"backend"\|"device"\|resumed_at' "$W/ckpt/ddp_result.json" >> "$OUT/summary.txt"
done
cat "$OUT/summary.txt"
