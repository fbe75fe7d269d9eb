#!/bin/bash
# NCCL check of `python -m tasks.distributed` on one GPU: train, then run the same command again,
# which must resume from the checkpoint and return the finished model. Prints the rank's backend
# and device from ddp_result.json. Usage: bash scripts/nccl_check.sh [python]
set -u
PY=${1:-python3}
OUT=${OUT:-/tmp/alphaloom-nccl-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
W=/tmp/alphaloom-nccl; rm -rf "$W"
ARGS=(--config configs/smoke.yaml --set "work_dir=$W/work" --set train.device=cuda
      --set text.enabled=false --set train.epochs=3 --set train.patience=3
      --checkpoint-dir "$W/ckpt" --backend nccl)
nvidia-smi --query-gpu=name,driver_version --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import torch; print('torch', torch.__version__, 'nccl', torch.cuda.nccl.version())" \
    | tee -a "$OUT/gpu.txt"
for attempt in first rerun; do
  SECONDS=0
  "$PY" -m torch.distributed.run --nnodes=1 --nproc-per-node=1 --master-addr=127.0.0.1 \
      --master-port=29533 -m tasks.distributed "${ARGS[@]}" > "$OUT/$attempt.log" 2>&1
  echo "$attempt rc=$? seconds=$SECONDS" | tee -a "$OUT/summary.txt"
  cp "$W/ckpt/ddp_result.json" "$OUT/$attempt-result.json"
  grep -h '"backend"\|"device"\|resumed_at' "$OUT/$attempt-result.json"
done
