"""Documents from the files a corpus comes in, streamed in bounded memory, in a stable order.

Inputs (files, folders searched recursively in sorted order, or ``s3://`` / ``https://`` URLs of
files, all opened through fsspec):

    .txt .md               one document per file
    .jsonl .jsonl.gz .jsonl.zst
                           one document per line, its text under ``text_key`` (gzip and zstandard
                           decompressed by fsspec as they stream: Dolma, the Pile, SlimPajama)
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

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from sessa_train.errors import DataError

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
PARQUET_SUFFIXES = (".parquet",)
SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
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
        return fsspec.open(location, "rb", compression="infer").open()
    except FileNotFoundError:
        raise DataError(f"input not found: {location}") from None
    except ImportError as e:
        raise DataError(f"reading {location} needs {e.name or e} (pip install 'sessa-train[cloud]')") from None


def _decode(data: bytes, where: str, line: int | None = None) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        at = f"line {line}, byte {e.start}" if line is not None else f"byte {e.start}"
        raise DataError(f"{where}: not valid UTF-8 at {at} ({e.reason}); re-encode the file as UTF-8") from None


def _jsonl(src: DocumentSource, text_key: str, progress) -> Iterator[str]:
    raw = _raw_size_reader(src)
    with _open(src.location) as fh:
        lineno, told = 0, 0
        while True:
            try:
                line = fh.readline()
            except (OSError, EOFError, ValueError) as e:  # gzip.BadGzipFile, zstd errors
                raise DataError(f"{src.location}: corrupt compressed data after line {lineno} ({e})") from None
            if not line:
                break
            lineno += 1
            if lineno % 256 == 0:
                now = raw(fh)
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


def _raw_size_reader(src: DocumentSource):
    """Bytes of the (compressed) file consumed so far, where the stream tells; else 0."""

    def consumed(fh) -> int:
        inner = getattr(fh, "fileobj", None) or getattr(fh, "raw", None) or getattr(fh, "_fp", None)
        for f in (inner, fh):
            try:
                return min(int(f.tell()), src.size)
            except (AttributeError, OSError, ValueError, TypeError):
                continue
        return 0

    return consumed


def _parquet(src: DocumentSource, text_key: str, progress) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with _open(src.location) as fh:
        try:
            pf = pq.ParquetFile(fh)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{src.location}: not a readable parquet file ({e})") from None
        if text_key not in pf.schema_arrow.names:
            raise DataError(
                f"{src.location} has no column {text_key!r} (its columns: {', '.join(pf.schema_arrow.names)}); "
                "pass --text-key"
            )
        for group in range(pf.num_row_groups):
            try:
                for batch in pf.iter_batches(batch_size=PARQUET_BATCH, row_groups=[group], columns=[text_key]):
                    for text in batch.column(0).to_pylist():
                        if text is not None:
                            yield text
            except (pa.ArrowException, OSError) as e:
                raise DataError(f"{src.location}: row group {group} is corrupt ({e})") from None
            progress(pf.metadata.row_group(group).total_byte_size)


def _dataset(src: DocumentSource, text_key: str, progress) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"reading the datasets folder {src.location} needs datasets (pip install datasets)") from None
    ds = datasets.load_from_disk(src.location)
    if isinstance(ds, datasets.DatasetDict):
        raise DataError(f"{src.location} is a DatasetDict ({', '.join(ds)}): pass one split's folder")
    if text_key not in ds.column_names:
        raise DataError(f"{src.location} has no column {text_key!r} (its columns: {', '.join(ds.column_names)})")
    step = max(1, src.size // max(1, len(ds)))
    for start in range(0, len(ds), PARQUET_BATCH):
        texts = ds[start : start + PARQUET_BATCH][text_key]
        yield from (t for t in texts if t is not None)
        progress(step * len(texts))


def expand_inputs(inputs: list[str | Path]) -> list[DocumentSource]:
    """The inputs named directly or found under folders, in a stable order."""
    sources: list[DocumentSource] = []
    for item in map(str, inputs):
        if _remote(item):
            kind = _kind(item)
            if kind is None:
                raise DataError(f"unsupported input {item}: expected a file ending in {', '.join(SUFFIXES)}")
            sources.append(DocumentSource(item, kind, _remote_size(item)))
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


def _remote_size(url: str) -> int:
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url)
        return int(fs.size(path) or 0)
    except FileNotFoundError:
        raise DataError(f"input not found: {url}") from None
    except ImportError as e:
        raise DataError(f"reading {url} needs {e.name or e} (pip install 'sessa-train[cloud]')") from None


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
