# shellcheck shell=bash
# Sourced by tools/dist_{train,test}.sh and tools/slurm_{train,test}.sh (not a command of its own): their argument
# check and the two ways to start tools/train.py or tools/test.py on many processes. PYTHON (python) runs the tool.

LAUNCH_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON=${PYTHON:-python}

# require_args COUNT USAGE ARGS...: exit 2 with "usage: <script> USAGE" when ARGS has fewer than COUNT words.
require_args() {
    local count=$1 usage=$2
    shift 2
    if [ $# -lt "$count" ]; then
        echo "usage: $0 $usage" >&2
        exit 2
    fi
}

# torchrun_tool NGPUS TOOL ARGS...: tools/TOOL ARGS --launcher pytorch in NGPUS processes (torchrun); multi-node:
# NNODES, NODE_RANK, MASTER_ADDR (and PORT) set on every node.
torchrun_tool() {
    local ngpus=$1 tool=$2
    shift 2
    exec "$PYTHON" -m torch.distributed.run \
        --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" \
        --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${PORT:-29500}" \
        --nproc_per_node="$ngpus" \
        "$LAUNCH_ROOT/tools/$tool" "$@" --launcher pytorch
}

# srun_tool PARTITION JOB_NAME GPUS TOOL ARGS...: tools/TOOL ARGS --launcher slurm as one Slurm task per GPU
# (GPUS_PER_NODE per node, default min(GPUS, 8)); CPUS_PER_TASK (5), SRUN_ARGS (extra srun arguments).
srun_tool() {
    local partition=$1 job_name=$2 gpus=$3 tool=$4
    shift 4
    local gpus_per_node=${GPUS_PER_NODE:-$((gpus < 8 ? gpus : 8))}
    # shellcheck disable=SC2086  # SRUN_ARGS is a list of words
    exec srun -p "$partition" --job-name="$job_name" --gres=gpu:"$gpus_per_node" --ntasks="$gpus" \
        --ntasks-per-node="$gpus_per_node" --cpus-per-task="${CPUS_PER_TASK:-5}" --kill-on-bad-exit=1 \
        ${SRUN_ARGS:-} "$PYTHON" -u "$LAUNCH_ROOT/tools/$tool" "$@" --launcher slurm
}
