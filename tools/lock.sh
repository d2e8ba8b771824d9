#!/usr/bin/env bash
# Refresh requirements.lock: set up a throwaway environment with the newest versions that
# pyproject.toml allows (tools/bootstrap.sh with SESSA_UNLOCKED=1: the same installs in the same
# order), and freeze it. Run it on the project's machine kind (Linux x86-64, Python 3.11, the local
# CPU torch wheel), then run the whole suite on the new lock before committing it:
#
#     bash tools/lock.sh && rm -rf .venv && bash tools/bootstrap.sh && .venv/bin/python -m pytest
#
# Why a frozen environment rather than a resolver's lock (pip-compile, uv): DeepSpeed is built
# from its sdist without build isolation against the installed torch, and torch is the local CPU
# wheel that only this machine's pip configuration finds; a resolver run apart from the install
# sees neither. Freezing what bootstrap installed records exactly the environment the suite
# passes with, build tools (setuptools, wheel) included; pip is the interpreter's own.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
SESSA_UNLOCKED=1 VENV="$WORK/venv" bash tools/bootstrap.sh
{
  echo "# The environment CI passes with: tools/bootstrap.sh installs these versions (as pip constraints)."
  echo "# Written by tools/lock.sh on $(date -u +%Y-%m-%d) with $("$WORK/venv/bin/python" -V), $(uname -s) $(uname -m);"
  echo "# refresh it on purpose (README, Dependencies); tests/test_lock.py checks .venv against it."
  "$WORK/venv/bin/python" -m pip freeze --all --exclude-editable | grep -v -i '^pip==' | LC_ALL=C sort -f
} > requirements.lock.new
mv requirements.lock.new requirements.lock
echo "wrote requirements.lock: $(grep -vc '^#' requirements.lock) packages"
