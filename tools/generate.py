"""Thin wrapper: `python tools/generate.py --help` (also installed as the sessa-generate console script)."""

from sessa_train.generate import main

if __name__ == "__main__":
    raise SystemExit(main())
