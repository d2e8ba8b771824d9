"""Thin wrapper: `python tools/memory_tail.py --help` (sessa_train/evaluation/memory_tail.py)."""

from sessa_train.evaluation.memory_tail import main

if __name__ == "__main__":
    raise SystemExit(main())
