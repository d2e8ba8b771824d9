"""Thin wrapper: `python tools/export.py --help` (also installed as the sessa-export console script)."""

from sessa_train.export import main

if __name__ == "__main__":
    raise SystemExit(main())
