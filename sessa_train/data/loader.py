"""A streaming loader of packed token shards (webdataset) whose global batches do not depend on
the parallel layout, and whose state is one position.

Order. A run has S reader slots (``slots``), fixed for its lifetime. The shard sequence is the
split's shards permuted by (seed, epoch), epoch after epoch; slot s reads its items s, s + S,
s + 2S, ... one after the other, each shard's samples permuted by (seed, epoch, shard). All slots
move through the sequence at the same pace, so each epoch reads every shard once and no shard
gets ahead of the others by more than S items. Every global batch takes G / S consecutive
samples from every slot (G = the global batch size), so its samples are the same whatever the
number of data-parallel ranks or loader workers. Rank r of d serves slots r, r + d, ... (S / d of them:
each rank reads only its share), its DataLoader workers split those, and its G / d samples of a
step (for j < G/S, for each of its slots in order) are cut into micro-batches.

State. Every slot has consumed the same number of samples, steps x G / S: that position, the
shards found unreadable (with ``skip_corrupt``; they count as empty in every epoch) and the
identity of the data (seed, slots, index digest) are the whole state, the same on every rank.
Resuming under any layout gives the batches an uninterrupted run would have had.

Integrity. Every shard is checked against index.json (sha256 of the file, sample and token
counts) and every token against the vocabulary when it is read; a bad shard is named in one
line. With ``skip_corrupt`` it is skipped and counted, and the loader stops with an error once
the skipped shards hold more than ``max_skipped_fraction`` of the split's samples or a slot
meets as many unreadable shards in a row as the split has. ``stop()`` (e.g. a signal received)
ends the stream between samples.
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from sessa_train.data.shards import INDEX_NAME, ShardError, read_index, read_shard
from sessa_train.data.storage import Storage, is_remote, local_or_url
from sessa_train.errors import DataError

log = logging.getLogger(__name__)
STATE_VERSION = 2


class StopRequestedError(Exception):
    """The loader's ``stop()`` said to end the stream."""


def _permutation(n: int, *key: int) -> np.ndarray:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(key)))).permutation(n)


def default_slots(global_batch_size: int, shards: int, data_parallel: int) -> int:
    """The reader slots of a run that does not set ``data.reader_slots``: the most that divide
    the global batch, are a multiple of the data-parallel size, are at most one per shard and at
    most max(64, data-parallel size) (each slot holds one shard in memory)."""
    cap = min(shards, max(64, data_parallel))
    fits = [s for s in range(data_parallel, cap + 1, data_parallel) if global_batch_size % s == 0]
    if not fits:
        raise DataError(
            f"no reader-slot count fits {data_parallel} data-parallel ranks, a global batch of {global_batch_size} "
            f"and {shards} shards: write at least {data_parallel} shards"
        )
    return max(fits)


class _Slots(IterableDataset):
    """Per step, ``per_slot`` samples of each of the slots a process (or each of its DataLoader
    workers) reads: one bundle per step."""

    def __init__(self, loader: PackedTokenLoader, position: int, skipped: set[str]) -> None:
        self.loader, self.position, self.skipped = loader, position, set(skipped)

    def __iter__(self) -> Iterator[dict]:
        ld = self.loader
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        streams = {s: self._samples(s) for s in ld.rank_slots[worker::workers]}
        while True:
            rows = {s: [x for _, x in zip(range(ld.per_slot), stream, strict=False)] for s, stream in streams.items()}
            yield {"slots": rows, "skipped": sorted(self.skipped)}
            if not any(rows.values()):
                return

    def _samples(self, slot: int) -> Iterator[tuple[int, np.ndarray]]:
        """(sample id, tokens) of ``slot`` from ``self.position`` on: the shards at positions
        slot, slot + S, ... of the shard sequence (every epoch's shard permutation, one after the
        other), each one's samples in its own permuted order."""
        ld = self.loader
        n = len(ld.shards)
        skip, empty = self.position, 0
        for item in itertools.count(slot, ld.slots) if n else ():
            epoch, at = divmod(item, n)
            if ld.max_epochs is not None and epoch >= ld.max_epochs:
                return
            shard = int(_shard_order(n, ld.seed, epoch, ld.shuffle)[at])
            count = 0 if ld.shards[shard]["name"] in self.skipped else ld.shards[shard]["samples"]
            if skip >= count:  # consumed before the position resumed (or empty)
                skip -= count
                empty = 0 if count else empty + 1
            elif (samples := ld.read(shard, self.skipped)) is None:  # found unreadable now
                empty += 1
            else:
                order = _permutation(count, ld.seed, epoch, shard) if ld.shuffle else range(count)
                for i in range(skip, count):
                    if ld.stop():
                        raise StopRequestedError
                    yield ld.sample_base[shard] + int(order[i]), samples[int(order[i])]
                skip, empty = 0, 0
            if empty >= n:
                raise DataError(
                    f"reader slot {slot} of {ld.data_dir} ({ld.split}) found no readable shard in {n} shards in a row: "
                    f"skipped {sorted(self.skipped)[:5]}"
                )


