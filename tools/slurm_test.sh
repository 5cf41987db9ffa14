#!/usr/bin/env bash
# Evaluation under Slurm, in mmseg's style:
#   bash tools/slurm_test.sh PARTITION JOB_NAME CONFIG CHECKPOINT GPUS [tools/test.py options]
# env as in tools/slurm_train.sh: GPUS_PER_NODE, CPUS_PER_TASK, SRUN_ARGS, PYTHON. The launch itself: tools/launch.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
require_args 5 'PARTITION JOB_NAME CONFIG CHECKPOINT GPUS [tools/test.py options]' "$@"
srun_tool "$1" "$2" "$5" test.py "$3" "$4" "${@:6}"
