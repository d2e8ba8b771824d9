"""Thin wrapper: `python tools/prepare_default_data.py --help` (also installed as a console script)."""

from sessa_train.data.cli import prepare_default_data_main

if __name__ == "__main__":
    raise SystemExit(prepare_default_data_main())
