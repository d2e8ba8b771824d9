"""The checkpoint manager: saving (collective, durable, optionally in the background), finding
the checkpoint to resume from, verifying it and loading a run's parts from it.

Saving: every rank writes its shards of the tensor parts into ``step_N.partial/`` and fsyncs them;
rank 0 writes meta, config, tokenizer and manifest, fsyncs the folder, renames it to ``step_N``,
fsyncs the parent, and replaces ``latest`` the same way. A crash of a process or a node at any
point leaves ``latest`` naming a complete checkpoint that is on disk; ``*.partial`` folders are
cleared at the next start. In the background (``checkpoint.async_save``), the step after a save
runs while a thread writes host copies; one save is in flight at a time.

Loading: a checkpoint is verified against its manifest first (the files split over the ranks);
``--resume auto`` takes the newest one that verifies and says which it skipped and why; an
explicit path that does not verify is a one-line error naming the file. Each part then reads
what it holds.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sessa_train import distributed as comm
from sessa_train.checkpoint.format import (
    STEP_DIR,
    DataIdentity,
    Layout,
    Meta,
    Part,
    check_files,
    checkpoint_folders,
    file_records,
    folder_name,
    read_config,
    read_meta,
    shard_files,
    step_of,
    write_json,
    write_shard,
)
from sessa_train.errors import CheckpointError
from sessa_train.files import RunLock, fsync, replace_durably


@dataclass(frozen=True)
class RunRecord:
    """What every checkpoint of a run records alike: the layout it runs under, the identity of its
    data, its resolved config and its tokenizer file (None: it has none)."""

    layout: Layout
    data: DataIdentity
    config: dict
    tokenizer: Path | None


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
        self.parts: dict[str, Part] = {}
        self.record: RunRecord | None = None

    def attach(self, parts: dict[str, Part], record: RunRecord) -> None:
        """The run's parts and record, once: every later ``save`` and ``load`` is of these."""
        self.parts, self.record = parts, record

    def lock(self) -> None:
        """Collective: claim the folder for this run (``files.RunLock``), before anything in it is
        touched; a second run into the same folder stops with one line naming the first."""
        comm.raise_first(self.run_lock.acquire() if self.rank == 0 else None, CheckpointError)
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
        comm.raise_first(problem, CheckpointError)

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
    def save(self, step: int, tokens: int, background: bool | None = None) -> Path:
        """Collective: every rank calls it; each writes its shards of the tensor parts, rank 0 the
        record (with every part's JSON state), config and tokenizer. Returns the folder the
        checkpoint is (or, in the background, will be) published as.

        ``background`` (None: the manager's): the parts' states and tensors are taken now (device
        tensors copied to the host here), and a thread per rank copies the host tensors, then
        writes them, agrees with the other ranks' threads over a communication group of its own
        (gloo) and publishes, while training goes on. The next optimizer step, which changes the
        originals, waits for that copy (``copied``); one save is in flight at a time (the next
        one, ``wait`` and the end of a run wait for it)."""
        assert self.record is not None, "attach the run's parts and record before saving"
        background = self.background if background is None else background
        self.waited = self.wait()
        partial, final = self.root / f"{folder_name(step)}.partial", self.root / folder_name(step)
        problem = None
        if self.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
            problem = self._attempt(partial, lambda: partial.mkdir(parents=True))
        self._agree(problem, partial)
        states, shards = {}, {}
        for part_name, part in self.parts.items():  # every rank takes part in every part's collectives
            states[part_name] = part.state_dict()
            for shard, tensors in (part.tensors() if hasattr(part, "tensors") else {}).items():
                if background:  # the step after this one changes the originals: device ones copied now
                    tensors = {k: t.detach() if t.device.type == "cpu" else t.detach().to("cpu", copy=True)
                               for k, t in tensors.items()}  # fmt: skip
                shards[partial / part_name / f"{shard}.safetensors"] = tensors
        meta = Meta(step, tokens, self.record.layout, self.record.data, states)
        if not background:
            self._write(partial, final, shards, meta, group=None)
            return final
        group = self._group = self._group or comm.side_group()

        def copy() -> None:  # the host tensors, while the next step's forward and backward run
            for file, tensors in shards.items():
                shards[file] = {k: t.clone() if t.device.type == "cpu" else t for k, t in tensors.items()}

        self._pending = _Background(copy, lambda: self._write(partial, final, shards, meta, group))
        return final

    def copied(self) -> None:
        """Until the save in flight (if any) holds its own copy of every tensor: what must come
        before anything changes the weights or the optimizer's state (the next optimizer step)."""
        if self._pending is not None:
            self._pending.copied.wait()

    def wait(self, raising: bool = True) -> float:
        """Until the save in flight (if any) is published; its failure raised here, on every rank
        (``raising=False``: dropped, when the run is ending on another error). The seconds waited."""
        start, pending, self._pending = time.perf_counter(), self._pending, None
        if pending is not None:
            pending.join(raising)
        return time.perf_counter() - start

    def _write(self, partial: Path, final: Path, shards: dict, meta: Meta, group) -> None:
        """Collective over ``group``: the shards written, then the record and manifest, the folder
        renamed into place and ``latest`` moved (rank 0)."""
        start, problem, records = time.perf_counter(), None, {}
        for file, tensors in shards.items():
            problem = problem or self._attempt(
                partial, lambda f=file, t=tensors: records.update(write_shard(f, t, partial))
            )
        self._agree(problem, partial, group)
        every = comm.all_gather_objects(records, group)
        if self.rank == 0:
            files = {k: v for rank_records in every for k, v in rank_records.items()}
            problem = self._attempt(partial, lambda: self._publish(partial, final, meta, files))
        self._agree(problem, partial, group)
        if group is not None:
            self.log(f"saved {final} ({time.perf_counter() - start:.2f} s writing in the background)")

    def _publish(self, partial: Path, final: Path, meta: Meta, files: dict) -> None:
        """Rank 0: the record, config, tokenizer and manifest, then the folder renamed into place."""
        config, tokenizer = self.record.config, self.record.tokenizer
        own = [write_json(partial / "meta.json", meta.to_json()), write_json(partial / "config.json", config)]
        if tokenizer is not None:
            own.append(partial / f"tokenizer{''.join(Path(tokenizer).suffixes) or '.model'}")
            shutil.copyfile(tokenizer, own[-1])
            fsync(own[-1])
        files |= file_records(own, partial)
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
        if problem := comm.first_problem(problem, group):  # the partial folder goes before anyone raises
            if self.rank == 0:
                shutil.rmtree(partial, ignore_errors=True)
            raise CheckpointError(problem)

    def load(self, path: Path) -> Meta:
        """Every attached part's state from a verified checkpoint (collective where the parts'
        loading is): JSON states first, then the tensor parts' shards. Returns the record."""
        meta = read_meta(path)
        for name, part in self.parts.items():
            if name in meta.parts:
                part.load_state_dict(meta.parts[name])
        for name, part in self.parts.items():
            if hasattr(part, "load_tensors"):
                part.load_tensors(shard_files(path, name), meta)
        return meta


class _Background:
    """``copy()`` then ``work()`` in a thread; ``copied`` is set once ``copy`` has returned (or
    failed); ``join`` waits for both and raises what they raised."""

    def __init__(self, copy: Callable[[], None], work: Callable[[], None]) -> None:
        import threading

        self.error: BaseException | None = None
        self.copied = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(copy, work), name="sessa-checkpoint", daemon=True)
        self.thread.start()

    def _run(self, copy: Callable[[], None], work: Callable[[], None]) -> None:
        try:
            try:
                copy()
            finally:
                self.copied.set()
            work()
        except BaseException as e:  # raised again on the main thread by join
            self.error = e

    def join(self, raising: bool = True) -> None:
        self.thread.join()
        if self.error is not None and raising:
            raise self.error
