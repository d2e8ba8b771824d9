#!/usr/bin/env bash
# Idempotent set-up of ./.venv: the pinned torch first (on a CPU machine with the local
# CPU wheel this never downloads CUDA packages), then this package with its dev extras.
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
.venv/bin/python -m pip install --quiet -e ".[dev]"
