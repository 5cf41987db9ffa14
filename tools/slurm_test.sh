#!/usr/bin/env bash
# Evaluation under Slurm, in mmseg's style:
#   bash tools/slurm_test.sh PARTITION JOB_NAME CONFIG CHECKPOINT GPUS [tools/test.py options]
# env as in tools/slurm_train.sh: GPUS_PER_NODE, CPUS_PER_TASK, SRUN_ARGS, PYTHON.
set -euo pipefail
if [ $# -lt 5 ]; then
    echo "usage: $0 PARTITION JOB_NAME CONFIG CHECKPOINT GPUS [tools/test.py options]" >&2
    exit 2
fi
PARTITION=$1
JOB_NAME=$2
CONFIG=$3
CHECKPOINT=$4
GPUS=$5
shift 5
GPUS_PER_NODE=${GPUS_PER_NODE:-$((GPUS < 8 ? GPUS : 8))}
CPUS_PER_TASK=${CPUS_PER_TASK:-5}
SRUN_ARGS=${SRUN_ARGS:-""}
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON=${PYTHON:-python}
# shellcheck disable=SC2086
exec srun -p "$PARTITION" --job-name="$JOB_NAME" --gres=gpu:"$GPUS_PER_NODE" --ntasks="$GPUS" \
    --ntasks-per-node="$GPUS_PER_NODE" --cpus-per-task="$CPUS_PER_TASK" --kill-on-bad-exit=1 ${SRUN_ARGS} \
    "$PYTHON" -u "$ROOT/tools/test.py" "$CONFIG" "$CHECKPOINT" --launcher slurm "$@"
