"""webdataset shards of fixed-length packed token sequences, and their JSON index.

Documents are tokenized (in parallel), joined with EOS after each document and cut into
samples of ``seq_len + 1`` tokens (inputs = sample[:-1], targets = sample[1:]); the last
partial sample of each split is dropped and counted. A document goes to the validation
split when a hash of its text falls under ``val_fraction`` (so duplicates share a split).

Layout of ``out_dir``::

    index.json                 format, seq_len, dtype, eos_id, vocab_size, tokenizer sha256,
                               and per split: shards [{name, samples, tokens, sha256}], totals
    train-000000.tar ...       members <key>.tokens.npy, key = 10-digit sample number
    val-000000.tar ...

Every file is written under a temporary name and renamed when complete; index.json last.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import webdataset as wds

from sessa_train.data.tokenizer import Tokenizer
from sessa_train.errors import DataError
from sessa_train.files import file_sha256, replace_durably

INDEX_NAME = "index.json"
FORMAT = "sessa-packed-tokens-v1"
SPLITS = ("train", "val")


TAR_BLOCK = 512
TAR_RECORD = 20 * TAR_BLOCK  # tarfile pads an archive to whole records


def tar_file_size(members_bytes: int) -> int:
    """Size of a tar file whose members take ``members_bytes`` (plus the 2-block end marker)."""
    return -(-(members_bytes + 2 * TAR_BLOCK) // TAR_RECORD) * TAR_RECORD


class ShardError(DataError):
    """A shard, index or tokenizer that does not match what the index promises."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def is_validation(text: str, val_fraction: float) -> bool:
    bucket = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
    return bucket / 2**64 < val_fraction


_WORKER_TOKENIZER: Tokenizer | None = None


def _init_worker(model_path: str) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = Tokenizer(model_path)


def _encode_batch(task: tuple[list[str], float]) -> list[tuple[bool, np.ndarray]]:
    """(documents, val_fraction) -> [(goes to validation, token ids + EOS)] in order."""
    docs, val_fraction = task
    assert _WORKER_TOKENIZER is not None
    eos = _WORKER_TOKENIZER.eos_id
    encoded = _WORKER_TOKENIZER.sp.encode(docs)
    return [
        (is_validation(d, val_fraction), np.array([*ids, eos], dtype=np.int64))
        for d, ids in zip(docs, encoded, strict=True)
    ]


