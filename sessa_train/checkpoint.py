"""The on-disk checkpoint format: the one place that turns the parts of a run's state into files and back.

A run's state is a set of named parts (torchtitan's ``Stateful`` idea). A ``Part`` has a JSON
``state_dict``/``load_state_dict`` (the data loader's position, the engine's step counts, ...); a
``TensorPart`` also writes safetensors shards (``tensors``: this rank's, by shard name) and reads
them back (``load_tensors``: the part's shards, opened lazily). This module writes and reads
parts and knows nothing of what is in them: adding a field to the checkpoint is a change to its
part only. A checkpoint is a folder ``step_NNNNNNNN/`` under ``checkpoint.dir``:

    meta.json        the typed record ``Meta``: format, step, tokens, the layout it was saved
                     under, the identity of its data, and every part's JSON state
    config.json      the resolved config (read before anything else is loaded)
    tokenizer.*      the run's tokenizer file, when it has one
    <part>/<shard>.safetensors
                     tensor parts' shards, e.g. model/tp{t}-pp{p}-{k}.safetensors (fp32 weight,
                     exp_avg and exp_avg_sq of the parameters tensor rank t of stage p holds, under the
                     plain model's names, written by replica k) and rng/rank{r:05d}.safetensors
    manifest.json    every other file with its size and sha256, written last
    latest           (beside the folders) the name of the newest complete checkpoint

Nothing is a pickle: safetensors and JSON only, so loading a checkpoint runs no code, and only
files the manifest lists are ever read.

Saving (collective): every rank writes its shards into ``step_N.partial/`` and fsyncs them; rank 0
writes meta, config, tokenizer and manifest, fsyncs the folder, renames it to ``step_N``, fsyncs
the parent, and replaces ``latest`` the same way. A crash of a process or a node at any point
leaves ``latest`` naming a complete checkpoint that is on disk; ``*.partial`` folders are cleared
at the next start.

Loading: a checkpoint is verified against its manifest first (the files split over the ranks);
``--resume auto`` takes the newest one that verifies and says which it skipped and why; an
explicit path that does not verify is a one-line error naming the file. ``ParamReader`` reads
one rank's tensor-parallel cut of a parameter's weight and moments (or a flat range of it, a ZeRO
partition) from the tensor-parallel shards it was saved in, touching only the overlapping bytes;
``read_weights`` gives the plain fp32 weights of any checkpoint (export, evaluation).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from sessa_train import distributed as comm
from sessa_train.config import ModelConfig
from sessa_train.errors import CheckpointError
from sessa_train.files import RunLock, file_sha256, fsync, readable_by_group, replace_durably

FORMAT = "sessa-checkpoint-v3"
READABLE = ("sessa-checkpoint-v2", FORMAT)  # v2: the same files, its meta flat (upgraded on read)
STEP_DIR = re.compile(r"^step_(\d{8})$")
MOMENTS = ("exp_avg", "exp_avg_sq")
MODEL, RNG = "model", "rng"  # the tensor parts every run has


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


def model_shard(tensor_rank: int, stage: int, replica: int) -> str:
    return f"tp{tensor_rank}-pp{stage}-{replica}"


def rng_shard(rank: int) -> str:
    return f"rank{rank:05d}"


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
    return raw | {"parts": {MODEL: model, "loader": raw["loader"]}}


# -- files -------------------------------------------------------------------------------------


def write_json(path: Path, value) -> Path:
    path.write_text(json.dumps(value, indent=1))
    fsync(path)
    return path


def _written(path: Path, tensors: dict[str, torch.Tensor], partial: Path) -> dict[str, dict]:
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
    fsync(path)
    return {str(path.relative_to(partial)): {"bytes": path.stat().st_size, "sha256": file_sha256(path)}}


def step_of(path: Path) -> int:
    return int(STEP_DIR.match(path.name)[1])


def _manifest(path: Path) -> dict[str, dict] | str:
    """The manifest's file records, or why it cannot be read."""
    manifest = path / "manifest.json"
    if not manifest.is_file():
        return f"{manifest} is missing"
    try:
        files = json.loads(manifest.read_text())["files"]
        for name, record in files.items():
            if not (
                isinstance(record, dict) and isinstance(record["bytes"], int) and isinstance(record["sha256"], str)
            ):
                raise TypeError(name)
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"{manifest} is not a manifest (damaged)"
    return files


