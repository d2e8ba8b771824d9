"""Several shard sets blended with weights: every global batch takes a fixed share of each.

Source s gets n_s of the G samples of every step, the weights' shares of G rounded by largest
remainder (so each step's mix is the weights' within 1/G, and so is the whole run's). Each
source is read by its own ``PackedTokenLoader`` with a global batch of n_s and its own reader
slots, so the blend inherits what that loader guarantees: the same global batches under any
data-parallel size, exact resume, checksums and skipping. A rank takes its n_s / DP samples of
every source per step (sources in order), and cuts them into its micro-batches.

Sample ids are global over the blend: source s's ids are offset by the samples of the sources
before it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from sessa_train.data.loader import PackedTokenLoader, merge_states
from sessa_train.errors import DataError

STATE_VERSION = 1


def apportion(weights: list[float], total: int) -> list[int]:
    """Integers summing to ``total`` in proportion to ``weights`` (largest remainder)."""
    exact = [w / sum(weights) * total for w in weights]
    counts = [int(x) for x in exact]
    for i in sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])[: total - sum(counts)]:
        counts[i] += 1
    return counts


class BlendedLoader:
    """Micro-batches ``{"tokens", "sample_ids"}`` (and ``"targets"``, ``"loss_mask"`` where a source is
    scored: the others' next tokens, every one counted) of the train split of several shard sets; the
    interface of ``PackedTokenLoader`` (iterate, ``advance``, ``rewind``, state) for the trainer."""

    def __init__(
        self,
        sources: list[tuple[float, str | Path]],
        *,
        micro_batch_size: int,
        global_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        slots: list[int] | None = None,
        **common,
    ) -> None:
        counts = apportion([w for w, _ in sources], global_batch_size)
        for (w, path), n in zip(sources, counts, strict=True):
            if n == 0 or n % world_size:
                raise DataError(
                    f"data.blend gives {path} (weight {w}) {n} of the {global_batch_size} samples of a step, which "
                    f"does not split over {world_size} data-parallel ranks; raise its weight or "
                    "schedule.global_batch_size"
                )
        if slots is not None and len(slots) != len(sources):
            raise DataError(f"a blend of {len(sources)} shard sets cannot resume reader slots {slots}")
        self.weights, self.counts = [w for w, _ in sources], counts
        self.loaders = [
            PackedTokenLoader(
                path,
                "train",
                micro_batch_size=n // world_size,  # this rank's whole share of the source per step
                global_batch_size=n,
                slots=slots[i] if slots else None,
                rank=rank,
                world_size=world_size,
                **common,
            )
            for i, ((_, path), n) in enumerate(zip(sources, counts, strict=True))
        ]
        first = self.loaders[0].index
        for ld in self.loaders[1:]:
            for key in ("seq_len", "tokenizer_sha256", "dtype"):
                if ld.index[key] != first[key]:
                    raise DataError(
                        f"data.blend: {ld.data_dir} has {key}={ld.index[key]}, {self.loaders[0].data_dir} has "
                        f"{first[key]}; blended shard sets must share the tokenizer and sequence length"
                    )
        self.index = first | {"vocab_size": max(ld.index["vocab_size"] for ld in self.loaders)}
        blend = [[w, ld.index_sha256] for w, ld in zip(self.weights, self.loaders, strict=True)]
        self.index_sha256 = hashlib.sha256(repr(blend).encode()).hexdigest()  # the blend's identity
        self.slots = [ld.slots for ld in self.loaders]
        self.base = np.cumsum([0] + [ld.total_samples for ld in self.loaders]).tolist()
        self.micro_batch_size = micro_batch_size
        self.steps = 0  # trained steps (``advance``), for the per-source token counts

    @property
    def skipped(self) -> set[str]:
        return {f"{ld.data_dir}/{name}" for ld in self.loaders for name in ld.skipped}

    def source_tokens(self) -> dict[str, int]:
        """Tokens each source has given the run's trained steps, by its path."""
        tokens = self.index["sample_tokens"]
        return {str(ld.data_dir): self.steps * n * tokens for ld, n in zip(self.loaders, self.counts, strict=True)}

    def __iter__(self) -> Iterator[dict]:
        streams = [iter(ld) for ld in self.loaders]
        while True:
            parts = [next(s) for s in streams]  # each source's share of this rank's step
            if any("targets" in p for p in parts):  # an unscored source: the next tokens, every one scored
                for p in parts:
                    p.setdefault("targets", p["tokens"][:, 1:])
                    p.setdefault("loss_mask", torch.ones(p["targets"].shape))
            joined = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
            joined["sample_ids"] = torch.cat(
                [p["sample_ids"] + base for p, base in zip(parts, self.base, strict=False)]
            )
            for i in range(0, len(joined["sample_ids"]), self.micro_batch_size):
                part = slice(i, i + self.micro_batch_size)
                yield {key: value[part] for key, value in joined.items()}

    def advance(self) -> None:
        for ld in self.loaders:
            ld.advance()
        self.steps += 1

    def rewind(self) -> None:
        for ld in self.loaders:
            ld.rewind()

    def state_dict(self) -> dict:
        states = [ld.state_dict() for ld in self.loaders]
        return {"version": STATE_VERSION, "blend": states, "weights": self.weights, "slots": self.slots}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION or "blend" not in state:
            raise DataError("the checkpoint's loader state is not a blend's; this run blends shard sets (data.blend)")
        if state["weights"] != self.weights or len(state["blend"]) != len(self.loaders):
            raise DataError(f"the checkpoint blended with weights {state['weights']}; this run has {self.weights}")
        for ld, s in zip(self.loaders, state["blend"], strict=True):
            ld.load_state_dict(s)
        self.steps = state["blend"][0]["position"] // self.loaders[0].per_slot


def merge_loader_states(states: list[dict]) -> dict:
    """The job's loader state from every rank's, a blend's or a single loader's."""
    if "blend" not in states[0]:
        return merge_states(states)
    merged = [merge_states([s["blend"][i] for s in states]) for i in range(len(states[0]["blend"]))]
    return states[0] | {"blend": merged}
