"""Command-line entry points of the data pipeline (console scripts and tools/ wrappers).

Bad input ends with one line on stderr (``error: ...``) and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from sessa_train.data.default_corpus import write_default_corpus
from sessa_train.data.documents import iter_documents
from sessa_train.data.shards import INDEX_NAME, write_shards
from sessa_train.data.tokenizer import MODEL_TYPES, train_tokenizer
from sessa_train.errors import SessaError

DEFAULT_DATA_DIR = Path("data/default")


def _run(parser: argparse.ArgumentParser, work: Callable[[argparse.Namespace], None], argv: list[str] | None) -> int:
    args = parser.parse_args(argv)
    try:
        work(args)
    except SessaError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    return 0


def _shard_size_args(p: argparse.ArgumentParser) -> None:
    size = p.add_mutually_exclusive_group()
    size.add_argument("--samples-per-shard", type=int, help="rotate shards by sample count (default 1024)")
    size.add_argument("--shard-bytes", type=int, help="rotate shards by size in bytes")


def train_tokenizer_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sessa-train-tokenizer", description="Train a sentencepiece tokenizer.")
    p.add_argument("--input", nargs="+", required=True, help=".txt/.md/.jsonl files or directories")
    p.add_argument("--text-key", default="text", help="JSONL field holding the text")
    p.add_argument("--model", type=Path, required=True, help="output path, ending in .model")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--model-type", choices=MODEL_TYPES, default="bpe")
    p.add_argument("--no-byte-fallback", action="store_true")
    p.add_argument("--max-sentences", type=int, default=2_000_000, help="lines sampled for training")

    def work(a: argparse.Namespace) -> None:
        start = time.perf_counter()
        path = train_tokenizer(
            iter_documents(a.input, a.text_key),
            a.model,
            vocab_size=a.vocab_size,
            model_type=a.model_type,
            byte_fallback=not a.no_byte_fallback,
            max_sentences=a.max_sentences,
        )
        print(f"wrote {path} ({a.model_type}, vocab {a.vocab_size}) in {time.perf_counter() - start:.1f}s")

    return _run(p, work, argv)


def write_shards_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sessa-write-shards", description="Tokenize a corpus into webdataset shards.")
    p.add_argument("--input", nargs="+", required=True, help=".txt/.md/.jsonl files or directories")
    p.add_argument("--text-key", default="text")
    p.add_argument("--tokenizer", type=Path, required=True, help="sentencepiece .model")
    p.add_argument("--out", type=Path, required=True, help="output directory (must not hold an index.json)")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per training sequence (samples hold +1)")
    _shard_size_args(p)
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of documents for validation")
    p.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: all cores)")
    p.add_argument("--no-progress", action="store_true")

    def work(a: argparse.Namespace) -> None:
        start = time.perf_counter()
        per_shard = a.samples_per_shard if a.shard_bytes is None and a.samples_per_shard else None
        index = write_shards(
            iter_documents(a.input, a.text_key),
            a.tokenizer,
            a.out,
            seq_len=a.seq_len,
            samples_per_shard=per_shard or (None if a.shard_bytes else 1024),
            shard_bytes=a.shard_bytes,
            val_fraction=a.val_fraction,
            num_workers=a.workers,
            progress=not a.no_progress,
        )
        _summary(index, a.out, time.perf_counter() - start)

    return _run(p, work, argv)


def _summary(index: dict, out: Path, seconds: float) -> None:
    for split, info in index["splits"].items():
        print(
            f"{split}: {info['documents']} documents -> {info['samples']} samples of {index['sample_tokens']} "
            f"tokens in {len(info['shards'])} shards ({info['dropped_tokens']} tail tokens dropped)"
        )
    total = sum(info["tokens"] for info in index["splits"].values())
    print(f"wrote {out / INDEX_NAME}: {total} tokens in {seconds:.1f}s ({total / max(seconds, 1e-9):,.0f} tokens/s)")


def _has_checksums(index: dict) -> bool:
    return all("sha256" in shard for split in index["splits"].values() for shard in split["shards"])


def prepare_default_data_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="sessa-prepare-default-data",
        description="Build the offline default corpus (Python stdlib docs), its tokenizer and shards. "
        "Steps whose outputs exist are skipped.",
    )
    p.add_argument("--out-dir", type=Path, default=DEFAULT_DATA_DIR)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--samples-per-shard", type=int, default=128)
    p.add_argument("--val-fraction", type=float, default=0.05)

    def work(a: argparse.Namespace) -> None:
        corpus, model, shards = a.out_dir / "corpus.jsonl", a.out_dir / "tokenizer.model", a.out_dir / "shards"
        if not corpus.exists():
            docs, chars = write_default_corpus(corpus)
            print(f"wrote {corpus}: {docs} documents, {chars / 1e6:.1f}M characters")
        if not model.exists():
            train_tokenizer(iter_documents([corpus]), model, vocab_size=a.vocab_size)
            print(f"wrote {model} (bpe, vocab {a.vocab_size})")
        if (shards / INDEX_NAME).exists() and not _has_checksums(json.loads((shards / INDEX_NAME).read_text())):
            shutil.rmtree(shards)  # written by an earlier version, without shard checksums
        if not (shards / INDEX_NAME).exists():
            start = time.perf_counter()
            index = write_shards(
                iter_documents([corpus]),
                model,
                shards,
                seq_len=a.seq_len,
                samples_per_shard=a.samples_per_shard,
                val_fraction=a.val_fraction,
            )
            _summary(index, shards, time.perf_counter() - start)
        else:
            index = json.loads((shards / INDEX_NAME).read_text())
            print(f"{shards / INDEX_NAME} exists: {index['splits']['train']['tokens']} train tokens")

    return _run(p, work, argv)


if __name__ == "__main__":
    sys.exit(prepare_default_data_main())
