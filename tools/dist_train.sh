#!/usr/bin/env bash
# Distributed training with torchrun: bash tools/dist_train.sh CONFIG NGPUS [tools/train.py options]
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR (and PORT) on every node. The launch itself: tools/launch.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
require_args 2 'CONFIG NGPUS [tools/train.py options]' "$@"
torchrun_tool "$2" train.py "$1" "${@:3}"
