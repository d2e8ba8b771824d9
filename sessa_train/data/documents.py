"""Documents from the files a corpus comes in, streamed in bounded memory, in a stable order.

Inputs (files, folders searched recursively in sorted order, ``s3://`` / ``https://`` URLs of
files or an ``s3://`` prefix listed in sorted order, all opened through fsspec):

    .txt .md               one document per file
    .jsonl .jsonl.gz .jsonl.zst
                           one document per line, its text under ``text_key`` (gzip and zstandard
                           decompressed as they stream: Dolma, the Pile, SlimPajama)
    .parquet               one document per row, column ``text_key``, read a row group at a
                           time with pyarrow (FineWeb, FineWeb-Edu)
    a datasets folder      ``datasets.save_to_disk`` output (dataset_info.json / state.json),
                           read with ``datasets.load_from_disk`` (memory-mapped), column ``text_key``

The same documents in any of these formats are the same stream of texts, so they give the same
shards. A damaged file (bad UTF-8, a corrupt gzip/zstd stream or parquet row group, bad JSON) is
a one-line ``DataError`` naming the file and the position. ``DocumentSource.size`` (bytes) and
``read(progress)`` let a progress bar show a total and an ETA.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from sessa_train.data.storage import local_or_url, remote_options
from sessa_train.errors import DataError

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
PARQUET_SUFFIXES = (".parquet",)
SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
MAX_LINE_BYTES = 64 << 20  # one JSONL line (a document) is read whole: its limit
PARQUET_BATCH = 1024  # rows per batch of a row group: bounds memory, whatever the file's size


def _kind(name: str) -> str | None:
    return next((s for s in sorted(SUFFIXES, key=len, reverse=True) if name.endswith(s)), None)


def _is_dataset_folder(path: Path) -> bool:
    return path.is_dir() and (path / "state.json").is_file() and (path / "dataset_info.json").is_file()


def _remote(item: str) -> bool:
    return "://" in item and not item.startswith("file://")


@dataclass(frozen=True)
class DocumentSource:
    """One input: a file (local or a URL) or a datasets folder, and its size in bytes."""

    location: str
    kind: str  # a suffix of SUFFIXES, or "dataset"
    size: int

    def read(self, text_key: str, progress: Callable[[int], None] = lambda n: None) -> Iterator[str]:
        """The documents of this input in order; ``progress(n)`` is told of n more bytes read."""
        if self.kind == "dataset":
            yield from _dataset(self, text_key, progress)
        elif self.kind in PARQUET_SUFFIXES:
            yield from _parquet(self, text_key, progress)
        elif self.kind in TEXT_SUFFIXES:
            with _open(self.location) as fh:
                data = fh.read()
            progress(self.size)
            yield _decode(data, self.location)
        else:
            yield from _jsonl(self, text_key, progress)


def _open(location: str):
    import fsspec

    try:
        return fsspec.open(location, "rb", **(remote_options(location) if _remote(location) else {})).open()
    except FileNotFoundError as e:
        raise _not_found(location, e) from None
    except ImportError as e:
        raise DataError(f"reading {location} needs {e.name or e} (pip install 'sessa-train[cloud]')") from None


def _not_found(location: str, error: FileNotFoundError) -> DataError:
    """fsspec's HTTP file system reports any failed request as FileNotFoundError, the server's
    answer as its cause: "not found" only for a 404 (or a local file), else what the server said."""
    cause = error.__cause__
    status = getattr(cause, "status", None)
    if cause is None or status == 404 or isinstance(cause, FileNotFoundError):
        return DataError(f"input not found: {location}")
    what = f"HTTP {status}" if isinstance(status, int) else type(cause).__name__
    return DataError(f"{location} cannot be read ({what}: {_why(cause)})"[:400])


def _decode(data: bytes, where: str, line: int | None = None) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        at = f"line {line}, byte {e.start}" if line is not None else f"byte {e.start}"
        raise DataError(f"{where}: not valid UTF-8 at {at} ({e.reason}); re-encode the file as UTF-8") from None


def _decompressed(raw, src: DocumentSource):
    """A buffered reader of the decompressed bytes of ``raw`` (gzip, zstandard or none)."""
    if src.kind.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if src.kind.endswith(".zst"):
        return io.BufferedReader(_ZstdReader(raw), buffer_size=1 << 20)
    return raw


class _ZstdReader(io.RawIOBase):
    """The decompressed bytes of a zstandard file of one or more frames. Unlike zstandard's
    ``stream_reader``, a stream that ends inside a frame (a truncated file) is an error.

    Bounded: the compressed input goes in ``CHUNK`` bytes at a time (zstandard expands a byte by at
    most ~32,000: a run-length block), and what came out is handed on from an offset, never
    re-sliced, so memory stays near CHUNK x 32,000 and time linear whatever the ratio."""

    CHUNK = 1 << 10

    def __init__(self, raw) -> None:
        import zstandard

        self.raw, self.new = raw, zstandard.ZstdDecompressor().decompressobj
        self.inner, self.pending, self.offset, self.in_frame = self.new(), b"", 0, False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self.offset == len(self.pending):
            chunk = self.raw.read(self.CHUNK)
            if not chunk:
                if self.in_frame:
                    raise EOFError("the file ends inside a zstandard frame (truncated)")
                return 0
            self.pending, self.offset = self._decompress(chunk), 0
        n = min(len(buffer), len(self.pending) - self.offset)
        buffer[:n] = memoryview(self.pending)[self.offset : self.offset + n]
        self.offset += n
        return n

    def _decompress(self, chunk: bytes) -> bytes:
        out = []
        while chunk:
            out.append(self.inner.decompress(chunk))
            self.in_frame = not self.inner.eof
            chunk = self.inner.unused_data if self.inner.eof else b""
            if self.inner.eof:
                self.inner = self.new()
        return b"".join(out)


def _compression_errors() -> tuple[type[BaseException], ...]:
    import zstandard

    return (OSError, EOFError, ValueError, zstandard.ZstdError)  # gzip.BadGzipFile is an OSError


def _jsonl(src: DocumentSource, text_key: str, progress) -> Iterator[str]:
    broken = _compression_errors()
    with _open(src.location) as raw, _decompressed(raw, src) as fh:
        lineno, told = 0, 0
        while True:
            try:
                line = fh.readline(MAX_LINE_BYTES + 1)  # bounded: a compressed file may hold one huge line
            except broken as e:
                raise DataError(f"{src.location}: corrupt compressed data after line {lineno} ({_why(e)})") from None
            if not line:
                break
            if len(line) > MAX_LINE_BYTES:
                raise DataError(f"{src.location}: line {lineno + 1} is longer than {MAX_LINE_BYTES >> 20} MiB; JSONL "
                                "holds one document per line, each shorter than that")  # fmt: skip
            lineno += 1
            if lineno % 256 == 0:  # progress in bytes of the file as stored (compressed)
                now = min(raw.tell(), src.size)
                progress(now - told)
                told = now
            text = _decode(line, src.location, lineno)
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{src.location}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
                raise DataError(f"{src.location}:{lineno}: expected an object with a string field {text_key!r}")
            yield record[text_key]
    progress(src.size - told)


def _parquet(src: DocumentSource, text_key: str, progress) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with _open(src.location) as fh:
        try:
            pf = pq.ParquetFile(fh)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{src.location}: not a readable parquet file ({_why(e)})") from None
        if text_key not in pf.schema_arrow.names:
            raise DataError(
                f"{src.location} has no column {text_key!r} (its columns: {', '.join(pf.schema_arrow.names)}); "
                "pass --text-key"
            )
        kind = pf.schema_arrow.field(text_key).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise DataError(f"{src.location}: column {text_key!r} holds {kind}, not text (string); "
                            "pass --text-key naming a string column")  # fmt: skip
        # progress in file bytes: each row group's share of the compressed data, the rest at the end
        sizes = [
            sum(pf.metadata.row_group(g).column(c).total_compressed_size for c in range(pf.metadata.num_columns))
            for g in range(pf.num_row_groups)
        ]
        done, told = 0, 0
        for group in range(pf.num_row_groups):
            try:
                for batch in pf.iter_batches(batch_size=PARQUET_BATCH, row_groups=[group], columns=[text_key]):
                    for text in batch.column(0).to_pylist():
                        if text is not None:
                            yield text
            except (pa.ArrowException, OSError) as e:
                raise DataError(f"{src.location}: row group {group} is corrupt ({_why(e)})") from None
            done += sizes[group]
            now = src.size * done // max(1, sum(sizes))
            progress(now - told)
            told = now
        progress(src.size - told)


def _dataset(src: DocumentSource, text_key: str, progress) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"reading the datasets folder {src.location} needs datasets (pip install datasets)") from None
    try:
        ds = datasets.load_from_disk(src.location)
    except Exception as e:  # datasets and pyarrow raise many types for a damaged folder
        why = f"{type(e).__name__}: {_why(e)}"[:300]
        raise DataError(f"{src.location}: not a readable datasets folder ({why})") from None
    if isinstance(ds, datasets.DatasetDict):
        raise DataError(f"{src.location} is a DatasetDict ({', '.join(ds)}): pass one split's folder")
    if text_key not in ds.column_names:
        raise DataError(f"{src.location} has no column {text_key!r} (its columns: {', '.join(ds.column_names)})")
    feature = ds.features[text_key]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise DataError(f"{src.location}: column {text_key!r} holds {feature}, not text (string); "
                        "pass --text-key naming a string column")  # fmt: skip
    told = 0
    for start in range(0, len(ds), PARQUET_BATCH):
        try:
            texts = ds[start : start + PARQUET_BATCH][text_key]
        except Exception as e:  # a damaged .arrow file shows when its rows are read
            why = f"{type(e).__name__}: {_why(e)}"[:300]
            raise DataError(f"{src.location}: rows {start}.. cannot be read ({why})") from None
        yield from (t for t in texts if t is not None)
        now = src.size * (start + len(texts)) // max(1, len(ds))
        progress(now - told)
        told = now
    progress(src.size - told)


def _why(error: BaseException) -> str:
    """An error's message on one line (pyarrow's and thrift's span several)."""
    return " ".join(str(error).split()) or type(error).__name__


