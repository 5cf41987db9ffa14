#!/usr/bin/env bash
# Quick start on a CPU, from a fresh checkout: set up .venv, make the synthetic dataset, train a tiny InternViT +
# UperNet on it (a progress line per logging interval), evaluate (mIoU, per-class table), write overlay PNGs. A few
# minutes on 2 cores. The full train/test output is in WORK_DIR/train_output.txt and test_output.txt.
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
# Run a command with its full output in LOG and only the readable part on the screen: the progress line of each
# logging interval (Iter/Epoch), the metric tables and errors (appended: an earlier run's log is kept). On failure,
# the log's last lines and exit 1.
run_logged() {
    local log=$1
    shift
    if ! "$@" 2>&1 | tee -a "$log" | awk '/Iter\(|Epoch\(|^[|+]|best checkpoint|Error|error:/ { print; fflush() }'; then
        printf '\nfailed: %s\nlast lines of %s:\n' "$*" "$log" >&2
        tail -n 30 "$log" >&2
        exit 1
    fi
}

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

step "[3/5] Training the tiny InternViT + UperNet on the CPU ($WORK_DIR; full log: train_output.txt)"
mkdir -p "$WORK_DIR"
run_logged "$WORK_DIR/train_output.txt" "$PY" tools/train.py "$CONFIG" --work-dir "$WORK_DIR" --cfg-options \
    train_dataloader.dataset.data_root="$DATA" val_dataloader.dataset.data_root="$DATA" \
    test_dataloader.dataset.data_root="$DATA"
CHECKPOINT="$WORK_DIR/$(basename "$(cat "$WORK_DIR/last_checkpoint")")"

step "[4/5] Evaluating $CHECKPOINT and writing overlays (full log: test_output.txt)"
run_logged "$WORK_DIR/test_output.txt" "$PY" tools/test.py "$CONFIG" "$CHECKPOINT" --work-dir "$WORK_DIR" \
    --show-dir "$WORK_DIR/overlays" --max-overlays 8 --cfg-options test_dataloader.dataset.data_root="$DATA"

step "[5/5] Done"
grep -Eo 'aAcc: [0-9.]+ +mIoU: [0-9.]+ +mAcc: [0-9.]+' "$WORK_DIR/test_output.txt" | tail -n 1 || true
echo "checkpoint: $CHECKPOINT"
echo "overlays (ground truth | prediction): $WORK_DIR/overlays/"
ls "$WORK_DIR/overlays"