def check_files(path: Path, part: int = 0, parts: int = 1) -> str | None:
    """None if every file of the manifest (every ``parts``-th from ``part``) is there with its size
    and checksum, else why not."""
    files = _manifest(path)
    if isinstance(files, str):
        return files
    for name, record in sorted(files.items())[part::parts]:
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        if file.stat().st_size != record["bytes"]:
            return f"{file} has {file.stat().st_size} bytes, the manifest says {record['bytes']}"
        if file_sha256(file) != record["sha256"]:
            return f"{file} does not match its checksum in the manifest"
    return None


def shard_files(path: Path, part: str) -> dict[str, object]:
    """The shards of tensor part ``part`` that the manifest lists, by name, opened lazily."""
    from safetensors import safe_open

    files = _manifest(path)
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
    files = _manifest(path)
    names = [] if isinstance(files, str) else [n for n in files if n.startswith("tokenizer.")]
    return path / names[0] if names else None


# -- the manager -------------------------------------------------------------------------------


class CheckpointManager:
    """Checkpoints under ``root`` for a job of ``world`` ranks, this process being ``rank``."""

    def __init__(
        self, root: str | Path, keep_last: int, rank: int, world: int, log: Callable[[str], None], background=False
    ) -> None:
        """``background``: saves are written in the background (``save``) unless told otherwise."""
        self.root, self.keep_last, self.rank, self.world, self.log = Path(root), keep_last, rank, world, log
        self.run_lock = RunLock(self.root)
        self.background = background
        self._group, self._pending = None, None  # made at the first background save; the save in flight
        self.waited = 0.0  # seconds the last save waited for the one before it

    def lock(self) -> None:
        """Collective: claim the folder for this run (``files.RunLock``), before anything in it is
        touched; a second run into the same folder stops with one line naming the first."""
        problem = self.run_lock.acquire() if self.rank == 0 else None
        if problem := comm.first_problem(problem):
            raise CheckpointError(problem)
        if self.rank == 0:
            import atexit

            atexit.register(self.run_lock.release)

    def unlock(self) -> None:
        self.run_lock.release()

    # -- finding -----------------------------------------------------------------------------
    def check_writable(self) -> None:
        """Collective: the folder can be created and written, now rather than at the first save."""
        problem = None
        if self.rank == 0:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                probe = self.root / f".writable-{os.getpid()}"
                probe.write_text("")
                probe.unlink()
            except OSError as e:
                problem = f"checkpoint.dir={self.root} is not writable ({e.strerror})"
        if problem := comm.first_problem(problem):
            raise CheckpointError(problem)

    def clear_partial(self) -> None:
        """Rank 0 removes leftovers of an interrupted save (call before the first barrier)."""
        if self.rank == 0 and self.root.is_dir():
            for p in self.root.glob("*.partial"):
                shutil.rmtree(p, ignore_errors=True)

    def verify(self, path: Path) -> str | None:
        """Collective: the files checked (``check_files``, split over the ranks) and the record
        read; None or why the checkpoint cannot be used."""
        problem = check_files(path, self.rank, self.world)
        if problem is None and self.rank == 0:
            try:
                read_meta(path)
                read_config(path)
            except CheckpointError as e:
                problem = str(e)
        return comm.first_problem(problem)

    def resolve(self, resume: str, allow_older: bool) -> Path | None:
        """Collective. The checkpoint to resume from: ``none``, ``auto`` (the newest that verifies)
        or a checkpoint folder (which must verify, and be the newest unless ``allow_older``)."""
        if resume == "none":
            if found := checkpoint_folders(self.root):
                raise CheckpointError(
                    f"checkpoint.dir={self.root} already holds checkpoints (newest {found[-1].name}); pass --resume "
                    "auto to go on from them, or choose another checkpoint.dir"
                )
            return None
        if resume == "auto":
            found, damaged = checkpoint_folders(self.root), []
            for path in reversed(found):
                if (problem := self.verify(path)) is None:
                    self._set_aside(damaged, "damaged", path)
                    return path
                self.log(f"skipping checkpoint {path.name}: {problem}")
                damaged.append(path)
            if found:
                raise CheckpointError(
                    f"no checkpoint in {self.root} verifies (see above); move them aside to start from scratch "
                    "or repair the newest"
                )
            return None
        path = Path(resume)
        if not (path.is_dir() and STEP_DIR.match(path.name)):
            raise CheckpointError(f"checkpoint.resume={resume!r} is not a checkpoint folder (step_NNNNNNNN)")
        if problem := self.verify(path):
            raise CheckpointError(f"checkpoint.resume={resume}: {problem}")
        newer = [p for p in checkpoint_folders(path.parent) if step_of(p) > step_of(path)]
        if newer and not allow_older:
            raise CheckpointError(
                f"checkpoint.resume={resume} is older than {newer[-1].name} in the same folder: resuming would write "
                "over the newer ones; set checkpoint.resume_older=true to go on from it (they are kept aside)"
            )
        self._set_aside(newer, "superseded", path)
        return path

    def _set_aside(self, paths: list[Path], why: str, resumed: Path) -> None:
        """Collective: rank 0 moves checkpoints newer than the one resumed to ``<why>/<time>/``
        beside them, so that later saves neither write over nor prune the resumed one for them."""
        if paths and self.rank == 0:
            aside = resumed.parent / why / time.strftime("%Y%m%d-%H%M%S")
            aside.mkdir(parents=True, exist_ok=True)
            for p in paths:
                os.replace(p, aside / p.name)
            (resumed.parent / "latest.tmp").write_text(resumed.name)
            replace_durably(resumed.parent / "latest.tmp", resumed.parent / "latest")
            self.log(f"resuming from {resumed.name}: moved {', '.join(p.name for p in paths)} to {aside}")
        comm.barrier()

    # -- saving and loading ------------------------------------------------------------------
    def save(
        self,
        step: int,
        tokens: int,
        layout: Layout,
        data: DataIdentity,
        parts: dict[str, Part],
        config: dict,
        tokenizer: Path | None,
        background: bool | None = None,
    ) -> Path:
        """Collective: every rank calls it with the same arguments; each writes its shards of the
        tensor parts, rank 0 the record (with every part's JSON state), config and tokenizer.
        Returns the folder the checkpoint is (or, in the background, will be) published as.

        ``background`` (None: the manager's): the parts' states and tensors are taken now (host
        copies), and a thread per rank writes them, agrees with the other ranks' threads over a
        communication group of its own (gloo) and publishes, while training goes on; one save is
        in flight at a time (the next one, ``wait`` and the end of a run wait for it)."""
        background = self.background if background is None else background
        self.waited = self.wait()
        name = f"step_{step:08d}"
        partial, final = self.root / f"{name}.partial", self.root / name
        problem = None
        if self.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
            problem = self._attempt(partial, lambda: partial.mkdir(parents=True))
        self._agree(problem, partial)
        states, shards = {}, {}
        for part_name, part in parts.items():  # every rank takes part in every part's collectives
            states[part_name] = part.state_dict()
            for shard, tensors in (part.tensors() if hasattr(part, "tensors") else {}).items():
                if background:  # the step after this one changes the originals
                    tensors = {k: t.detach().to("cpu", copy=True) for k, t in tensors.items()}
                shards[partial / part_name / f"{shard}.safetensors"] = tensors
        meta = Meta(step, tokens, layout, data, states)
        if not background:
            self._write(partial, final, shards, meta, config, tokenizer, group=None)
            return final
        group = self._group = self._group or comm.side_group()
        self._pending = _Background(lambda: self._write(partial, final, shards, meta, config, tokenizer, group))
        return final

    def wait(self, raising: bool = True) -> float:
        """Until the save in flight (if any) is published; its failure raised here, on every rank
        (``raising=False``: dropped, when the run is ending on another error). The seconds waited."""
        start, pending, self._pending = time.perf_counter(), self._pending, None
        if pending is not None:
            pending.join(raising)
        return time.perf_counter() - start

    def _write(self, partial: Path, final: Path, shards: dict, meta: Meta, config: dict, tokenizer, group) -> None:
        """Collective over ``group``: the shards written, then the record and manifest, the folder
        renamed into place and ``latest`` moved (rank 0)."""
        start, problem, records = time.perf_counter(), None, {}
        for file, tensors in shards.items():
            problem = problem or self._attempt(
                partial, lambda f=file, t=tensors: records.update(_written(f, t, partial))
            )
        self._agree(problem, partial, group)
        every = comm.all_gather_objects(records, group)
        if self.rank == 0:
            files = {k: v for rank_records in every for k, v in rank_records.items()}
            problem = self._attempt(partial, lambda: self._publish(partial, final, meta, config, tokenizer, files))
        self._agree(problem, partial, group)
        if group is not None:
            self.log(f"saved {final} ({time.perf_counter() - start:.2f} s writing in the background)")

    def _publish(self, partial: Path, final: Path, meta: Meta, config: dict, tokenizer, files: dict) -> None:
        """Rank 0: the record, config, tokenizer and manifest, then the folder renamed into place."""
        own = [write_json(partial / "meta.json", meta.to_json()), write_json(partial / "config.json", config)]
        if tokenizer is not None:
            own.append(partial / f"tokenizer{''.join(Path(tokenizer).suffixes) or '.model'}")
            shutil.copyfile(tokenizer, own[-1])
            fsync(own[-1])
        files |= {f.name: {"bytes": f.stat().st_size, "sha256": file_sha256(f)} for f in own}
        write_json(partial / "manifest.json", {"files": dict(sorted(files.items()))})
        for sub in [p for p in partial.iterdir() if p.is_dir()] + [partial]:
            fsync(sub)
        if final.exists():  # saved again at the same step (e.g. at exit right after a periodic save)
            shutil.rmtree(final)
        os.replace(partial, final)
        fsync(self.root)
        (self.root / "latest.tmp").write_text(final.name)
        replace_durably(self.root / "latest.tmp", self.root / "latest")
        for old in checkpoint_folders(self.root)[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def _attempt(self, partial: Path, write: Callable[[], object]) -> str | None:
        """``write()``, or a one-line description of the OSError it raised (disk full, ...)."""
        try:
            write()
        except OSError as e:
            free = shutil.disk_usage(self.root).free if self.root.exists() else 0
            return (
                f"saving {partial.name.removesuffix('.partial')} into {self.root} failed on rank {self.rank}: "
                f"{e.strerror or e} ({free / 2**20:.1f} MiB free there); the checkpoints before it are intact"
            )
        return None

    def _agree(self, problem: str | None, partial: Path, group=None) -> None:
        """Collective (over ``group``): every rank learns of any rank's failed write; the partial
        folder is removed and each raises the same one-line error."""
        if problem := comm.first_problem(problem, group):
            if self.rank == 0:
                shutil.rmtree(partial, ignore_errors=True)
            raise CheckpointError(problem)

    @staticmethod
    def load(path: Path, parts: dict[str, Part]) -> Meta:
        """Every part's state from a verified checkpoint (collective where the parts' loading is):
        JSON states first, then the tensor parts' shards. Returns the record."""
        meta = read_meta(path)
        for name, part in parts.items():
            if name in meta.parts:
                part.load_state_dict(meta.parts[name])
        for name, part in parts.items():
            if hasattr(part, "load_tensors"):
                part.load_tensors(shard_files(path, name), meta)
        return meta


class _Background:
    """``work()`` in a thread; ``join`` waits for it and raises what it raised."""

    def __init__(self, work: Callable[[], None]) -> None:
        import threading

        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(work,), name="sessa-checkpoint", daemon=True)
        self.thread.start()

    def _run(self, work: Callable[[], None]) -> None:
        try:
            work()
        except BaseException as e:  # raised again on the main thread by join
            self.error = e

    def join(self, raising: bool = True) -> None:
        self.thread.join()
        if self.error is not None and raising:
            raise self.error


