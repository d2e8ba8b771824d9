"""The part ``rng``: each rank's random state, in ``rng/rank{r:05d}.safetensors``."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from sessa_train.checkpoint.format import Layout, Meta

RNG = "rng"


def rng_shard(rank: int) -> str:
    return f"rank{rank:05d}"


class RngState:
    """Part ``rng``: this rank's torch (and CUDA) random state, restored when the checkpoint was
    saved under this very layout (nothing in a step draws random numbers; kept for exactness)."""

    def __init__(self, rank: int, layout: Layout) -> None:
        self.rank, self.layout = rank, layout

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        out = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            out |= {f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
        return {rng_shard(self.rank): out}

    def load_tensors(self, shards: Mapping[str, object], meta: Meta) -> None:
        fh = shards.get(rng_shard(self.rank))
        if meta.layout != self.layout or fh is None:
            return
        torch.set_rng_state(fh.get_tensor("torch"))
        cuda = [fh.get_tensor(k) for k in sorted(fh.keys()) if k.startswith("cuda.")]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
