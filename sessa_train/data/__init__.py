"""Data pipeline: sentencepiece tokenizer, webdataset shards of packed tokens, resumable loader."""

from sessa_train.data.loader import PackedTokenLoader, merge_states
from sessa_train.data.shards import ShardError, load_index, write_shards
from sessa_train.data.tokenizer import Tokenizer, train_tokenizer

__all__ = [
    "PackedTokenLoader",
    "ShardError",
    "Tokenizer",
    "load_index",
    "merge_states",
    "train_tokenizer",
    "write_shards",
]
