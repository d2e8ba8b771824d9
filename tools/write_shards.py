"""Thin wrapper: `python tools/write_shards.py --help` (also installed as a console script)."""

from sessa_train.data.cli import write_shards_main

if __name__ == "__main__":
    raise SystemExit(write_shards_main())
