#!/usr/bin/env bash
# Wheels of what the GPU image lacks (mmengine, mmcv-lite, mmsegmentation and their small pure-Python needs), for
# Python 3.12 on x86-64, into .whl/ (gitignored); tools/gpu_benchmarks.py --wheels .whl installs them there.
#   bash tools/gpu_wheels.sh [PYTHON_VERSION]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${1:-3.12}
python3 -m pip download --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
  mmengine==0.10.7 mmcv-lite==2.1.0 mmsegmentation==1.2.2 addict==2.4.0 yapf==0.43.0 platformdirs==4.14.8 \
  termcolor==3.3.0 prettytable==3.18.0 wcwidth==0.9.4 ftfy==6.3.1
