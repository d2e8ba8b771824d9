"""The part ``loader``: the job's data position (``data/loader.py``), in the record only."""

from __future__ import annotations

from sessa_train import distributed as comm
from sessa_train.data import merge_loader_states
from sessa_train.errors import DataError


class LoaderState:
    """Part ``loader``: the job's data position, one for every rank (the skipped shards of all)."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def state_dict(self) -> dict:
        return merge_loader_states(comm.all_gather_objects(self.loader.state_dict()))

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)

    @staticmethod
    def slots(state: dict):
        """The reader slots a saved state was read with (a list for a blend): a run keeps them."""
        return state["slots"]

    @staticmethod
    def check_sources(state: dict, weights: list[float] | None, name: str) -> None:
        """A run keeps its blend (``weights``; None: one data.path) and its weights for its lifetime."""
        if state.get("weights") != weights:
            was = f"a blend with weights {state['weights']}" if "weights" in state else "one data.path"
            now = f"data.blend with weights {weights}" if weights else "one data.path"
            raise DataError(f"{name} was read from {was}; this run has {now}")
