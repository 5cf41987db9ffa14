#!/usr/bin/env bash
# Distributed evaluation with torchrun: bash tools/dist_test.sh CONFIG CHECKPOINT NGPUS [tools/test.py options]
set -euo pipefail
if [ $# -lt 3 ]; then
    echo "usage: $0 CONFIG CHECKPOINT NGPUS [tools/test.py options]" >&2
    exit 2
fi
CONFIG=$1
CHECKPOINT=$2
NGPUS=$3
shift 3
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON=${PYTHON:-python}
exec "$PYTHON" -m torch.distributed.run \
    --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" \
    --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${PORT:-29500}" \
    --nproc_per_node="$NGPUS" \
    "$ROOT/tools/test.py" "$CONFIG" "$CHECKPOINT" --launcher pytorch "$@"
