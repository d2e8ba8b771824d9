"""A streaming, exactly resumable loader of packed token shards (built on webdataset).

Order. For epoch e the shards of a split are permuted by (seed, e); the samples inside a
shard by (seed, e, shard). Reader slots - one per (data-parallel rank, dataloader worker),
``slot = worker * world_size + rank`` - take every ``n_slots``-th shard of that order.
Each slot reads its shards one after another, runs on into the next epoch when its share
of this one is done, and groups samples into micro-batches. A DataLoader interleaves its
workers' batches round-robin.

State. Progress is kept as *consumed samples per (epoch, shard)* plus the first epoch not
yet finished. A slot's position follows from it (its shards are consumed in order), and it
does not depend on the number of ranks or workers, so:

* resuming with the same layout continues with exactly the batches the uninterrupted run
  would have produced (the round-robin position of each rank's workers is saved too);
* resuming with another data-parallel size or worker count reshards exactly: every sample
  is still seen once per epoch, in a different order. Nothing is repeated or skipped.

Each batch carries the progress it completes; only batches handed to the caller count,
so prefetching workers never advance the saved state. Ranks save their own
``state_dict()``; ``merge_states`` combines them for the checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from sessa_train.data.shards import ShardError, load_index, read_shard
from sessa_train.errors import DataError

log = logging.getLogger(__name__)
STATE_VERSION = 1
Progress = dict[int, dict[int, int]]  # epoch -> shard -> consumed samples


def _permutation(n: int, *key: int) -> np.ndarray:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(key)))).permutation(n)


class _SlotStream(IterableDataset):
    """The micro-batches of the slots a process (or each of its DataLoader workers) reads."""

    def __init__(self, loader: PackedTokenLoader, progress: Progress, start_epoch: int, rotation: int) -> None:
        self.loader, self.progress, self.start_epoch, self.rotation = loader, progress, start_epoch, rotation

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        logical = (physical + self.rotation) % self.loader.workers
        yield from self._batches(logical)

    def _shards_of(self, slot: int, epoch: int) -> np.ndarray:
        """This slot's shards of epoch ``epoch``, in reading order (empty if slots > shards)."""
        ld = self.loader
        order = _permutation(len(ld.shards), ld.seed, epoch) if ld.shuffle else np.arange(len(ld.shards))
        return order[slot :: ld.n_slots]

    def _samples(self, slot: int) -> Iterator[tuple[int, int, int, np.ndarray | None, int]]:
        """(epoch, shard, consumed after this sample, tokens, sample id) in this slot's order.

        A corrupt shard skipped on request yields one (epoch, shard, count, None, -1).
        """
        ld = self.loader
        epoch = self.start_epoch
        while ld.max_epochs is None or epoch < ld.max_epochs:
            done = self.progress.get(epoch, {})
            for shard in map(int, self._shards_of(slot, epoch)):
                count = ld.shards[shard]["samples"]
                start = done.get(shard, 0)
                if start >= count:
                    continue
                samples = ld.read(shard)
                if samples is None:  # a corrupt shard skipped on request: counted as consumed
                    yield epoch, shard, count, None, -1
                    continue
                order = _permutation(count, ld.seed, epoch, shard) if ld.shuffle else range(count)
                for i in range(start, count):
                    j = int(order[i])
                    yield epoch, shard, i + 1, samples[j], ld.sample_base[shard] + j
            epoch += 1

    def _batches(self, logical: int) -> Iterator[dict]:
        ld = self.loader
        slot = logical * ld.world_size + ld.rank
        rows, ids, updates, skipped = [], [], {}, []
        for epoch, shard, consumed, tokens, sample_id in self._samples(slot):
            updates[(epoch, shard)] = consumed
            if tokens is None:
                skipped.append(ld.shards[shard]["name"])
                continue
            rows.append(tokens)
            ids.append(sample_id)
            if len(rows) == ld.micro_batch_size:
                yield self._batch(rows, ids, updates, skipped, logical)
                rows, ids, updates, skipped = [], [], {}, []
        if rows or updates:  # finite (max_epochs) mode: the last, possibly short, batch
            yield self._batch(rows, ids, updates, skipped, logical)

    @staticmethod
    def _batch(rows: list, ids: list, updates: dict, skipped: list[str], logical: int) -> dict:
        """A micro-batch plus what the main process records when it is consumed."""
        tokens = torch.from_numpy(np.stack(rows).astype(np.int64)) if rows else torch.zeros(0, 0, dtype=torch.int64)
        return {
            "tokens": tokens,
            "sample_ids": torch.tensor(ids, dtype=torch.int64),
            "_progress": [(e, s, c) for (e, s), c in updates.items()],
            "_skipped": skipped,
            "_worker": logical,
        }


