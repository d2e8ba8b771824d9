#!/usr/bin/env bash
# Idempotent set-up of ./.venv: the pinned torch first (on a CPU machine with the local
# CPU wheel this never downloads CUDA packages), deepspeed built against it, then this
# package with its dev extras.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION="2.13.0"
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, sys; sys.exit(not torch.__version__.startswith('$TORCH_VERSION'))" 2>/dev/null; then
  .venv/bin/python -m pip install --quiet "torch==$TORCH_VERSION"
fi
# deepspeed ships as an sdist whose build imports torch: build it against the torch above
# (with build isolation pip would put an unpinned, CUDA-sized torch in the build env).
if ! .venv/bin/python -c "import deepspeed" 2>/dev/null; then
  .venv/bin/python -m pip install --quiet setuptools wheel
  .venv/bin/python -m pip install --quiet --no-build-isolation "deepspeed>=0.17"
fi
.venv/bin/python -m pip install --quiet -e ".[dev]"
