#!/usr/bin/env bash
# Quick start on a CPU, from a fresh checkout: set up .venv, make the synthetic dataset, train a tiny InternViT +
# UperNet on it (progress log), evaluate (mIoU, per-class table), write overlay PNGs. A few minutes on 2 cores.
#   bash tools/quickstart.sh
# Environment: VENV (default .venv), DATA (default data/synthetic_ade20k), WORK_DIR (default a new folder under
# work_dirs/), OMP_NUM_THREADS (default 1: one thread per process is fastest for this tiny model on small CPUs).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV=${VENV:-.venv}
CONFIG=configs/segmentation/quickstart_tiny_upernet_synthetic.py
DATA=${DATA:-data/synthetic_ade20k}
WORK_DIR=${WORK_DIR:-work_dirs/quickstart_$(date +%Y%m%d_%H%M%S)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}
step() { printf '\n==> %s\n' "$*"; }

step "[1/5] Python environment ($VENV)"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
if ! "$PY" -c 'import torch, torchvision; assert torch.__version__.startswith("2.14.1")' 2>/dev/null; then
    "$PY" -m pip install torch==2.14.1 torchvision==0.29.1
fi
if ! "$PY" -m pip show -q internvit-dense >/dev/null 2>&1; then
    "$PY" -m pip install -e .
fi
"$PY" -c 'import torch, mmengine, mmseg; print(f"torch {torch.__version__}, mmengine {mmengine.__version__}, mmseg {mmseg.__version__}")'

step "[2/5] Synthetic dataset ($DATA)"
if [ -f "$DATA/dataset.json" ]; then
    echo "using the existing $DATA"
else
    "$PY" tools/make_synthetic_ade20k.py --out "$DATA"
fi

step "[3/5] Training the tiny InternViT + UperNet on the CPU ($WORK_DIR)"
"$PY" tools/train.py "$CONFIG" --work-dir "$WORK_DIR" --cfg-options \
    train_dataloader.dataset.data_root="$DATA" val_dataloader.dataset.data_root="$DATA" \
    test_dataloader.dataset.data_root="$DATA"
CHECKPOINT="$WORK_DIR/$(basename "$(cat "$WORK_DIR/last_checkpoint")")"

step "[4/5] Evaluating $CHECKPOINT and writing overlays"
"$PY" tools/test.py "$CONFIG" "$CHECKPOINT" --work-dir "$WORK_DIR" --show-dir "$WORK_DIR/overlays" \
    --max-overlays 8 --cfg-options test_dataloader.dataset.data_root="$DATA" | tee "$WORK_DIR/test_output.txt"

step "[5/5] Done"
grep -Eo 'aAcc: [0-9.]+ +mIoU: [0-9.]+ +mAcc: [0-9.]+' "$WORK_DIR/test_output.txt" | tail -n 1 || true
echo "checkpoint: $CHECKPOINT"
echo "overlays (ground truth | prediction): $WORK_DIR/overlays/"
ls "$WORK_DIR/overlays"
