"""A default English corpus that needs no download: the Python standard library's docs.

Documents: each help topic of ``pydoc_data.topics`` (the reference manual's text) and, for
every standard-library module source file, its module, class and function docstrings
joined into one document. Sources are parsed with ``ast`` (nothing is imported). The
result depends on the Python version; its checksum is recorded in the shard index.
"""

from __future__ import annotations

import ast
import json
import sysconfig
from collections.abc import Iterator
from pathlib import Path

MIN_DOC_CHARS = 200


def _docstrings(source: str) -> list[str]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    docs = [ast.get_docstring(n, clean=True) for n in nodes]
    return [d for d in docs if d and len(d) >= 40]


def stdlib_documents() -> Iterator[str]:
    """Yield the documents in a fixed order."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        if len(topics[name]) >= MIN_DOC_CHARS:
            yield topics[name]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__"}
    for path in sorted(stdlib.rglob("*.py")):
        if skip & set(path.relative_to(stdlib).parts):
            continue
        doc = "\n\n".join(_docstrings(path.read_text(encoding="utf-8", errors="replace")))
        if len(doc) >= MIN_DOC_CHARS:
            yield doc


def write_default_corpus(out_path: str | Path) -> tuple[int, int]:
    """Write the corpus as JSONL (``{"text": ...}`` per line); returns (documents, characters)."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(out_path.suffix + ".tmp")
    n_docs = n_chars = 0
    with tmp.open("w", encoding="utf-8") as fh:
        for doc in stdlib_documents():
            fh.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
            n_docs += 1
            n_chars += len(doc)
    tmp.replace(out_path)
    return n_docs, n_chars
