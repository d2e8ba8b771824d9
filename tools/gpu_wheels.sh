#!/usr/bin/env bash
# Wheels, for Python 3.12 on x86-64 Linux, of what a GPU machine that already has torch, triton,
# numpy, sentencepiece, safetensors, tensorboard, transformers and PyYAML lacks to run this
# package: deepspeed (an sdist, built here into a pure-Python wheel that JIT-builds its ops),
# megatron-core, webdataset, omegaconf, zstandard and their small dependencies, and
# flash-linear-attention (fla-core; its DeltaFormer kernel is a row of the GPU benchmark). Made on a CPU machine with
# PyPI; nothing is installed here. Carry the folder and, on the GPU machine:
#   python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
#   bash tools/gpu_check.sh
# (docs/cluster.md). Usage: bash tools/gpu_wheels.sh [OUT_DIR, default .whl]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-.whl}"
PY="${PYTHON:-.venv/bin/python}"
mkdir -p "$OUT"
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
# binary or pure-Python wheels of the versions this machine runs
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d "$OUT" \
  "megatron-core==$(version megatron-core)" "webdataset==$(version webdataset)" "omegaconf==$(version omegaconf)" \
  "braceexpand==$(version braceexpand)" "hjson==$(version hjson)" "pydantic==$(version pydantic)" \
  "pydantic-core==$(version pydantic-core)" "annotated-types==$(version annotated-types)" \
  "typing-inspection==$(version typing-inspection)" "typing-extensions==$(version typing-extensions)" \
  "antlr4-python3-runtime==$(version antlr4-python3-runtime)" "zstandard==$(version zstandard)" \
  "fla-core==${FLA_VERSION:-0.6.0}" "flash-linear-attention==${FLA_VERSION:-0.6.0}"
# deepspeed ships as a source distribution: built here into a pure-Python wheel
"$PY" -m pip wheel --quiet --no-deps --no-build-isolation -w "$OUT" \
  "deepspeed==$(version deepspeed)"
ls -l "$OUT"
du -sh "$OUT"
