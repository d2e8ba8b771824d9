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


CLOZE_TASK = """\
# lm-evaluation-harness task over the default corpus's validation documents (offline): the last
# word of a sentence given the words before it, as LAMBADA asks (written by sessa-prepare-default-data)
task: default_cloze
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: " {{{{target}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def write_cloze_task(corpus: Path, out_dir: Path, val_fraction: float, items: int = 200) -> Path:
    """A local lm-eval task (``out_dir/default_cloze.yaml`` and its JSONL) from the validation
    documents of ``corpus`` (the shards' split): sentences of 8+ words whose last word is
    alphabetic, context = the words before it, target = that word. Returns the YAML's path."""
    import re

    from sessa_train.data.shards import is_validation

    rows = []
    with open(corpus) as fh:
        for line in fh:
            text = json.loads(line)["text"]
            if not is_validation(text, val_fraction):
                continue
            for sentence in re.split(r"(?<=[.!?])\s+", " ".join(text.split())):
                words = sentence.rstrip(".!?").split(" ")
                if len(words) >= 8 and words[-1].isalpha():
                    rows.append({"context": " ".join(words[:-1]), "target": words[-1]})
            if len(rows) >= items:
                break
    out_dir.mkdir(parents=True, exist_ok=True)
    data = out_dir / "default_cloze.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows[:items]))
    task = out_dir / "default_cloze.yaml"
    task.write_text(CLOZE_TASK.format(data=data.resolve()))
    return task
