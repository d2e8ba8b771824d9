"""Thin wrapper: `python tools/eval.py --help` (sessa_train/evaluation/report.py)."""

from sessa_train.evaluation.report import main

if __name__ == "__main__":
    raise SystemExit(main())