@dataclass
class _SplitWriter:
    """Packs token streams of one split into samples and rotates shard files."""

    out_dir: Path
    split: str
    sample_tokens: int
    dtype: np.dtype
    samples_per_shard: int | None
    shard_bytes: int | None
    shards: list[dict] = field(default_factory=list)
    _buffer: list[np.ndarray] = field(default_factory=list)
    _buffered: int = 0
    _samples: int = 0
    _writer: wds.TarWriter | None = None
    _fh: io.BufferedWriter | None = None
    _shard_samples: int = 0
    _shard_size: int = 0

    def add(self, tokens: np.ndarray) -> None:
        self._buffer.append(tokens)
        self._buffered += len(tokens)
        if self._buffered < self.sample_tokens:
            return
        flat = np.concatenate(self._buffer)
        n = len(flat) // self.sample_tokens
        for row in flat[: n * self.sample_tokens].reshape(n, self.sample_tokens):
            self._write_sample(row)
        rest = flat[n * self.sample_tokens :]
        self._buffer, self._buffered = [rest], len(rest)

    def _write_sample(self, row: np.ndarray) -> None:
        payload = io.BytesIO()
        np.save(payload, row.astype(self.dtype), allow_pickle=False)
        data = payload.getvalue()
        member = TAR_BLOCK + -(-len(data) // TAR_BLOCK) * TAR_BLOCK  # header + data padded to blocks
        full = (self.samples_per_shard and self._shard_samples >= self.samples_per_shard) or (
            self.shard_bytes and self._shard_samples and tar_file_size(self._shard_size + member) > self.shard_bytes
        )
        if self._writer is None or full:
            self._close_shard()
            self._open_shard()
        assert self._writer is not None
        self._writer.write({"__key__": f"{self._samples:010d}", "tokens.npy": data})
        self._samples += 1
        self._shard_samples += 1
        self._shard_size += member

    def _open_shard(self) -> None:
        name = f"{self.split}-{len(self.shards):06d}.tar"
        self._fh = open(self.out_dir / (name + ".tmp"), "wb")  # noqa: SIM115 (closed in _close_shard)
        self._writer = wds.TarWriter(self._fh, encoder=False, mtime=0)
        self.shards.append({"name": name, "samples": 0, "tokens": 0})
        self._shard_samples = self._shard_size = 0

    def _close_shard(self) -> None:
        if self._writer is None:
            return
        self._writer.close()  # also closes the file
        entry = self.shards[-1]
        entry["samples"], entry["tokens"] = self._shard_samples, self._shard_samples * self.sample_tokens
        entry["sha256"] = file_sha256(self.out_dir / (entry["name"] + ".tmp"))  # verified when read
        os.replace(self.out_dir / (entry["name"] + ".tmp"), self.out_dir / entry["name"])
        self._writer = self._fh = None

    def finish(self) -> dict:
        self._close_shard()
        return {
            "shards": self.shards,
            "samples": sum(s["samples"] for s in self.shards),
            "tokens": sum(s["tokens"] for s in self.shards),
            "dropped_tokens": self._buffered,
        }


def write_shards(
    documents: Iterable[str],
    tokenizer_path: str | Path,
    out_dir: str | Path,
    *,
    seq_len: int,
    samples_per_shard: int | None = None,
    shard_bytes: int | None = None,
    val_fraction: float = 0.0,
    num_workers: int | None = None,
    docs_per_task: int = 64,
    progress: bool = False,
) -> dict:
    """Tokenize ``documents`` and write train/val shards plus ``index.json``; returns the index."""
    if seq_len < 1:
        raise DataError(f"seq_len must be >= 1, got {seq_len}")
    if (samples_per_shard is None) == (shard_bytes is None):
        raise DataError("give exactly one of samples_per_shard or shard_bytes")
    if samples_per_shard is not None and samples_per_shard < 1:
        raise DataError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if shard_bytes is not None and shard_bytes < TAR_RECORD:
        raise DataError(f"shard_bytes must be >= {TAR_RECORD} (one tar record), got {shard_bytes}")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    tokenizer = Tokenizer(tokenizer_path)
    out = _empty_output(out_dir)
    dtype = token_dtype(tokenizer.vocab_size)
    writers = {split: _SplitWriter(out, split, seq_len + 1, dtype, samples_per_shard, shard_bytes) for split in SPLITS}

    def tasks() -> Iterator[tuple[list[str], float]]:
        batch: list[str] = []
        for doc in documents:
            batch.append(doc)
            if len(batch) == docs_per_task:
                yield batch, val_fraction
                batch = []
        if batch:
            yield batch, val_fraction

    from tqdm import tqdm

    n_docs = {split: 0 for split in SPLITS}
    workers = num_workers or os.cpu_count() or 1
    with (
        Pool(workers, initializer=_init_worker, initargs=(str(tokenizer.path),)) as pool,
        tqdm(unit="doc", desc=f"tokenizing ({workers} workers)", disable=not progress, mininterval=0.5) as bar,
    ):
        # imap keeps the input order, so the shards do not depend on the number of workers
        for encoded in pool.imap(_encode_batch, tasks(), chunksize=1):
            for to_val, tokens in encoded:
                split = "val" if to_val else "train"
                writers[split].add(tokens)
                n_docs[split] += 1
            bar.update(len(encoded))
    splits = {split: {"documents": n_docs[split], **writers[split].finish()} for split in SPLITS}
    tok = {"eos_id": tokenizer.eos_id, "vocab_size": tokenizer.vocab_size}
    tok |= {"tokenizer_sha256": tokenizer.sha256, "tokenizer_file": tokenizer.path.name}
    return _write_index(out, seq_len, dtype, tok, splits)


def _empty_output(out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if (out / INDEX_NAME).exists():
        raise DataError(f"{out / INDEX_NAME} already exists: choose an empty output directory")
    return out


def _write_index(out: Path, seq_len: int, dtype: np.dtype, tokenizer: dict, splits: dict) -> dict:
    """Write ``index.json`` last, atomically: the folder is complete once it exists."""
    index = {"format": FORMAT, "seq_len": seq_len, "sample_tokens": seq_len + 1, "dtype": dtype.name}
    index |= {**tokenizer, "splits": splits}
    tmp = out / (INDEX_NAME + ".tmp")
    tmp.write_text(json.dumps(index, indent=1))
    replace_durably(tmp, out / INDEX_NAME)
    return index


def write_sample_shards(
    splits: dict[str, Iterable[np.ndarray]],
    out_dir: str | Path,
    *,
    seq_len: int,
    vocab_size: int,
    eos_id: int,
    samples_per_shard: int,
) -> dict:
    """Write ready-made samples of exactly seq_len + 1 token ids (synthetic data, no tokenizer)
    as train/val shards plus ``index.json``, in the format ``write_shards`` produces."""
    out = _empty_output(out_dir)
    dtype = token_dtype(vocab_size)
    written = {}
    for split in SPLITS:
        writer = _SplitWriter(out, split, seq_len + 1, dtype, samples_per_shard, None)
        n = 0
        for row in splits.get(split, ()):
            if row.shape != (seq_len + 1,) or row.min() < 0 or row.max() >= vocab_size:
                raise DataError(f"{split} sample {n}: need {seq_len + 1} ids in [0, {vocab_size}), got {row}")
            writer.add(row)
            n += 1
        written[split] = {"documents": n, **writer.finish()}
    tok = {"eos_id": eos_id, "vocab_size": vocab_size, "tokenizer_sha256": None, "tokenizer_file": None}
    return _write_index(out, seq_len, dtype, tok, written)


def load_index(data_dir: str | Path, tokenizer_path: str | Path | None = None) -> dict:
    """Read and check ``index.json``: format, every listed shard present with consistent counts,
    tokenizer checksum."""
    path = Path(data_dir) / INDEX_NAME
    if not path.is_file():
        raise ShardError(f"no {INDEX_NAME} in {data_dir}: write shards with tools/write_shards.py first")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ShardError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if index.get("format") != FORMAT:
        raise ShardError(f"{path}: format {index.get('format')!r} is not {FORMAT!r}")
    for name, split in index["splits"].items():
        for shard in split["shards"]:
            if not (Path(data_dir) / shard["name"]).is_file():
                raise ShardError(f"shard listed in {path} is missing: {Path(data_dir) / shard['name']}")
            if shard["tokens"] != shard["samples"] * index["sample_tokens"]:
                raise ShardError(
                    f"{path}: {shard['name']} has tokens={shard['tokens']}, but {shard['samples']} samples of "
                    f"{index['sample_tokens']} tokens make {shard['samples'] * index['sample_tokens']}"
                )
        for key in ("samples", "tokens"):
            if split[key] != sum(s[key] for s in split["shards"]):
                raise ShardError(f"{path}: split {name!r} has {key}={split[key]}, its shards sum to "
                                 f"{sum(s[key] for s in split['shards'])}")  # fmt: skip
    if tokenizer_path is not None:
        sha = Tokenizer(tokenizer_path).sha256
        if sha != index["tokenizer_sha256"]:
            raise ShardError(
                f"tokenizer {tokenizer_path} (sha256 {sha[:12]}...) does not match the one the shards in "
                f"{data_dir} were written with (sha256 {str(index['tokenizer_sha256'])[:12]}...)"
            )
    return index


def find_tokenizer(data_dir: str | Path, index: dict, given: str | Path | None) -> Path | None:
    """The tokenizer the shards were written with: ``given`` (checked by ``load_index``), else
    the index's ``tokenizer_file`` in the shard folder or its parent when its checksum matches."""
    if given is not None:
        return Path(given).resolve()
    if not index.get("tokenizer_file"):
        return None
    for folder in (Path(data_dir), Path(data_dir).parent):
        candidate = folder / index["tokenizer_file"]
        if candidate.is_file() and file_sha256(candidate) == index["tokenizer_sha256"]:
            return candidate.resolve()
    return None


def read_shard(path: str | Path, entry: dict, sample_tokens: int, dtype: str, vocab_size: int) -> list[np.ndarray]:
    """All samples of one shard, in file order, checked against its index ``entry`` (sha256 of the
    file, sample count) and every token against the vocabulary. ShardError names a damaged file;
    DataError an intact file (its checksum matches) that index.json miscounts."""
    if entry.get("sha256") and (found := file_sha256(path)) != entry["sha256"]:
        raise ShardError(f"{path}: checksum {found[:12]}... differs from index.json's {entry['sha256'][:12]}...")
    samples = []
    try:
        stream = wds.WebDataset(
            str(path), shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False
        )
        for sample in stream:
            tokens = np.load(io.BytesIO(sample["tokens.npy"]), allow_pickle=False)
            if tokens.shape != (sample_tokens,) or tokens.dtype != np.dtype(dtype):
                raise ShardError(
                    f"{path}: sample {sample['__key__']} has {tokens.dtype} {tokens.shape}, "
                    f"index says {dtype} ({sample_tokens},)"
                )
            if tokens.max() >= vocab_size:
                raise ShardError(
                    f"{path}: sample {sample['__key__']} holds token {tokens.max()} >= vocab_size {vocab_size}"
                )
            samples.append(tokens)
    except ShardError:
        raise
    except Exception as e:  # tarfile.ReadError, KeyError, ValueError from np.load, ...
        raise ShardError(f"{path}: unreadable shard ({type(e).__name__}: {e})") from None
    if len(samples) != entry["samples"]:
        if entry.get("sha256"):
            raise DataError(
                f"{Path(path).parent / INDEX_NAME} says {Path(path).name} holds samples={entry['samples']}, the shard "
                f"(its checksum matches) holds {len(samples)}: the index was edited or written for other shards"
            )
        raise ShardError(f"{path}: {len(samples)} samples, index.json says {entry['samples']} (truncated?)")
    return samples