class PackedTokenLoader:
    """Micro-batches ``{"tokens": (B, seq_len + 1) int64, "sample_ids": (B,)}`` of one split.

    ``max_epochs=None`` streams forever (training); an integer stops after that many epochs
    (validation, tests), the last batch of each slot possibly short.
    """

    def __init__(
        self,
        data_dir: str | Path,
        split: str = "train",
        *,
        micro_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        max_epochs: int | None = None,
        skip_corrupt: bool = False,
        tokenizer_path: str | Path | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.index = load_index(self.data_dir, tokenizer_path)
        if split not in self.index["splits"]:
            raise DataError(f"split {split!r} not in {self.data_dir}; valid: {', '.join(self.index['splits'])}")
        if micro_batch_size < 1 or num_workers < 0 or not 0 <= rank < world_size:
            raise DataError(
                f"bad loader layout: micro_batch_size={micro_batch_size}, num_workers={num_workers}, "
                f"rank={rank}, world_size={world_size}"
            )
        self.split, self.micro_batch_size, self.seed, self.shuffle = split, micro_batch_size, seed, shuffle
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.workers = max(1, num_workers)
        self.n_slots = world_size * self.workers
        self.max_epochs, self.skip_corrupt = max_epochs, skip_corrupt
        self.shards = self.index["splits"][split]["shards"]
        if max_epochs is None and len(self.shards) < self.n_slots:  # an endless reader needs a shard
            raise DataError(
                f"split {split!r} of {self.data_dir} has {len(self.shards)} shards, fewer than the "
                f"{world_size} ranks x {self.workers} workers = {self.n_slots} readers; write smaller shards"
            )
        self.sample_base = np.concatenate([[0], np.cumsum([s["samples"] for s in self.shards])[:-1]]).tolist()
        self.skipped_shards: list[str] = []
        self._progress: Progress = {}
        self._start_epoch = 0
        self._next_worker = 0

    def read(self, shard: int) -> list[np.ndarray] | None:
        """The samples of one shard in file order; None for a corrupt shard when skip_corrupt."""
        entry = self.shards[shard]
        path = self.data_dir / entry["name"]
        try:
            return read_shard(path, entry["samples"], self.index["sample_tokens"], self.index["dtype"])
        except ShardError as e:
            if not self.skip_corrupt:
                raise
            log.warning("skipping corrupt shard (skip_corrupt=True): %s", e)
            return None

    def __iter__(self) -> Iterator[dict]:
        stream = _SlotStream(
            self, {e: dict(d) for e, d in self._progress.items()}, self._start_epoch, self._next_worker
        )
        batches = (
            iter(DataLoader(stream, batch_size=None, num_workers=self.num_workers, persistent_workers=False))
            if self.num_workers
            else iter(stream)
        )
        for batch in batches:
            for epoch, shard, consumed in batch.pop("_progress"):
                self._progress.setdefault(epoch, {})[shard] = consumed
            self.skipped_shards += batch.pop("_skipped")
            self._next_worker = (batch.pop("_worker") + 1) % self.workers
            self._prune()
            if len(batch["tokens"]):
                yield batch

    def _prune(self) -> None:
        """Drop epochs every shard of which is consumed (they are before _start_epoch)."""
        counts = [s["samples"] for s in self.shards]
        while all(self._progress.get(self._start_epoch, {}).get(i, 0) >= c for i, c in enumerate(counts)):
            self._progress.pop(self._start_epoch, None)
            self._start_epoch += 1

    def state_dict(self) -> dict:
        """This rank's part of the loader state (JSON-serialisable)."""
        return {
            "version": STATE_VERSION,
            "split": self.split,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "shards": [s["name"] for s in self.shards],
            "start_epoch": self._start_epoch,
            "progress": {str(e): {str(s): c for s, c in d.items()} for e, d in self._progress.items()},
            "layout": {"world_size": self.world_size, "workers": self.workers},
            "next_worker": {str(self.rank): self._next_worker},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore from ``merge_states`` of every rank's state (or one rank's, with one rank)."""
        for key, mine in (
            ("version", STATE_VERSION),
            ("split", self.split),
            ("seed", self.seed),
            ("shuffle", self.shuffle),
        ):
            if state.get(key) != mine:
                raise DataError(f"loader state has {key}={state.get(key)!r}, this loader has {key}={mine!r}")
        if state["shards"] != [s["name"] for s in self.shards]:
            raise DataError(f"loader state was saved for other shards than those listed in {self.data_dir}")
        if len(state["next_worker"]) != state["layout"]["world_size"]:
            raise DataError(
                f"loader state holds {len(state['next_worker'])} of {state['layout']['world_size']} ranks' "
                "states: pass merge_states() of all of them"
            )
        self._start_epoch = int(state["start_epoch"])
        self._progress = {int(e): {int(s): int(c) for s, c in d.items()} for e, d in state["progress"].items()}
        same_layout = state["layout"] == {"world_size": self.world_size, "workers": self.workers}
        self._next_worker = int(state["next_worker"][str(self.rank)]) if same_layout else 0
        if not same_layout:
            log.info(
                "loader resharded from %s to world_size=%d, workers=%d: every sample once per epoch, new order",
                state["layout"],
                self.world_size,
                self.workers,
            )
        self._prune()


def merge_states(states: list[dict]) -> dict:
    """Combine the per-rank states of one step into the state of the whole job."""
    if not states:
        raise DataError("merge_states needs at least one state")
    first = states[0]
    for s in states[1:]:
        for key in ("version", "split", "seed", "shuffle", "shards", "layout"):
            if s[key] != first[key]:
                raise DataError(f"loader states of different runs: {key} differs ({s[key]!r} vs {first[key]!r})")
    progress: dict[str, dict[str, int]] = {}
    for s in states:
        for e, d in s["progress"].items():
            merged = progress.setdefault(e, {})
            for shard, c in d.items():
                merged[shard] = max(merged.get(shard, 0), c)
    start = min(s["start_epoch"] for s in states)
    progress = {e: d for e, d in progress.items() if int(e) >= start}
    next_worker = {r: w for s in states for r, w in s["next_worker"].items()}
    return {**first, "start_epoch": start, "progress": progress, "next_worker": next_worker}