# -- weights of any checkpoint -----------------------------------------------------------------


class ParamReader:
    """Weights and AdamW moments of the model part, read from the tensor-parallel shards
    (``model_shard`` names) they were saved in, under any later layout: ``region`` reads one
    rank's tensor-parallel cut of a parameter, or a flat range of that cut (its ZeRO partition),
    touching only the bytes of the saved pieces that overlap it (``safe_open(...).get_slice``);
    ``full`` is the whole tensor. ``bytes_read`` counts the tensor bytes materialised."""

    def __init__(self, shards: Mapping[str, object], cfg: ModelConfig, tensor: int, pipeline: int) -> None:
        from sessa_train.parallel.layout import stage_splits

        self.tensor, self.bytes_read = tensor, 0
        self.splits = {n: split for stage in range(pipeline) for n, split in stage_splits(cfg, pipeline, stage).items()}
        self.where: dict[str, dict[int, object]] = {}  # key -> tensor rank -> open file
        for shard, fh in shards.items():
            match = re.fullmatch(r"tp(\d+)-pp(\d+)-(\d+)", shard)
            if match is None or int(match[1]) >= tensor or int(match[2]) >= pipeline:
                raise CheckpointError(
                    f"model shard {shard!r} does not belong to a tensor={tensor} x pipeline={pipeline} checkpoint"
                )
            for key in fh.keys():  # noqa: SIM118 (safe_open has no __iter__)
                self.where.setdefault(key, {})[int(match[1])] = fh
        # a tied LM head is the embedding: only the embedding is a parameter
        self.names = [n for n in self.splits if n in self.where]

    def full(self, name: str, what: str = "") -> torch.Tensor:
        """The whole tensor of parameter ``name`` (``what``: "" for the weight, or a moment)."""
        return self.region(name, what)

    def region(
        self, name: str, what: str = "", rank: int = 0, ranks: int = 1, flat: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Tensor rank ``rank`` of ``ranks``'s cut of parameter ``name`` (``parallel/layout.py``'s
        ``cut`` of the whole; the whole tensor when it is not split), or, with ``flat=(a, b)``,
        elements a..b-1 of that cut flattened (a 1-D tensor)."""
        key = f"{name}.{what}" if what else name
        held = self.where.get(key, {})
        split = self.splits.get(name)
        ranks_saved = [min(held, default=0)] if split is None else range(self.tensor)
        if any(r not in held for r in ranks_saved):
            lacking = [r for r in ranks_saved if r not in held]
            raise CheckpointError(f"the checkpoint holds no {key!r} of tensor rank(s) {lacking}")
        piece = {r: held[r].get_slice(key) for r in ranks_saved}
        shape = list(piece[ranks_saved[0]].get_shape())
        if split is not None:
            shape[split.dim] *= self.tensor
            shape[split.dim] //= ranks
        if not shape:  # a scalar
            return self._counted(held[ranks_saved[0]].get_tensor(key))
        row = math.prod(shape[1:])
        first, stop = (0, shape[0]) if flat is None else (flat[0] // max(row, 1), -(-flat[1] // max(row, 1)))
        if split is None:
            out = self._counted(piece[ranks_saved[0]][first:stop])
        else:
            runs = _saved_runs(shape[split.dim], split.parts, rank, ranks, self.tensor)
            if split.dim == 0:  # the rows first..stop-1 of the cut, run by run
                out, at = [], 0
                for saved, lo, hi in runs:
                    a, b = max(lo, first - at + lo), min(hi, stop - at + lo)
                    if a < b:
                        out.append(self._counted(piece[saved][a:b]))
                    at += hi - lo
                out = torch.cat(out) if out else torch.empty(0, *shape[1:])
            else:
                index = (slice(first, stop),) + (slice(None),) * (split.dim - 1)
                out = torch.cat([self._counted(piece[saved][(*index, slice(lo, hi))]) for saved, lo, hi in runs],
                                split.dim)  # fmt: skip
        if flat is None:
            return out
        return out.flatten()[flat[0] - first * row : flat[1] - first * row]

    def _counted(self, t: torch.Tensor) -> torch.Tensor:
        self.bytes_read += t.numel() * t.element_size()
        return t


def _saved_runs(length: int, parts: int, rank: int, ranks: int, saved: int) -> list[tuple[int, int, int]]:
    """Where rank ``rank`` of ``ranks``'s cut of a dimension lies in the pieces a checkpoint saved
    under ``saved`` tensor ranks: (saved rank, start, stop) along that dimension of the saved
    piece, in the cut's order. ``length``: the cut's length along it; the whole is ``parts``
    blocks, each cut into ``ranks`` (``saved``) chunks, block p of a piece holding its chunk of
    block p of the whole."""
    block = length // parts * ranks  # one block of the whole
    own, kept = block // ranks, block // saved  # a block's chunk in the cut, in a saved piece
    runs = []
    for p in range(parts):
        lo, hi = rank * own, (rank + 1) * own  # within block p of the whole
        while lo < hi:
            s = lo // kept
            end = min(hi, (s + 1) * kept)
            runs.append((s, p * kept + lo - s * kept, p * kept + end - s * kept))
            lo = end
    return runs


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(plain fp32 model state dict, about) of a checkpoint, whatever its layout; ``about`` has
    the resolved ``config``, ``step``, ``tokens`` and the ``tokenizer`` file it carries (None
    when it carries none) with its ``tokenizer_sha256``."""
    path = find_checkpoint(path)
    if problem := check_files(path):
        raise CheckpointError(problem)
    config, meta = read_config(path), read_meta(path)
    cfg = ModelConfig.from_dict(config["model"])
    reader = ParamReader(shard_files(path, MODEL), cfg, meta.layout.tensor, meta.layout.pipeline)
    weights = {name: reader.full(name).float() for name in reader.names}
    if cfg.tie_embeddings:
        weights["lm_head.weight"] = weights["embed.weight"]
    about = {"config": config, "step": meta.step, "tokens": meta.tokens}
    about["tokenizer"] = tokenizer_file(path)
    about["tokenizer_sha256"] = meta.data.tokenizer_sha256
    return weights, about
