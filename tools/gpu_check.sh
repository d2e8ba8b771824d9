#!/usr/bin/env bash
# The GPU check (tools/gpu_check.py): every CUDA path of the package on the GPU of this machine,
# one JSON summary (--out, default gpu_check.json). On a machine without CUDA it says so in one
# line and exits 0 without running anything. PYTHON: the interpreter to use (default: .venv's if
# there is one, else python3); on a machine without the project's dependencies, see docs/cluster.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: needs a CUDA GPU (torch.cuda.is_available() is False with $PYTHON): nothing run"
  exit 0
fi
exec "$PYTHON" tools/gpu_check.py "$@"
