"""webdataset shards of fixed-length packed token sequences, and their JSON index.

Documents are tokenized (in parallel), joined with EOS after each document and cut into
samples of ``seq_len + 1`` tokens (inputs = sample[:-1], targets = sample[1:]); the last
partial sample of each split is dropped and counted. A document goes to the validation
split when a hash of its text falls under ``val_fraction`` (so duplicates share a split).

Layout of ``out_dir``::

    index.json                 format, seq_len, dtype, eos_id, vocab_size, tokenizer sha256,
                               and per split: shards [{name, samples, tokens, sha256}], totals
    <tokenizer file>           the tokenizer the shards were written with (index.json names it):
                               copied with the shards, a run finds it there without data.tokenizer
    train-000000.tar ...       members <key>.tokens.npy, key = 10-digit sample number
    val-000000.tar ...         (and <key>.targets.npy where index.json has "scored": true)

Scored samples (synthetic tasks, ``write_sample_shards(..., scored=True)``): each sample also
holds its own targets, int32 aligned with the tokens: targets[j + 1] is what the prediction made at
position j is scored against, -1 where it is not scored (targets[0] is always -1). A task whose
answers must not appear in the input (Zoology's MQAR: the recalled value is a label only) and a
loss over some tokens only (Megatron-LM's ``loss_mask``) both take this form. The loader hands
them to the trainer as ``targets`` and ``loss_mask`` (B, seq_len).

The folder is written as ``<out_dir>.partial`` and renamed into place when index.json is in it:
a failed run leaves no half-written output. Several jobs over parts of one corpus (one per node:
``write_part``) each tokenize their share of the inputs into ``<out_dir>/parts/part-i-of-n/`` (the
token streams of each split, in document order); ``merge_parts`` packs the parts' streams in part
order into the shards, exactly what one job over all the inputs writes (same samples, same order,
same files). The index and shards are read through ``storage.Storage``: a local folder or a URL.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import shutil
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import webdataset as wds

from sessa_train.data.storage import Storage, is_remote, local_or_url
from sessa_train.data.tokenizer import Tokenizer
from sessa_train.errors import DataError
from sessa_train.files import RunLock, file_sha256, readable_by_group, replace_durably

INDEX_NAME = "index.json"
FORMAT = "sessa-packed-tokens-v1"
PART_FORMAT = "sessa-token-part-v1"
SPLITS = ("train", "val")
INDEX_KEYS = ("seq_len", "sample_tokens", "dtype", "eos_id", "vocab_size", "tokenizer_sha256", "splits")

TAR_BLOCK = 512
TAR_RECORD = 20 * TAR_BLOCK  # tarfile pads an archive to whole records
IN_FLIGHT = 4  # tokenizer tasks read ahead per worker process
MERGE_TOKENS = 1 << 22  # tokens of a part read at a time by the merge (bounded memory)


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
    encoded = _WORKER_TOKENIZER.encode_batch(docs)
    return [
        (is_validation(d, val_fraction), np.array([*ids, eos], dtype=np.int64))
        for d, ids in zip(docs, encoded, strict=True)
    ]


def _npy(array: np.ndarray) -> bytes:
    payload = io.BytesIO()
    np.save(payload, array, allow_pickle=False)
    return payload.getvalue()


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
        """Tokens of a document (packed across samples)."""
        self._buffer.append(tokens)
        self._buffered += len(tokens)
        if self._buffered < self.sample_tokens:
            return
        flat = np.concatenate(self._buffer)
        n = len(flat) // self.sample_tokens
        for row in flat[: n * self.sample_tokens].reshape(n, self.sample_tokens):
            self.write_sample(row)
        rest = flat[n * self.sample_tokens :]
        self._buffer, self._buffered = [rest], len(rest)

    def write_sample(self, row: np.ndarray, targets: np.ndarray | None = None) -> None:
        """One sample of ``sample_tokens`` ids (and of a scored set its targets)."""
        members = {"tokens.npy": _npy(row.astype(self.dtype))}
        if targets is not None:
            members["targets.npy"] = _npy(targets.astype(np.int32))
        member = sum(TAR_BLOCK + -(-len(d) // TAR_BLOCK) * TAR_BLOCK for d in members.values())  # header + data
        full = (self.samples_per_shard and self._shard_samples >= self.samples_per_shard) or (
            self.shard_bytes and self._shard_samples and tar_file_size(self._shard_size + member) > self.shard_bytes
        )
        if self._writer is None or full:
            self._close_shard()
            self._open_shard()
        assert self._writer is not None
        self._writer.write({"__key__": f"{self._samples:010d}", **members})
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

    def abandon(self) -> None:
        """Close an open shard without publishing it (the run failed)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = self._fh = None

    def finish(self) -> dict:
        self._close_shard()
        return {
            "shards": self.shards,
            "samples": sum(s["samples"] for s in self.shards),
            "tokens": sum(s["tokens"] for s in self.shards),
            "dropped_tokens": self._buffered,
        }


