"""Command-line entry points of the data pipeline (console scripts and tools/ wrappers).

    sessa-train-tokenizer --input docs.parquet --model tok.model [--kind hf-bpe --model tok.json]
    sessa-write-shards --input corpus/ --tokenizer tok.model --out shards [--part 2/4] [--merge]
    sessa-prepare-default-data

Inputs are files (.txt .md .jsonl .jsonl.gz .jsonl.zst .parquet), datasets folders
(``datasets.save_to_disk``), folders of those, or s3:// and https:// URLs of files
(``data/documents.py``). Arguments are parsed before torch or the data libraries are imported,
so --help answers at once. Bad input ends with one line on stderr (``error: ...``) and exit
status 2; a failed run leaves no half-written output folder.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from sessa_train.errors import SessaError, argument_parser, user_error

DEFAULT_DATA_DIR = Path("data/default")
INPUT_HELP = (
    "files (.txt .md .jsonl .jsonl.gz .jsonl.zst .parquet), datasets folders (save_to_disk), folders of those, "
    "or s3:// / https:// URLs"
)


def _run(parser: argparse.ArgumentParser, work: Callable[[argparse.Namespace], None], argv: list[str] | None) -> int:
    args = parser.parse_args(argv)
    try:
        work(args)
    except SessaError as e:
        return user_error(parser.prog, e)
    return 0


def _at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def _part(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected i/n, e.g. 2/4") from None
    if not 1 <= i <= n:
        raise argparse.ArgumentTypeError(f"{text!r}: need 1 <= i <= n")
    return i, n


def train_tokenizer_main(argv: list[str] | None = None) -> int:
    p = argument_parser(prog="sessa-train-tokenizer", description="Train a tokenizer on a corpus.")
    p.add_argument("--input", nargs="+", required=True, help=INPUT_HELP)
    p.add_argument("--text-key", default="text", help="JSONL field / parquet or datasets column holding the text")
    p.add_argument("--model", type=Path, required=True, help="output path: .model (sentencepiece) or .json (hf-bpe)")
    p.add_argument("--kind", choices=["sentencepiece", "hf-bpe"], default="sentencepiece",
                   help="sentencepiece, or a Hugging Face byte-level BPE (tokenizer.json)")  # fmt: skip
    p.add_argument("--vocab-size", type=_at_least(2), default=8192)
    p.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe", help="sentencepiece's")
    p.add_argument("--no-byte-fallback", action="store_true")
    p.add_argument("--max-sentences", type=_at_least(1), default=2_000_000, help="lines sampled (sentencepiece)")

    def work(a: argparse.Namespace) -> None:
        from sessa_train.data.documents import DocumentStream, expand_inputs
        from sessa_train.data.tokenizer import train_tokenizer

        start = time.perf_counter()
        path = train_tokenizer(
            DocumentStream(expand_inputs(a.input), a.text_key),
            a.model,
            vocab_size=a.vocab_size,
            model_type=a.model_type,
            byte_fallback=not a.no_byte_fallback,
            max_sentences=a.max_sentences,
            kind=a.kind,
        )
        print(f"wrote {path} ({a.kind}, vocab {a.vocab_size}) in {time.perf_counter() - start:.1f}s")

    return _run(p, work, argv)


def write_shards_main(argv: list[str] | None = None) -> int:
    p = argument_parser(prog="sessa-write-shards", description="Tokenize a corpus into webdataset shards.")
    p.add_argument("--input", nargs="+", help=INPUT_HELP)
    p.add_argument("--text-key", default="text", help="JSONL field / parquet or datasets column holding the text")
    p.add_argument("--tokenizer", type=Path, help="sentencepiece .model or Hugging Face tokenizer.json")
    p.add_argument("--out", type=Path, required=True, help="output directory (must not hold an index.json)")
    p.add_argument("--seq-len", type=_at_least(1), default=1024, help="tokens per training sequence (samples hold +1)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--samples-per-shard", type=_at_least(1), help="rotate shards by sample count (default 1024)")
    size.add_argument("--shard-bytes", type=_at_least(10240), help="rotate shards by size in bytes (>= one tar record)")
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of documents for validation")
    p.add_argument("--workers", type=_at_least(1), default=None, help="tokenizer processes (default: all cores)")
    p.add_argument("--part", type=_part, help="i/n: this job tokenizes part i of n of the inputs (then --merge)")
    p.add_argument("--merge", action="store_true", help="pack the n finished parts in --out into its shards")
    p.add_argument("--no-progress", action="store_true")

    def work(a: argparse.Namespace) -> None:
        from sessa_train.data import shards
        from sessa_train.data.documents import DocumentStream, expand_inputs

        start = time.perf_counter()
        if a.merge:
            if a.input or a.part:
                raise SessaError("--merge takes --out only (the parts hold their settings)")
            _summary(shards.merge_parts(a.out, progress=not a.no_progress), a.out, time.perf_counter() - start)
            return
        if not a.input or a.tokenizer is None:
            raise SessaError("give --input and --tokenizer (or --merge)")
        settings = {
            "seq_len": a.seq_len,
            "samples_per_shard": None if a.shard_bytes is not None else a.samples_per_shard or 1024,
            "shard_bytes": a.shard_bytes,
            "val_fraction": a.val_fraction,
            "num_workers": a.workers,
            "progress": not a.no_progress,
        }
        if a.part:
            stream = DocumentStream.part(a.input, a.text_key, *a.part)
            record = shards.write_part(stream, a.tokenizer, a.out, a.part, **settings)
            counts = ", ".join(
                f"{s}: {v['documents']} documents, {v['tokens']} tokens" for s, v in record["splits"].items()
            )
            print(f"wrote part {a.part[0]}/{a.part[1]} ({counts}) into {shards.part_folder(a.out, *a.part)}")
            return
        index = shards.write_shards(DocumentStream(expand_inputs(a.input), a.text_key), a.tokenizer, a.out, **settings)
        _summary(index, a.out, time.perf_counter() - start)

    return _run(p, work, argv)


def _summary(index: dict, out: Path, seconds: float) -> None:
    for split, info in index["splits"].items():
        print(
            f"{split}: {info['documents']} documents -> {info['samples']} samples of {index['sample_tokens']} "
            f"tokens in {len(info['shards'])} shards ({info['dropped_tokens']} tail tokens dropped)"
        )
    total = sum(info["tokens"] for info in index["splits"].values())
    print(f"wrote {out / 'index.json'}: {total} tokens in {seconds:.1f}s ({total / max(seconds, 1e-9):,.0f} tokens/s)")


def _has_checksums(index: dict) -> bool:
    return all("sha256" in shard for split in index["splits"].values() for shard in split["shards"])


def prepare_default_data_main(argv: list[str] | None = None) -> int:
    p = argument_parser(
        prog="sessa-prepare-default-data",
        description="Build the offline default corpus (Python stdlib docs), its tokenizer, shards and a local "
        "evaluation task. Steps whose outputs exist are skipped.",
    )
    p.add_argument("--out-dir", type=Path, default=DEFAULT_DATA_DIR)
    p.add_argument("--vocab-size", type=_at_least(260), default=4096)
    p.add_argument("--seq-len", type=_at_least(1), default=256)
    p.add_argument("--samples-per-shard", type=_at_least(1), default=128)
    p.add_argument("--val-fraction", type=float, default=0.05)

    def work(a: argparse.Namespace) -> None:
        from sessa_train.data.default_corpus import write_default_corpus
        from sessa_train.data.documents import iter_documents
        from sessa_train.data.shards import INDEX_NAME, write_shards
        from sessa_train.data.tokenizer import train_tokenizer

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
        if not (a.out_dir / "eval" / "default_cloze.yaml").exists():
            from sessa_train.data.default_corpus import write_cloze_task

            task = write_cloze_task(corpus, a.out_dir / "eval", a.val_fraction)
            print(f"wrote {task}: a local lm-eval task (sessa-eval --tasks {task})")

    return _run(p, work, argv)


if __name__ == "__main__":
    sys.exit(prepare_default_data_main())
