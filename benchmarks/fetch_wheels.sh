#!/usr/bin/env bash
# Fetch, where PyPI is reachable, the wheels the device machine's image lacks into .whl/
# (ignored by git): megatron-core 0.19.2 for CPython 3.12 on x86-64 Linux (2.4 MB; its declared
# needs, torch / numpy / packaging, are in the image). benchmarks/run_gpu.sh installs them there;
# the device call names ".whl" in its carry.
#
#   bash benchmarks/fetch_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl megatron-core==0.19.2
ls -l .whl
