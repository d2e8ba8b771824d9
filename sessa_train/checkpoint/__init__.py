"""Checkpoints: the one place that turns the parts of a run's state into files and back.

- ``format.py``: the folder, the record (``Meta``), the manifest and shards, and the ``Part``
  protocols; it knows nothing of what the parts hold.
- ``manager.py``: ``CheckpointManager`` saves (durably, in the background if asked), finds,
  verifies and loads a run's parts, given the run's ``RunRecord`` once.
- one module per part: ``model.py`` (weights and AdamW moments: shard names, the reader of any
  layout's shards, ``read_weights``), ``rng.py``, ``loader.py``; the metrics sink is a part of
  its own (``trainer/metrics.py``).
"""

from sessa_train.checkpoint.format import (
    DataIdentity,
    Layout,
    Meta,
    Part,
    TensorPart,
    check_files,
    find_checkpoint,
    folder_name,
    read_config,
    read_meta,
    shard_files,
)
from sessa_train.checkpoint.manager import CheckpointManager, RunRecord
from sessa_train.checkpoint.model import MODEL, MOMENTS, ModelState, ParamReader, read_weights

__all__ = [
    "MODEL",
    "MOMENTS",
    "CheckpointManager",
    "DataIdentity",
    "Layout",
    "Meta",
    "ModelState",
    "ParamReader",
    "Part",
    "RunRecord",
    "TensorPart",
    "check_files",
    "find_checkpoint",
    "folder_name",
    "read_config",
    "read_meta",
    "read_weights",
    "shard_files",
]
