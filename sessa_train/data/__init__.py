"""Data pipeline: tokenizers (sentencepiece, Hugging Face), webdataset shards of packed tokens,
the resumable loader. The names below load on first use, so that the data CLIs answer --help
without importing torch."""

import importlib

_EXPORTS = {
    "BlendedLoader": "blend",
    "merge_loader_states": "blend",
    "PackedTokenLoader": "loader",
    "StopRequestedError": "loader",
    "default_slots": "loader",
    "document_positions": "loader",
    "merge_states": "loader",
    "ShardError": "shards",
    "find_tokenizer": "shards",
    "load_index": "shards",
    "write_shards": "shards",
    "Tokenizer": "tokenizer",
    "train_tokenizer": "tokenizer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sessa_train.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"sessa_train.data.{_EXPORTS[name]}"), name)