def _check_shard_sizes(seq_len: int, samples_per_shard: int | None, shard_bytes: int | None) -> None:
    if seq_len < 1:
        raise DataError(f"seq_len must be >= 1, got {seq_len}")
    if (samples_per_shard is None) == (shard_bytes is None):
        raise DataError("give exactly one of samples_per_shard or shard_bytes")
    if samples_per_shard is not None and samples_per_shard < 1:
        raise DataError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if shard_bytes is not None and shard_bytes < TAR_RECORD:
        raise DataError(f"shard_bytes must be >= {TAR_RECORD} (one tar record), got {shard_bytes}")


def _encoded(
    documents: Iterable[str], tokenizer: Tokenizer, val_fraction: float, num_workers: int | None, docs_per_task: int
) -> Iterator[tuple[str, np.ndarray]]:
    """(split, token ids + EOS) of every document in order, tokenized by ``num_workers`` processes."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if num_workers is not None and num_workers < 1:
        raise DataError(f"workers must be >= 1, got {num_workers}")

    def tasks() -> Iterator[tuple[list[str], float]]:
        batch: list[str] = []
        for doc in documents:
            batch.append(doc)
            if len(batch) == docs_per_task:
                yield batch, val_fraction
                batch = []
        if batch:
            yield batch, val_fraction

    workers = num_workers or os.cpu_count() or 1
    with Pool(workers, initializer=_init_worker, initargs=(str(tokenizer.path),)) as pool:
        # results are taken in submission order, so the shards do not depend on the number of
        # workers; at most IN_FLIGHT tasks a worker are read ahead (Pool.imap would read the
        # whole input into its queue when tokenizing is slower than reading)
        pending: deque = deque()
        for task in itertools.chain(tasks(), [None]):
            if task is not None:
                pending.append(pool.apply_async(_encode_batch, (task,)))
            while pending and (task is None or len(pending) > IN_FLIGHT * workers):
                for to_val, tokens in pending.popleft().get():
                    yield ("val" if to_val else "train"), tokens


def _progress(documents, enabled: bool, workers: int):
    """A tqdm bar over the input: in bytes with a total (and an ETA) when the input knows its size."""
    from tqdm import tqdm

    size = getattr(documents, "size", None)
    bar = tqdm(
        total=size, unit="B" if size else "doc", unit_scale=bool(size), disable=not enabled, mininterval=0.5,
        desc=f"tokenizing ({workers} workers)",
    )  # fmt: skip
    if size and hasattr(documents, "on_progress"):
        documents.on_progress = bar.update
    return bar


class _Output:
    """A folder written as ``<out>.partial`` and moved into place by ``publish``; removed on failure.

    One writer per output: ``<out>.lock`` (``files.RunLock``) is held from ``__enter__`` to the
    end, so a second job into the same ``--out`` is refused before it touches anything. ``keep``:
    entries of ``out`` that the finished folder takes along (the merge's ``parts``); anything else
    in ``out`` is refused up front, so a refusal changes nothing."""

    def __init__(self, out_dir: str | Path, keep: Iterable[str] = ()) -> None:
        self.out = Path(out_dir)
        self.keep = tuple(keep)
        if (self.out / INDEX_NAME).exists():
            raise DataError(f"{self.out / INDEX_NAME} already exists: choose an empty output directory")
        if self.out.exists() and not self.out.is_dir():
            raise DataError(f"--out {self.out} is a file, not a folder")
        if self.out.is_dir() and (other := sorted(p.name for p in self.out.iterdir() if p.name not in self.keep)):
            raise DataError(f"--out {self.out} is not empty (it holds {', '.join(other[:3])}): choose an empty "
                            "output directory")  # fmt: skip
        self.partial = self.out.with_name(self.out.name + ".partial")
        self.lock = RunLock(self.out.parent, self.out.name + ".lock", what="sessa-write-shards", subject=self.out)
        self.moved: list[str] = []

    def __enter__(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        if (owner := self.lock.acquire()) is not None:
            raise DataError(owner)
        shutil.rmtree(self.partial, ignore_errors=True)
        self.partial.mkdir(parents=True)
        return self.partial

    def __exit__(self, kind, value, traceback) -> None:
        try:
            if kind is not None:
                for name in self.moved:  # what ``publish`` had moved goes back
                    os.replace(self.partial / name, self.out / name)
                shutil.rmtree(self.partial, ignore_errors=True)
        finally:
            self.lock.release()

    def publish(self) -> None:
        """Move the finished folder into place, with the entries of ``out`` named by ``keep``."""
        if self.out.exists():
            for name in self.keep:
                if (self.out / name).exists():
                    os.replace(self.out / name, self.partial / name)
                    self.moved.append(name)
            if any(self.out.iterdir()):
                raise DataError(f"--out {self.out} is not empty: choose an empty output directory")
            self.out.rmdir()
        readable_by_group(self.partial)
        os.replace(self.partial, self.out)
        self.moved = []


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
    _check_shard_sizes(seq_len, samples_per_shard, shard_bytes)
    tokenizer = Tokenizer(tokenizer_path)
    output = _Output(out_dir)
    with output as out:
        dtype = token_dtype(tokenizer.vocab_size)
        writers = {s: _SplitWriter(out, s, seq_len + 1, dtype, samples_per_shard, shard_bytes) for s in SPLITS}
        n_docs = dict.fromkeys(SPLITS, 0)
        try:
            with _progress(documents, progress, num_workers or os.cpu_count() or 1) as bar:
                for split, tokens in _encoded(documents, tokenizer, val_fraction, num_workers, docs_per_task):
                    writers[split].add(tokens)
                    n_docs[split] += 1
                    if not getattr(documents, "size", None):
                        bar.update(1)
        except BaseException:
            for writer in writers.values():
                writer.abandon()
            raise
        splits = {split: {"documents": n_docs[split], **writers[split].finish()} for split in SPLITS}
        shutil.copyfile(tokenizer.path, out / tokenizer.path.name)  # the tokenizer travels with its shards
        index = _write_index(out, seq_len, dtype, _tokenizer_record(tokenizer), splits)
        output.publish()
    return index


def _tokenizer_record(tokenizer: Tokenizer) -> dict:
    return {
        "eos_id": tokenizer.eos_id,
        "vocab_size": tokenizer.vocab_size,
        "tokenizer_sha256": tokenizer.sha256,
        "tokenizer_file": tokenizer.path.name,
    }


def _write_index(out: Path, seq_len: int, dtype: np.dtype, tokenizer: dict, splits: dict, scored: bool = False) -> dict:
    """Write ``index.json`` last, atomically: the folder is complete once it exists."""
    index = {"format": FORMAT, "seq_len": seq_len, "sample_tokens": seq_len + 1, "dtype": dtype.name}
    index |= {**tokenizer, **({"scored": True} if scored else {}), "splits": splits}
    tmp = out / (INDEX_NAME + ".tmp")
    tmp.write_text(json.dumps(index, indent=1))
    replace_durably(tmp, out / INDEX_NAME)
    return index


# -- several jobs, one dataset ------------------------------------------------------------


def part_folder(out_dir: str | Path, part: int, parts: int) -> Path:
    return Path(out_dir) / "parts" / f"part-{part}-of-{parts}"


def write_part(
    documents: Iterable[str],
    tokenizer_path: str | Path,
    out_dir: str | Path,
    part: tuple[int, int],
    *,
    seq_len: int,
    samples_per_shard: int | None = None,
    shard_bytes: int | None = None,
    val_fraction: float = 0.0,
    num_workers: int | None = None,
    docs_per_task: int = 64,
    progress: bool = False,
) -> dict:
    """Tokenize part ``(i, n)`` of a corpus (``documents``: this part's share, in corpus order) into
    ``part_folder(out_dir, i, n)``: each split's token stream and a record with the settings that
    every part must share; ``merge_parts`` packs them once all n are written."""
    i, n = part
    _check_shard_sizes(seq_len, samples_per_shard, shard_bytes)
    tokenizer = Tokenizer(tokenizer_path)
    dtype = token_dtype(tokenizer.vocab_size)
    output = _Output(part_folder(out_dir, i, n))
    with output as folder:
        files = {s: open(folder / f"{s}.tokens", "wb") for s in SPLITS}  # noqa: SIM115 (closed below)
        counts = {s: {"documents": 0, "tokens": 0} for s in SPLITS}
        try:
            with _progress(documents, progress, num_workers or os.cpu_count() or 1) as bar:
                for split, tokens in _encoded(documents, tokenizer, val_fraction, num_workers, docs_per_task):
                    files[split].write(tokens.astype(dtype).tobytes())
                    counts[split]["documents"] += 1
                    counts[split]["tokens"] += len(tokens)
                    if not getattr(documents, "size", None):
                        bar.update(1)
        finally:
            for fh in files.values():
                fh.close()
        for split in SPLITS:  # what the merge checks each part's streams against
            counts[split]["sha256"] = file_sha256(folder / f"{split}.tokens")
        record = {"format": PART_FORMAT, "part": i, "parts": n, "seq_len": seq_len, "dtype": dtype.name}
        record |= {"samples_per_shard": samples_per_shard, "shard_bytes": shard_bytes, "val_fraction": val_fraction}
        record |= _tokenizer_record(tokenizer) | {"splits": counts}
        shutil.copyfile(tokenizer.path, folder / tokenizer.path.name)
        (folder / "part.json").write_text(json.dumps(record, indent=1))
        output.publish()
    return record


def _checked_part(folder: Path, record) -> dict:
    """A part's record, checked against its files before anything is merged: the keys and types
    the merge reads, each split's stream holding exactly its token count in the part's dtype, and
    (parts written since the record has them) each stream's sha256. DataError names the part."""
    where = folder / "part.json"
    ints = ("part", "parts", "seq_len")
    if not isinstance(record, dict) or record.get("format") != PART_FORMAT:
        raise DataError(f"{where}: not a part record (format is not {PART_FORMAT!r})")
    if bad := [k for k in ints if not isinstance(record.get(k), int) or isinstance(record.get(k), bool)]:
        raise DataError(f"{where}: {', '.join(bad)} must be integers, got {[record.get(k) for k in bad]}")
    if record.get("dtype") not in ("uint16", "uint32"):
        raise DataError(f"{where}: dtype {record.get('dtype')!r} is not uint16 or uint32")
    splits = record.get("splits")
    if not isinstance(splits, dict) or any(not isinstance(splits.get(s), dict) for s in SPLITS):
        raise DataError(f"{where}: splits must hold {' and '.join(SPLITS)} records")
    itemsize = np.dtype(record["dtype"]).itemsize
    for split in SPLITS:
        info, stream = splits[split], folder / f"{split}.tokens"
        tokens, documents = info.get("tokens"), info.get("documents")
        if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in (tokens, documents)):
            raise DataError(f"{where}: {split} tokens and documents must be counts, got {tokens!r}, {documents!r}")
        size = stream.stat().st_size if stream.is_file() else None
        if size != tokens * itemsize:
            raise DataError(
                f"{stream}: {size} bytes, part.json says {tokens} {record['dtype']} tokens ({tokens * itemsize} "
                "bytes): the part is incomplete or damaged; write it again"
            )
        if info.get("sha256") and file_sha256(stream) != info["sha256"]:
            raise DataError(f"{stream}: checksum differs from part.json's: the part is damaged; write it again")
    return record


def merge_parts(out_dir: str | Path, progress: bool = False) -> dict:
    """Pack the token streams of every part of ``out_dir/parts`` (all n, the same settings) into
    the shards and index of ``out_dir``, in part order; the parts are removed once it is complete."""
    from tqdm import tqdm

    out = Path(out_dir)
    records = []
    for folder in (
        sorted(p for p in (out / "parts").glob("part-*-of-*") if p.is_dir()) if (out / "parts").is_dir() else []
    ):
        try:
            record = json.loads((folder / "part.json").read_text())
        except (OSError, ValueError):
            raise DataError(f"{folder} is not a finished part (no readable part.json)") from None
        records.append((folder, _checked_part(folder, record)))
    if not records:
        raise DataError(f"no parts under {out / 'parts'}: run sessa-write-shards --part i/n first")
    n = records[0][1]["parts"]
    shared = ("parts", "seq_len", "dtype", "samples_per_shard", "shard_bytes", "val_fraction", "tokenizer_sha256")
    for folder, r in records:
        if differ := [k for k in shared if r.get(k) != records[0][1].get(k)]:
            raise DataError(f"{folder} was written with other {', '.join(differ)} than {records[0][0]}")
    found = {r["part"] for _, r in records}
    if missing := sorted(set(range(1, n + 1)) - found):
        raise DataError(f"parts {missing} of {n} are missing under {out / 'parts'}: run them before the merge")
    records.sort(key=lambda fr: fr[1]["part"])
    first = records[0][1]
    dtype = np.dtype(first["dtype"])
    per_shard, shard_bytes = first["samples_per_shard"], first["shard_bytes"]
    output = _Output(out, keep=["parts"])
    total = sum(r["splits"][s]["tokens"] for _, r in records for s in SPLITS)
    with output as target, tqdm(total=total, unit="tok", unit_scale=True, disable=not progress, desc="merging") as bar:
        writers = {s: _SplitWriter(target, s, first["seq_len"] + 1, dtype, per_shard, shard_bytes) for s in SPLITS}
        for folder, r in records:
            for split in SPLITS:
                tokens = (
                    np.memmap(folder / f"{split}.tokens", dtype=dtype, mode="r") if r["splits"][split]["tokens"] else []
                )
                for start in range(0, len(tokens), MERGE_TOKENS):
                    writers[split].add(np.asarray(tokens[start : start + MERGE_TOKENS], dtype=np.int64))
                    bar.update(min(MERGE_TOKENS, len(tokens) - start))
        splits = {
            s: {"documents": sum(r["splits"][s]["documents"] for _, r in records), **writers[s].finish()}
            for s in SPLITS
        }
        tok = {k: first[k] for k in ("eos_id", "vocab_size", "tokenizer_sha256", "tokenizer_file")}
        if plain_name(tok["tokenizer_file"]) and (records[0][0] / tok["tokenizer_file"]).is_file():
            shutil.copyfile(records[0][0] / tok["tokenizer_file"], target / tok["tokenizer_file"])
        index = _write_index(target, first["seq_len"], dtype, tok, splits)
        output.publish()
    shutil.rmtree(out / "parts")
    return index


def write_sample_shards(
    splits: dict[str, Iterable[np.ndarray] | Iterable[tuple[np.ndarray, np.ndarray]]],
    out_dir: str | Path,
    *,
    seq_len: int,
    vocab_size: int,
    eos_id: int,
    samples_per_shard: int,
    scored: bool = False,
) -> dict:
    """Write ready-made samples of exactly seq_len + 1 token ids (synthetic data, no tokenizer)
    as train/val shards plus ``index.json``, in the format ``write_shards`` produces. With
    ``scored`` every sample is a pair (tokens, targets): seq_len + 1 ids or -1 (not scored), the
    first -1, and the index says ``"scored": true``."""
    output = _Output(out_dir)
    with output as out:
        dtype = token_dtype(vocab_size)
        written = {}
        for split in SPLITS:
            writer = _SplitWriter(out, split, seq_len + 1, dtype, samples_per_shard, None)
            n = 0
            for item in splits.get(split, ()):
                row, targets = item if scored else (item, None)
                if row.shape != (seq_len + 1,) or row.min() < 0 or row.max() >= vocab_size:
                    raise DataError(f"{split} sample {n}: need {seq_len + 1} ids in [0, {vocab_size}), got {row}")
                if targets is not None and (
                    targets.shape != row.shape or targets[0] != -1 or targets.min() < -1 or targets.max() >= vocab_size
                ):
                    raise DataError(f"{split} sample {n}: need {seq_len + 1} targets in [0, {vocab_size}) or -1 "
                                    f"(not scored), the first -1, got {targets}")  # fmt: skip
                writer.write_sample(row, targets)
                n += 1
            written[split] = {"documents": n, **writer.finish()}
        tok = {"eos_id": eos_id, "vocab_size": vocab_size, "tokenizer_sha256": None, "tokenizer_file": None}
        index = _write_index(out, seq_len, dtype, tok, written, scored)
        output.publish()
    return index


# -- reading ------------------------------------------------------------------------------


def load_index(data_dir: str | Path, tokenizer_path: str | Path | None = None) -> dict:
    """Read and check ``index.json`` (a local folder or a URL prefix): format, keys, counts,
    every listed shard present, tokenizer checksum; ShardError names what is wrong."""
    return read_index(data_dir, tokenizer_path)[0]


def read_index(data_dir: str | Path, tokenizer_path: str | Path | None = None) -> tuple[dict, str]:
    """``load_index`` and the sha256 of the bytes it read (one read: what a checkpoint records as
    the data's identity is what was checked)."""
    storage = Storage(data_dir)
    where = storage.url(INDEX_NAME)
    if (data := storage.find(INDEX_NAME)) is None:
        raise ShardError(f"no {INDEX_NAME} in {data_dir}: write shards with sessa-write-shards first")
    try:
        index = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ShardError(f"{where}: not UTF-8 at byte {e.start} (damaged)") from None
    except json.JSONDecodeError as e:
        raise ShardError(f"{where}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ShardError(
            f"{where}: format {index.get('format') if isinstance(index, dict) else None!r} is not {FORMAT!r}"
        )
    if missing := [k for k in INDEX_KEYS if k not in index]:
        raise ShardError(f"{where} lacks {', '.join(missing)}: written by another tool, or damaged")
    _check_index_types(index, where)
    if index["sample_tokens"] != index["seq_len"] + 1:
        raise ShardError(
            f"{where}: sample_tokens={index['sample_tokens']} disagrees with seq_len={index['seq_len']} "
            f"(a sample holds seq_len + 1 tokens)"
        )
    try:
        for name, split in index["splits"].items():
            for shard in split["shards"]:
                if not plain_name(shard["name"]):
                    raise ShardError(f"{where}: shard name {shard['name']!r} is not a file name in {data_dir} "
                                     "(no folders, no '..'): the index is damaged or not ours")  # fmt: skip
                if shard["tokens"] != shard["samples"] * index["sample_tokens"]:
                    raise ShardError(
                        f"{where}: {shard['name']} has tokens={shard['tokens']}, but {shard['samples']} samples of "
                        f"{index['sample_tokens']} tokens make {shard['samples'] * index['sample_tokens']}"
                    )
            for key in ("samples", "tokens"):
                if split[key] != sum(s[key] for s in split["shards"]):
                    raise ShardError(f"{where}: split {name!r} has {key}={split[key]}, its shards sum to "
                                     f"{sum(s[key] for s in split['shards'])}")  # fmt: skip
    except (KeyError, TypeError, AttributeError) as e:
        raise ShardError(f"{where}: malformed split or shard entry ({type(e).__name__}: {e})") from None
    if not storage.remote:
        for split in index["splits"].values():
            for shard in split["shards"]:
                if not storage.exists(shard["name"]):
                    raise ShardError(f"shard listed in {where} is missing: {storage.url(shard['name'])}")
    if tokenizer_path is not None:
        sha = Tokenizer(tokenizer_path).sha256
        if sha != index["tokenizer_sha256"]:
            raise ShardError(
                f"tokenizer {tokenizer_path} (sha256 {sha[:12]}...) does not match the one the shards in "
                f"{data_dir} were written with (sha256 {str(index['tokenizer_sha256'])[:12]}...)"
            )
    return index, hashlib.sha256(data).hexdigest()


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_index_types(index: dict, where: str) -> None:
    """Every value index.json's readers use, of the type they use it as (ShardError names it)."""
    for key in ("seq_len", "sample_tokens", "vocab_size"):
        if not _count(index[key]) or index[key] == 0:
            raise ShardError(f"{where}: {key} must be a positive integer, got {index[key]!r}")
    if index["dtype"] not in ("uint16", "uint32"):
        raise ShardError(f"{where}: dtype {index['dtype']!r} is not uint16 or uint32")
    eos = index["eos_id"]
    if eos is not None and not (_count(eos) and eos < index["vocab_size"]):
        raise ShardError(f"{where}: eos_id must be null or an id below vocab_size {index['vocab_size']}, got {eos!r}")
    if not isinstance(index.get("scored", False), bool):
        raise ShardError(f"{where}: scored must be true or false, got {index['scored']!r}")
    if not isinstance(index["splits"], dict):
        raise ShardError(f"{where}: splits must map split names to their shards, got {type(index['splits']).__name__}")
    for name, split in index["splits"].items():
        if not isinstance(split, dict) or not isinstance(split.get("shards"), list):
            raise ShardError(f"{where}: split {name!r} must hold a list of shards")
        for key in ("samples", "tokens"):
            if not _count(split.get(key)):
                raise ShardError(f"{where}: split {name!r} {key} must be a count, got {split.get(key)!r}")
        for shard in split["shards"]:
            if not isinstance(shard, dict) or not isinstance(shard.get("name"), str):
                raise ShardError(f"{where}: split {name!r} has a shard entry without a name: {shard!r}"[:300])
            for key in ("samples", "tokens"):
                if not _count(shard.get(key)):
                    raise ShardError(f"{where}: {shard['name']} {key} must be a count, got {shard.get(key)!r}")
            if shard.get("sha256") is not None and not isinstance(shard["sha256"], str):
                raise ShardError(f"{where}: {shard['name']} sha256 must be a string, got {shard['sha256']!r}")


def plain_name(name) -> bool:
    """Whether ``name`` (read from data) names a file in its own folder: no folder part, no
    ``..``, not absolute, nothing a path or URL could resolve outside the folder."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
        and name == name.strip()
    )


def find_tokenizer(data_dir: str | Path, index: dict, given: str | Path | None) -> Path | None:
    """The tokenizer the shards were written with: ``given`` (checked by ``load_index``), else the
    index's ``tokenizer_file`` in the shard folder or its parent when its checksum matches (for a
    remote folder: fetched once into ``~/.cache/sessa-train/tokenizers/<sha256>/``)."""
    if given is not None:
        return Path(given).resolve()
    data_dir = local_or_url(data_dir)
    name, sha = index.get("tokenizer_file"), index.get("tokenizer_sha256")
    if not name:
        return None
    if not plain_name(name) or not (isinstance(sha, str) and len(sha) == 64 and set(sha) <= set("0123456789abcdef")):
        raise ShardError(f"{Storage(data_dir).url(INDEX_NAME)}: tokenizer_file {name!r} with sha256 {sha!r} is not "
                         "a plain file name and a sha256: the index is damaged or not ours")  # fmt: skip
    if is_remote(data_dir):
        cached = Path.home() / ".cache" / "sessa-train" / "tokenizers" / str(sha) / name
        if not cached.is_file():
            data = Storage(data_dir).find(name)
            if data is None or hashlib.sha256(data).hexdigest() != sha:
                return None
            cached.parent.mkdir(parents=True, exist_ok=True)
            cached.write_bytes(data)
        return cached
    for folder in (Path(data_dir), Path(data_dir).parent):
        candidate = folder / name
        if candidate.is_file() and file_sha256(candidate) == sha:
            return candidate.resolve()
    return None


def read_shard(
    storage: Storage,
    entry: dict,
    sample_tokens: int,
    dtype: str,
    vocab_size: int,
    read: Callable | None = None,
    scored: bool = False,
) -> list[np.ndarray]:
    """All samples of one shard, in file order, checked against its index ``entry`` (sha256 of the
    bytes received, sample count) and every token against the vocabulary. ShardError names a
    damaged file; DataError an intact file (its checksum matches) that index.json miscounts.
    A sample is its (sample_tokens,) ids; with ``scored`` (2, sample_tokens) int64: ids, targets."""
    where = storage.url(entry["name"])
    data = (read or storage.read)(entry["name"])
    if entry.get("sha256") and (found := hashlib.sha256(data).hexdigest()) != entry["sha256"]:
        raise ShardError(f"{where}: checksum {found[:12]}... differs from index.json's {entry['sha256'][:12]}...")
    samples = []
    try:
        members = wds.tariterators.tar_file_expander([{"url": where, "stream": io.BytesIO(data)}])
        for sample in wds.tariterators.group_by_keys(members):
            tokens = np.load(io.BytesIO(sample["tokens.npy"]), allow_pickle=False)
            if tokens.shape != (sample_tokens,) or tokens.dtype != np.dtype(dtype):
                raise ShardError(
                    f"{where}: sample {sample['__key__']} has {tokens.dtype} {tokens.shape}, "
                    f"index says {dtype} ({sample_tokens},)"
                )
            if tokens.max() >= vocab_size:
                raise ShardError(
                    f"{where}: sample {sample['__key__']} holds token {tokens.max()} >= vocab_size {vocab_size}"
                )
            if scored:
                targets = np.load(io.BytesIO(sample["targets.npy"]), allow_pickle=False)
                if targets.shape != tokens.shape or not -1 <= targets.min() <= targets.max() < vocab_size:
                    raise ShardError(f"{where}: sample {sample['__key__']} has targets {targets.dtype} "
                                     f"{targets.shape}, index says ({sample_tokens},) of -1 .. "
                                     f"{vocab_size - 1}")  # fmt: skip
                tokens = np.stack([tokens.astype(np.int64), targets.astype(np.int64)])
            samples.append(tokens)
    except ShardError:
        raise
    except Exception as e:  # tarfile.ReadError, KeyError, ValueError from np.load, ...
        raise ShardError(f"{where}: unreadable shard ({type(e).__name__}: {e})") from None
    if len(samples) != entry["samples"]:
        if entry.get("sha256"):
            raise DataError(
                f"{storage.url(INDEX_NAME)} says {entry['name']} holds samples={entry['samples']}, the shard "
                f"(its checksum matches) holds {len(samples)}: the index was edited or written for other shards"
            )
        raise ShardError(f"{where}: {len(samples)} samples, index.json says {entry['samples']} (truncated?)")
    return samples
