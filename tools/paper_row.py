"""Thin wrapper: `python tools/paper_row.py --help` (sessa_train/evaluation/paper.py)."""

from sessa_train.evaluation.paper import main

if __name__ == "__main__":
    raise SystemExit(main())
