"""Thin wrapper: `python tools/train_tokenizer.py --help` (also installed as a console script)."""

from sessa_train.data.cli import train_tokenizer_main

if __name__ == "__main__":
    raise SystemExit(train_tokenizer_main())
