#!/usr/bin/env bash
# Distributed training with torchrun: bash tools/dist_train.sh CONFIG NGPUS [tools/train.py options]
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR (and PORT) on every node.
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 CONFIG NGPUS [tools/train.py options]" >&2
    exit 2
fi
CONFIG=$1
NGPUS=$2
shift 2
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON=${PYTHON:-python}
exec "$PYTHON" -m torch.distributed.run \
    --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" \
    --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${PORT:-29500}" \
    --nproc_per_node="$NGPUS" \
    "$ROOT/tools/train.py" "$CONFIG" --launcher pytorch "$@"
