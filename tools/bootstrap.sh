#!/usr/bin/env bash
# Idempotent set-up of ./.venv with the locked versions of requirements.lock (the environment CI
# passed with): the pinned torch first (on a CPU machine with the local CPU wheel this never
# downloads CUDA packages), deepspeed built against it, then this package with its dev extras,
# every install constrained by the lock. A dependency's new release changes nothing here until
# the lock is refreshed on purpose (bash tools/lock.sh, README "Dependencies").
#
# VENV: the environment to set up (default .venv). SESSA_UNLOCKED=1: the newest versions that
# pyproject.toml allows instead of the lock (what tools/lock.sh freezes).
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION="2.13.0"
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
LOCK="requirements.lock"
if [ "${SESSA_UNLOCKED:-0}" = 1 ]; then
  CONSTRAINT=()
else
  [ -f "$LOCK" ] || { echo "bootstrap: $LOCK is missing (bash tools/lock.sh writes it)" >&2; exit 1; }
  CONSTRAINT=(--constraint "$LOCK")
fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet "${CONSTRAINT[@]}")
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(not torch.__version__.startswith('$TORCH_VERSION'))" 2>/dev/null; then
  "${PIP[@]}" "torch==$TORCH_VERSION"
fi
# deepspeed ships as an sdist whose build imports torch: build it against the torch above
# (with build isolation pip would put an unpinned, CUDA-sized torch in the build env).
"${PIP[@]}" setuptools wheel
"${PIP[@]}" --no-build-isolation "deepspeed>=0.17"
"${PIP[@]}" -e ".[dev]"
# DeepSpeed builds its CPU communication op on the first process group it creates (about 32 s on
# 2 cores): built here, once per environment, where the trainer's processes look for it
# (<venv>/torch_extensions, sessa_train/process_env.py), so the first run after set-up does not
# stall on it. DeepSpeed's own call: nothing where its accelerator has no such op.
"$VENV/bin/python" -c "from sessa_train.process_env import apply_runtime_defaults; apply_runtime_defaults()
from deepspeed.comm.torch import build_shm_op; build_shm_op()" >/dev/null
