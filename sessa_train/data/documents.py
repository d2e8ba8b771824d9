"""Documents from text and JSONL files or directories.

``.txt`` / ``.md``: one document per file. ``.jsonl``: one document per line, its text under
``text_key``. Directories are searched recursively for those suffixes, in sorted order.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from sessa_train.errors import DataError

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl",)


def expand_inputs(inputs: list[str | Path]) -> list[Path]:
    """Files named directly or found under directories, in a stable order."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.suffix in TEXT_SUFFIXES + JSONL_SUFFIXES and p.is_file())
            if not found:
                raise DataError(f"no .txt, .md or .jsonl files under directory {item}")
            files += found
        elif item.is_file():
            if item.suffix not in TEXT_SUFFIXES + JSONL_SUFFIXES:
                raise DataError(f"unsupported input file {item}: expected .txt, .md or .jsonl")
            files.append(item)
        else:
            raise DataError(f"input not found: {item}")
    return files


def read_documents(path: Path, text_key: str = "text") -> Iterator[str]:
    """Yield the documents of one file; a bad JSONL line raises ValueError naming file:line."""
    if path.suffix in TEXT_SUFFIXES:
        yield path.read_text(encoding="utf-8")
        return
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
                raise DataError(f"{path}:{lineno}: expected an object with a string field {text_key!r}")
            yield record[text_key]


def iter_documents(inputs: list[str | Path], text_key: str = "text") -> Iterator[str]:
    for path in expand_inputs(inputs):
        yield from read_documents(path, text_key)