@functools.lru_cache(maxsize=4)
def _shard_order(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    return _permutation(n, seed, epoch) if shuffle else np.arange(n)


class PackedTokenLoader:
    """Micro-batches ``{"tokens": (B, seq_len + 1) int64, "sample_ids": (B,)}`` of one split
    (and ``"targets"``, ``"loss_mask"``: (B, seq_len) where index.json has ``"scored": true``).

    ``global_batch_size`` (default: one micro-batch per rank) samples per step over all ranks;
    ``slots``: reader slots (default: ``default_slots``). ``max_epochs=None`` streams forever
    (training); an integer stops after that many epochs (validation, tests), the last
    micro-batch possibly short. ``index``: index.json and its sha256 as ``read_index`` gave them
    (the trainer's validation passes take its training loader's: the index is read once a run).
    """

    def __init__(
        self,
        data_dir: str | Path,
        split: str = "train",
        *,
        micro_batch_size: int,
        global_batch_size: int | None = None,
        slots: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        max_epochs: int | None = None,
        skip_corrupt: bool = False,
        max_skipped_fraction: float = 0.05,
        tokenizer_path: str | Path | None = None,
        stop: Callable[[], bool] = lambda: False,
        document_masking: bool = False,
        index: tuple[dict, str] | None = None,
    ) -> None:
        data_dir = local_or_url(data_dir)  # file:// is a local folder; an unsupported scheme is refused
        self.data_dir = str(data_dir).rstrip("/") if is_remote(data_dir) else Path(data_dir)  # a folder or a URL
        self.storage = Storage(self.data_dir)
        self.index, self.index_sha256 = index or read_index(self.data_dir, tokenizer_path)
        if split not in self.index["splits"]:
            raise DataError(f"split {split!r} not in {self.data_dir}; valid: {', '.join(self.index['splits'])}")
        self.shards = self.index["splits"][split]["shards"]
        G = global_batch_size or micro_batch_size * world_size
        if micro_batch_size < 1 or num_workers < 0 or not 0 <= rank < world_size:
            raise DataError(
                f"bad loader layout: micro_batch_size={micro_batch_size}, num_workers={num_workers}, "
                f"rank={rank}, world_size={world_size}"
            )
        # a finite pass (validation) reads on every rank: one slot per rank unless told
        S = slots or (default_slots(G, len(self.shards), world_size) if max_epochs is None else world_size)
        if S % world_size:
            valid = [d for d in range(1, S + 1) if S % d == 0]
            raise DataError(
                f"the run's {S} reader slots (data.reader_slots) do not split over {world_size} data-parallel ranks; "
                f"valid data-parallel sizes: {', '.join(map(str, valid))}"
            )
        if G % S or (G // world_size) % micro_batch_size:
            raise DataError(
                f"a global batch of {G} does not split into {S} reader slots and micro-batches of {micro_batch_size} "
                f"on {world_size} ranks"
            )
        if max_epochs is None and len(self.shards) < S:  # an endless reader needs a shard
            raise DataError(
                f"split {split!r} of {self.data_dir} has {len(self.shards)} shards, fewer than the {S} reader slots; "
                "write smaller shards or set data.reader_slots lower"
            )
        if max_epochs is None and num_workers > S // world_size:
            raise DataError(f"data.num_workers={num_workers} exceeds the {S // world_size} reader slots of each rank")
        self.split, self.micro_batch_size, self.seed, self.shuffle = split, micro_batch_size, seed, shuffle
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.slots, self.per_slot = S, G // S
        self.rank_slots = list(range(rank, S, world_size))
        self.micro_per_step = G // world_size // micro_batch_size
        self.max_epochs, self.skip_corrupt, self.max_skipped_fraction = max_epochs, skip_corrupt, max_skipped_fraction
        self.stop = stop
        if document_masking and self.index["eos_id"] is None:
            raise DataError(f"data.document_masking=true needs the EOS id that joins documents, and "
                            f"{self.storage.url(INDEX_NAME)} has eos_id null: set data.document_masking=false "
                            "or write the shards with a tokenizer that has an EOS")  # fmt: skip
        self.eos_id = self.index["eos_id"] if document_masking else None
        self.vocab_size = self.index["vocab_size"]
        self.sample_base = np.concatenate([[0], np.cumsum([s["samples"] for s in self.shards])[:-1]]).tolist()
        self.total_samples = sum(s["samples"] for s in self.shards)
        self.skipped: set[str] = set()
        self.position = 0  # samples each slot has consumed in the steps trained so far (``advance``)
        self.handed = 0  # micro-batches handed out since
        if max_epochs is None and any("sha256" not in s for s in self.shards):
            log.warning(
                "%s has no shard checksums (written by an earlier version): shards are checked for sample counts and "
                "token range only; write them again to have them verified",
                self.storage.url(INDEX_NAME),
            )

    def read(self, shard: int, skipped: set[str]) -> list[np.ndarray] | None:
        """The samples of one shard in file order; None (and the shard added to ``skipped``) for an
        unreadable shard when skip_corrupt; DataError once the skipped ones are too many."""
        entry = self.shards[shard]
        try:
            return read_shard(self.storage, entry, self.index["sample_tokens"], self.index["dtype"], self.vocab_size,
                              scored=self.index.get("scored", False))  # fmt: skip
        except ShardError as e:
            if not self.skip_corrupt:
                raise
            skipped.add(entry["name"])
            lost = sum(s["samples"] for s in self.shards if s["name"] in skipped)
            if lost > self.max_skipped_fraction * self.total_samples:
                raise DataError(
                    f"{len(skipped)} unreadable shards of {self.data_dir} ({self.split}) hold {lost} of "
                    f"{self.total_samples} samples, more than data.max_skipped_fraction={self.max_skipped_fraction}: "
                    f"{sorted(skipped)[:5]}"
                ) from None
            log.warning("skipping unreadable shard (data.skip_corrupt): %s", e)
            return None

    def __iter__(self) -> Iterator[dict]:
        stream = _Slots(self, self.position, self.skipped)
        workers = self.num_workers if self.max_epochs is None else 0  # a finite pass (validation): in process
        bundles = (
            iter(DataLoader(stream, batch_size=None, num_workers=workers, persistent_workers=False))
            if workers
            else iter(stream)
        )
        pending: list[tuple[int, np.ndarray]] = []
        while True:
            rows: dict[int, list] = {}
            for _ in range(max(1, workers)):  # each worker yields one bundle per step, in turn
                bundle = next(bundles)
                self.skipped |= set(bundle["skipped"])
                rows |= bundle["slots"]
            if self.stop():
                raise StopRequestedError
            step = [rows[s][j] for j in range(self.per_slot) for s in self.rank_slots if j < len(rows[s])]
            pending += step
            while len(pending) >= self.micro_batch_size or (pending and not step):
                part, pending = pending[: self.micro_batch_size], pending[self.micro_batch_size :]
                self.handed += 1
                yield _batch(part, self.eos_id)
            if not step:
                return

    def advance(self) -> None:
        """One step was trained on the ``micro_per_step`` micro-batches handed out since the last."""
        if self.handed != self.micro_per_step:
            raise RuntimeError(f"advance() after {self.handed} micro-batches; a step takes {self.micro_per_step}")
        self.position, self.handed = self.position + self.per_slot, 0

    def rewind(self) -> None:
        """Forget the micro-batches handed out since the last trained step (a run stopped before
        training on them); iterate again to have them again."""
        self.handed = 0

    def state_dict(self) -> dict:
        """The loader's state (JSON), the same on every rank but for ``skipped`` (``merge_states``)."""
        if self.handed:
            raise RuntimeError(f"loader state asked for with {self.handed} micro-batches handed out: advance or rewind")
        return {
            "version": STATE_VERSION,
            "split": self.split,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "slots": self.slots,
            "index_sha256": self.index_sha256,
            "position": self.position,
            "skipped": sorted(self.skipped),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a state saved under any data-parallel size, worker count or micro-batch
        size (and any global batch size that the slots divide)."""
        if state.get("version") != STATE_VERSION:
            raise DataError(f"loader state version {state.get('version')!r}; this loader reads {STATE_VERSION}")
        mine = self.state_dict()
        for key in ("split", "seed", "shuffle", "slots", "index_sha256"):
            if state[key] != mine[key]:
                what = (
                    "the data (index.json) differs" if key == "index_sha256" else f"this loader has {key}={mine[key]!r}"
                )
                raise DataError(f"loader state has {key}={state[key]!r}; {what}")
        self.position, self.handed, self.skipped = int(state["position"]), 0, set(state["skipped"])


def _batch(part: list[tuple[int, np.ndarray]], eos_id: int | None) -> dict:
    """A micro-batch; with ``eos_id`` (document masking) also the inputs' ``position_ids``; of
    scored samples also their ``targets`` (B, seq_len) int64 (0 where not scored) and
    ``loss_mask`` (B, seq_len) float32."""
    ids, samples = zip(*part, strict=True)
    rows = torch.from_numpy(np.stack(samples).astype(np.int64))
    batch = {"tokens": rows, "sample_ids": torch.tensor(ids)}
    if rows.dim() == 3:  # (B, 2, seq_len + 1): ids, targets (-1: not scored)
        targets = rows[:, 1, 1:]
        batch |= {"tokens": rows[:, 0], "targets": targets.clamp(min=0), "loss_mask": (targets >= 0).float()}
    if eos_id is not None:
        batch["position_ids"] = document_positions(batch["tokens"][:, :-1], eos_id)
    return batch


def document_positions(inputs: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B, T) each token's position in its document: a document starts at the sample's first token
    and after every EOS (transformers' ``position_ids`` convention for packed sequences)."""
    T = inputs.shape[1]
    rows = torch.arange(T).expand_as(inputs)
    starts = torch.zeros_like(inputs, dtype=torch.bool)
    starts[:, 0] = True
    starts[:, 1:] = inputs[:, :-1] == eos_id
    first = torch.where(starts, rows, 0).cummax(dim=1).values  # the latest document start so far
    return rows - first


def merge_states(states: list[dict]) -> dict:
    """The job's loader state from every rank's: one position, the union of the skipped shards."""
    if not states:
        raise DataError("merge_states needs at least one state")
    first = states[0]
    for s in states[1:]:
        if {k: v for k, v in s.items() if k != "skipped"} != {k: v for k, v in first.items() if k != "skipped"}:
            raise DataError("loader states of different runs or steps cannot be merged")
    return {**first, "skipped": sorted({name for s in states for name in s["skipped"]})}
