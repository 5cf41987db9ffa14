#!/usr/bin/env bash
# Training under Slurm, in mmseg's style: bash tools/slurm_train.sh PARTITION JOB_NAME CONFIG GPUS [tools/train.py options]
# One task per GPU (GPUS_PER_NODE per node, default min(GPUS, 8)); env: CPUS_PER_TASK (5), SRUN_ARGS (extra srun
# arguments), PYTHON (python). The work dir defaults to work_dirs/<config name>; resume with --resume.
set -euo pipefail
if [ $# -lt 4 ]; then
    echo "usage: $0 PARTITION JOB_NAME CONFIG GPUS [tools/train.py options]" >&2
    exit 2
fi
PARTITION=$1
JOB_NAME=$2
CONFIG=$3
GPUS=$4
shift 4
GPUS_PER_NODE=${GPUS_PER_NODE:-$((GPUS < 8 ? GPUS : 8))}
CPUS_PER_TASK=${CPUS_PER_TASK:-5}
SRUN_ARGS=${SRUN_ARGS:-""}
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON=${PYTHON:-python}
# shellcheck disable=SC2086  # SRUN_ARGS is a list of words
exec srun -p "$PARTITION" --job-name="$JOB_NAME" --gres=gpu:"$GPUS_PER_NODE" --ntasks="$GPUS" \
    --ntasks-per-node="$GPUS_PER_NODE" --cpus-per-task="$CPUS_PER_TASK" --kill-on-bad-exit=1 ${SRUN_ARGS} \
    "$PYTHON" -u "$ROOT/tools/train.py" "$CONFIG" --launcher slurm "$@"
