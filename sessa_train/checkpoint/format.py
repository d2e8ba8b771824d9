"""The on-disk format: folder names, the record (``Meta``), the manifest, and shards.

A checkpoint is a folder ``step_NNNNNNNN/`` under ``checkpoint.dir``:

    meta.json        the typed record ``Meta``: format, step, tokens, the layout it was saved
                     under, the identity of its data, and every part's JSON state
    config.json      the resolved config (read before anything else is loaded)
    tokenizer.*      the run's tokenizer file, when it has one
    <part>/<shard>.safetensors
                     tensor parts' shards (``model.py``: model/tp{t}-pp{p}-{k}.safetensors;
                     ``rng.py``: rng/rank{r:05d}.safetensors)
    manifest.json    every other file with its size and the sha256 of each of its 64 MiB blocks
                     (v3: of the whole file), written last
    latest           (beside the folders) the name of the newest complete checkpoint

Nothing is a pickle: safetensors and JSON only, so loading a checkpoint runs no code, and only
files the manifest lists are ever read. A part of a run's state (torchtitan's ``Stateful``
idea) is a ``Part`` (a JSON state) or a ``TensorPart`` (also shards); this module knows nothing
of what is in them.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from sessa_train.config import ModelConfig
from sessa_train.errors import CheckpointError
from sessa_train.files import block_sha256, file_sha256, fsync, readable_by_group, while_flushing

FORMAT = "sessa-checkpoint-v4"
# v3: the same files, each with one sha256 of the whole of it in the manifest (checked on one
# core); v2: also its meta flat (upgraded on read)
READABLE = ("sessa-checkpoint-v2", "sessa-checkpoint-v3", FORMAT)
DIGEST_BLOCK = 1 << 26  # a file's digests: one per 64 MiB, checked in parallel
STEP_DIR = re.compile(r"^step_(\d{8})$")


# -- the parts ---------------------------------------------------------------------------------


class Part(Protocol):
    """A part of a run's state with a JSON state, the same on every rank (computing it may be a
    collective: every rank calls ``state_dict``)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class TensorPart(Part, Protocol):
    """A part that also holds tensors: ``tensors()`` (collective) gives this rank's shards by
    name; ``load_tensors(shards, meta)`` reads them back from the part's shards of a checkpoint
    saved under any layout (``meta.layout``)."""

    def tensors(self) -> dict[str, dict[str, torch.Tensor]]: ...

    def load_tensors(self, shards: Mapping[str, object], meta: Meta) -> None: ...


@dataclass(frozen=True)
class Layout:
    """The parallel layout a checkpoint was saved under."""

    ranks: int
    tensor: int
    pipeline: int
    context: int
    data: int
    zero: int

    def phrase(self) -> str:
        return f"tensor={self.tensor},pipeline={self.pipeline},context={self.context},data={self.data},zero={self.zero}"


@dataclass(frozen=True)
class DataIdentity:
    """What the run's batches are read from; a resume must read the same."""

    index_sha256: str
    seq_len: int
    tokenizer_sha256: str | None
    path: str


@dataclass(frozen=True)
class Meta:
    """meta.json: the checkpoint's own record and every part's JSON state."""

    step: int
    tokens: int
    layout: Layout
    data: DataIdentity
    parts: dict[str, dict]
    format: str = FORMAT

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, raw: dict, where: Path) -> Meta:
        """The record of a meta.json of any readable format; CheckpointError for anything else."""
        if not isinstance(raw, dict) or raw.get("format") not in READABLE:
            found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
            raise CheckpointError(f"{where} has format {found!r}, expected one of {', '.join(READABLE)}")
        try:
            if raw["format"] == "sessa-checkpoint-v2":
                raw = _upgrade_v2(raw)
            return cls(
                step=int(raw["step"]),
                tokens=int(raw["tokens"]),
                layout=Layout(**raw["layout"]),
                data=DataIdentity(**raw["data"]),
                parts={name: dict(state) for name, state in raw["parts"].items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CheckpointError(f"{where} is not a checkpoint record ({type(e).__name__}: {e})") from None


def _upgrade_v2(raw: dict) -> dict:
    """v2 kept each part's fields at the top level of meta.json."""
    model = {"optimizer_steps": raw["optimizer_steps"], "scheduler_steps": raw["scheduler_steps"], **raw["engine"]}
    return raw | {"parts": {"model": model, "loader": raw["loader"]}}


# -- files -------------------------------------------------------------------------------------


def write_json(path: Path, value) -> Path:
    path.write_text(json.dumps(value, indent=1))
    fsync(path)
    return path


def write_shard(path: Path, tensors: dict[str, torch.Tensor], partial: Path) -> dict[str, dict]:
    """Write one shard durably; its manifest record."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        save_file(
            {k: t.detach().cpu().contiguous() for k, t in tensors.items()}, str(path), metadata={"format": FORMAT}
        )
    except SafetensorError as e:  # how safetensors reports a failed write (a full disk): an OSError here
        match = re.search(r"I/O error: (.*?)(?: \(os error (\d+)\))?$", str(e))
        if match is None:
            raise
        raise OSError(int(match[2] or 5), match[1]) from None
    readable_by_group(path)
    return while_flushing(path, lambda: file_records([path], partial))


def digest_threads() -> int:
    """Threads hashing a rank's blocks: its cores (torch's threads: the launcher gives each rank its
    share of the node), and at least 4 so that several reads are in flight at the disk."""
    return max(4, torch.get_num_threads())


def file_records(paths: list[Path], folder: Path) -> dict[str, dict]:
    """The manifest's records of files in ``folder``: size and per-block digests, by name."""
    digests = block_sha256(paths, DIGEST_BLOCK, digest_threads())
    return {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "block_bytes": DIGEST_BLOCK,
                                         "sha256_blocks": digests[p]} for p in paths}  # fmt: skip


