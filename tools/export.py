"""Thin wrapper: `python tools/export.py --help` (also installed as the sessa-export console script)."""

from sessa_train.cli import export_main

if __name__ == "__main__":
    raise SystemExit(export_main())
