"""Thin wrapper: `python tools/generate.py --help` (also installed as the sessa-generate console script)."""

from sessa_train.cli import generate_main

if __name__ == "__main__":
    raise SystemExit(generate_main())
