"""Data pipeline: sentencepiece tokenizer, webdataset shards of packed tokens, resumable loader."""

from sessa_train.data.blend import BlendedLoader, merge_loader_states
from sessa_train.data.loader import (
    PackedTokenLoader,
    StopRequestedError,
    default_slots,
    document_positions,
    merge_states,
)
from sessa_train.data.shards import ShardError, find_tokenizer, load_index, write_shards
from sessa_train.data.tokenizer import Tokenizer, train_tokenizer

__all__ = [
    "BlendedLoader",
    "PackedTokenLoader",
    "ShardError",
    "StopRequestedError",
    "Tokenizer",
    "default_slots",
    "document_positions",
    "find_tokenizer",
    "load_index",
    "merge_loader_states",
    "merge_states",
    "train_tokenizer",
    "write_shards",
]
