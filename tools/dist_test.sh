#!/usr/bin/env bash
# Distributed evaluation with torchrun: bash tools/dist_test.sh CONFIG CHECKPOINT NGPUS [tools/test.py options]
# Multi-node: as tools/dist_train.sh. The launch itself: tools/launch.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
require_args 3 'CONFIG CHECKPOINT NGPUS [tools/test.py options]' "$@"
torchrun_tool "$3" test.py "$1" "$2" "${@:4}"
