#!/usr/bin/env bash
# Training under Slurm, in mmseg's style: bash tools/slurm_train.sh PARTITION JOB_NAME CONFIG GPUS [tools/train.py options]
# One task per GPU (GPUS_PER_NODE per node, default min(GPUS, 8)); env: CPUS_PER_TASK (5), SRUN_ARGS (extra srun
# arguments), PYTHON (python). The work dir defaults to work_dirs/<config name>; resume with --resume.
# The launch itself: tools/launch.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
require_args 4 'PARTITION JOB_NAME CONFIG GPUS [tools/train.py options]' "$@"
srun_tool "$1" "$2" "$4" train.py "$3" "${@:5}"