def step_of(path: Path) -> int:
    return int(STEP_DIR.match(path.name)[1])


def folder_name(step: int) -> str:
    return f"step_{step:08d}"


def _is_record(record: object) -> bool:
    """v4: size, block size (a power of two: a damaged one never passes for another block size
    that would check a small file the same) and one digest per block; v3: size and the whole
    file's digest."""
    if not (isinstance(record, dict) and isinstance(record.get("bytes"), int) and record["bytes"] >= 0):
        return False
    if "sha256" in record:
        return isinstance(record["sha256"], str)
    block, digests = record.get("block_bytes"), record.get("sha256_blocks")
    return (
        isinstance(block, int)
        and block > 0
        and block & (block - 1) == 0
        and isinstance(digests, list)
        and len(digests) == max(1, -(-record["bytes"] // block))
        and all(isinstance(d, str) for d in digests)
    )


def manifest(path: Path) -> dict[str, dict] | str:
    """The manifest's file records, or why it cannot be read."""
    manifest = path / "manifest.json"
    if not manifest.is_file():
        return f"{manifest} is missing"
    try:
        files = json.loads(manifest.read_text())["files"]
        if not all(_is_record(record) for record in files.values()):
            raise TypeError
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"{manifest} is not a manifest (damaged)"
    return files


def check_files(path: Path, part: int = 0, parts: int = 1) -> str | None:
    """None if every file of the manifest (every ``parts``-th from ``part``) is there with its size
    and checksums, else why not. The blocks of all of them are hashed at once (``digest_threads``)."""
    files = manifest(path)
    if isinstance(files, str):
        return files
    mine = sorted(files.items())[part::parts]
    for name, record in mine:
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        if file.stat().st_size != record["bytes"]:
            return f"{file} has {file.stat().st_size} bytes, the manifest says {record['bytes']}"
    blocks: dict[int, list[Path]] = {}  # v4 records by block size
    for name, record in mine:
        if "sha256" not in record:
            blocks.setdefault(record["block_bytes"], []).append(path / name)
    found = {}
    for size, group in blocks.items():
        found |= block_sha256(group, size, digest_threads())
    for name, record in mine:
        file = path / name
        if "sha256" in record:  # v3
            matches = file_sha256(file) == record["sha256"]
        else:
            matches = found[file] == record["sha256_blocks"]
        if not matches:
            return f"{file} does not match its checksum in the manifest"
    return None


def shard_files(path: Path, part: str) -> dict[str, object]:
    """The shards of tensor part ``part`` that the manifest lists, by name, opened lazily."""
    from safetensors import safe_open

    files = manifest(path)
    if isinstance(files, str):
        raise CheckpointError(files)
    prefix = f"{part}/"
    names = sorted(n for n in files if n.startswith(prefix) and n.endswith(".safetensors") and n.count("/") == 1)
    return {n[len(prefix) : -len(".safetensors")]: safe_open(str(path / n), "pt") for n in names}


def checkpoint_folders(root: str | Path) -> list[Path]:
    """The ``step_N`` folders under ``root``, oldest first (unverified)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name))


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a checkpoint root whose ``latest`` names one."""
    path = Path(path)
    if (path / "latest").is_file():
        path = path / (path / "latest").read_text().strip()
    if (path / "meta.json").is_file():
        return path
    if folders := checkpoint_folders(path):
        raise CheckpointError(
            f"{path} holds checkpoints but no 'latest' file naming a complete one; pass one of its step_N folders "
            f"(newest: {folders[-1]})"
        )
    raise CheckpointError(
        f"{path} is not a complete checkpoint (no meta.json); pass a step_N folder, or the checkpoint.dir whose "
        "'latest' names one"
    )


def read_meta(path: Path) -> Meta:
    try:
        raw = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}/meta.json cannot be read ({type(e).__name__}: {e})") from None
    return Meta.from_json(raw, path / "meta.json")


def read_config(path: Path) -> dict:
    """The resolved config a checkpoint was saved with."""
    try:
        config = json.loads((path / "config.json").read_text())
        ModelConfig.from_dict(config["model"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}/config.json is not a run's config ({type(e).__name__}: {e})") from None
    return config


def tokenizer_file(path: Path) -> Path | None:
    """The tokenizer file a checkpoint carries (the manifest lists it), or None."""
    files = manifest(path)
    names = [] if isinstance(files, str) else [n for n in files if n.startswith("tokenizer.")]
    return path / names[0] if names else None