def expand_inputs(inputs: list[str | Path]) -> list[DocumentSource]:
    """The inputs named directly or found under folders, in a stable order."""
    sources: list[DocumentSource] = []
    for item in (local_or_url(i, "--input") for i in inputs):
        if _remote(item):
            sources += _remote_sources(item)
            continue
        path = Path(item)
        if _is_dataset_folder(path):
            size = sum(f.stat().st_size for f in path.glob("*.arrow"))
            sources.append(DocumentSource(str(path), "dataset", size))
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _kind(p.name))
            folders = sorted(p for p in path.rglob("*") if _is_dataset_folder(p))
            if not found and not folders:
                raise DataError(f"no {', '.join(SUFFIXES)} files or datasets folders under {path}")
            sources += [DocumentSource(str(p), _kind(p.name), p.stat().st_size) for p in found]
            sources += [
                DocumentSource(str(p), "dataset", sum(f.stat().st_size for f in p.glob("*.arrow"))) for p in folders
            ]
        elif path.is_file():
            if (kind := _kind(path.name)) is None:
                raise DataError(f"unsupported input file {path}: expected {', '.join(SUFFIXES)} or a datasets folder")
            sources.append(DocumentSource(str(path), kind, path.stat().st_size))
        else:
            raise DataError(f"input not found: {path}")
    return sources


