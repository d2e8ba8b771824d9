#!/usr/bin/env bash
# The suite's transformers tests against another transformers release, in a throwaway folder put
# before .venv's packages (.venv itself is not changed). pyproject.toml allows transformers
# >=4.57,<6; the lock installs one version (the upper end), CI runs the suite with it, and this
# checks the other end on purpose: the export and its remote code (tests/test_export.py, and the
# transformers tests of tests/test_tools.py), and from 5.24 on the mamba2 baseline, whose mixer is
# transformers' own (tests/test_paper.py -k mamba2). Record each run in docs/export.md.
#
#     bash tools/compat_check.sh 4.57.6          # the declared range's lower end
#     bash tools/compat_check.sh 5.24.0          # the lowest release with Mamba2Mixer(cache=)
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION="${1:?usage: bash tools/compat_check.sh TRANSFORMERS_VERSION (e.g. 4.57.6)}"
PY=.venv/bin/python
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
TARGET="$WORK/site"
# that release with the tokenizers and huggingface-hub it asks for; the venv keeps its torch and numpy
"$PY" -m pip install --quiet --no-warn-conflicts --target "$TARGET" "transformers==$VERSION"
rm -rf "$TARGET"/numpy* "$TARGET"/torch* "$TARGET"/bin
echo "compat_check: transformers $VERSION ($(PYTHONPATH="$TARGET" "$PY" -c 'import tokenizers, huggingface_hub as h; print(f"tokenizers {tokenizers.__version__}, huggingface-hub {h.__version__}")'))"
run() { PYTHONPATH="$TARGET" HF_MODULES_CACHE="$WORK/modules" "$PY" -m pytest -q -p no:cacheprovider "$@"; }
run tests/test_export.py
run tests/test_tools.py -k "autotokenizer or padded_batches or either_route"
if "$PY" -c "import sys; from packaging.version import Version as V; sys.exit(V('$VERSION') < V('5.24'))"; then
  run tests/test_paper.py -k mamba2
fi
