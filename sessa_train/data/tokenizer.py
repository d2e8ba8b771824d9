"""sentencepiece tokenizer: training, loading, and the checksum shards are tied to.

Training uses identity normalisation, keeps whitespace as is and falls back to bytes, so
``decode(encode(text)) == text`` for any UTF-8 text (newlines included).
Special ids: unk 0, bos 1, eos 2 (sentencepiece's defaults); no pad id.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

from sessa_train.errors import DataError
from sessa_train.files import file_sha256

MODEL_TYPES = ("bpe", "unigram")


def _training_lines(documents: Iterable[str], max_bytes: int) -> Iterator[str]:
    """Non-empty lines of the documents, each cut to ``max_bytes`` of UTF-8."""
    for doc in documents:
        for line in doc.splitlines():
            if line.strip():
                yield line.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")


def train_tokenizer(
    documents: Iterable[str],
    model_path: str | Path,
    *,
    vocab_size: int = 8192,
    model_type: str = "bpe",
    byte_fallback: bool = True,
    max_sentences: int = 2_000_000,
    num_threads: int | None = None,
) -> Path:
    """Train a sentencepiece model and write it to ``model_path`` (a ``.model`` file)."""
    if model_type not in MODEL_TYPES:
        raise DataError(f"model_type must be one of {', '.join(MODEL_TYPES)}, got {model_type!r}")
    if vocab_size < 260 and byte_fallback:
        raise DataError(f"vocab_size must be >= 260 with byte fallback (256 bytes + specials), got {vocab_size}")
    model_path = Path(model_path)
    if model_path.suffix != ".model":
        raise DataError(f"tokenizer model path must end in .model, got {model_path}")
    model_path.parent.mkdir(parents=True, exist_ok=True)
    max_bytes = 4192  # sentencepiece's max_sentence_length: longer lines would be dropped
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_lines(documents, max_bytes),
            model_prefix=str(model_path.with_suffix("")),
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=byte_fallback,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            character_coverage=0.9999,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            max_sentence_length=max_bytes,
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"sentencepiece training failed (vocab_size={vocab_size}): {first}") from None
    model_path.with_suffix(".vocab").unlink(missing_ok=True)
    return model_path


class Tokenizer:
    """A loaded sentencepiece model with the ids the data pipeline needs."""

    def __init__(self, model_path: str | Path) -> None:
        self.path = Path(model_path)
        if not self.path.is_file():
            raise DataError(f"tokenizer model not found: {self.path}")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"tokenizer {self.path} is not a sentencepiece model ({first})") from None
        self.sha256 = file_sha256(self.path)
        self.eos_id = self.sp.eos_id()
        if self.eos_id < 0:
            raise DataError(f"tokenizer {self.path} has no eos id")

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode(list(ids))