def _remote_sources(url: str) -> list[DocumentSource]:
    """A file URL, or the files under a URL prefix (listed, in sorted order)."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url, **remote_options(url))
        if _kind(url):
            return [DocumentSource(url, _kind(url), int(fs.size(path) or 0))]
        found = {name: info for name, info in fs.find(path, detail=True).items() if _kind(name)}
    except FileNotFoundError as e:
        raise _not_found(url, e) from None
    except ImportError as e:
        raise DataError(f"reading {url} needs {e.name or e} (pip install 'sessa-train[cloud]')") from None
    if not found:
        raise DataError(f"no {', '.join(SUFFIXES)} files under {url}")
    return [
        DocumentSource(fs.unstrip_protocol(name), _kind(name), int(info.get("size") or 0))
        for name, info in sorted(found.items())
    ]


def read_documents(path: str | Path, text_key: str = "text") -> Iterator[str]:
    """The documents of one input (a file or a datasets folder)."""
    yield from expand_inputs([path])[0].read(text_key)


def iter_documents(inputs: list[str | Path], text_key: str = "text") -> Iterator[str]:
    for source in expand_inputs(inputs):
        yield from source.read(text_key)


class DocumentStream:
    """The documents of several inputs, one after the other, with their total ``size`` in bytes;
    ``on_progress(n)`` (set by a progress bar) hears of the bytes read as they go."""

    def __init__(self, sources: list[DocumentSource], text_key: str = "text") -> None:
        self.sources, self.text_key = sources, text_key
        self.size = sum(s.size for s in sources) or None
        self.on_progress: Callable[[int], object] = lambda n: None

    def __iter__(self) -> Iterator[str]:
        for source in self.sources:
            yield from source.read(self.text_key, lambda n: self.on_progress(n))

    @classmethod
    def part(cls, inputs: list[str | Path], text_key: str, part: int, parts: int) -> DocumentStream:
        """Part ``part`` of ``parts`` (1-based): a contiguous range of the inputs, in corpus order."""
        sources = expand_inputs(inputs)
        if not 1 <= part <= parts:
            raise DataError(f"--part {part}/{parts}: need 1 <= i <= n")
        if len(sources) < parts:
            raise DataError(
                f"--part {part}/{parts}: the corpus has {len(sources)} input files, fewer than the {parts} parts "
                "(each part takes whole files): split the input into more files or use fewer parts"
            )
        return cls(sources[(part - 1) * len(sources) // parts : part * len(sources) // parts], text_key)
