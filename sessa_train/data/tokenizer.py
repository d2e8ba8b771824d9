"""Tokenizers: sentencepiece models (``.model``) and Hugging Face ``tokenizers`` files
(``tokenizer.json``), trained, loaded and checksummed the same way.

sentencepiece training uses identity normalisation, keeps whitespace as is and falls back to
bytes, so ``decode(encode(text)) == text`` for any UTF-8 text (newlines included); its special
ids are unk 0, bos 1, eos 2, no pad id. ``kind="hf-bpe"`` trains a byte-level BPE with the
``tokenizers`` library (GPT-2's byte alphabet, ``<|endoftext|>`` as EOS), which is what Llama 3,
GPT-NeoX and Mistral ship as a ``tokenizer.json``. A ``tokenizer.json`` from elsewhere works too:
its EOS is the ``eos_token`` of a ``tokenizer_config.json`` beside it, else the first of the usual
names it knows (``EOS_NAMES``).
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from sessa_train.errors import DataError
from sessa_train.files import file_sha256

MODEL_TYPES = ("bpe", "unigram")  # sentencepiece's
KINDS = ("sentencepiece", "hf-bpe")
HF_EOS = "<|endoftext|>"
EOS_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>")


def _training_lines(documents: Iterable[str], max_bytes: int) -> Iterator[str]:
    """Non-empty lines of the documents, each cut to ``max_bytes`` of UTF-8."""
    for doc in documents:
        for line in doc.splitlines():
            if line.strip():
                yield line.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")


def _nonempty(lines: Iterator[str]) -> Iterator[str]:
    """``lines``, or a one-line error when there is no text at all to train on."""
    first = next(lines, None)
    if first is None:
        raise DataError("the tokenizer's input holds no text (every document is empty): give it a corpus")
    return itertools.chain([first], lines)


def train_tokenizer(
    documents: Iterable[str],
    model_path: str | Path,
    *,
    vocab_size: int = 8192,
    model_type: str = "bpe",
    byte_fallback: bool = True,
    max_sentences: int = 2_000_000,
    num_threads: int | None = None,
    kind: str = "sentencepiece",
) -> Path:
    """Train a tokenizer on ``documents`` and write it to ``model_path``: a sentencepiece
    ``.model``, or with ``kind="hf-bpe"`` a byte-level BPE ``.json`` (``tokenizers``)."""
    if kind not in KINDS:
        raise DataError(f"tokenizer kind {kind!r}; valid: {', '.join(KINDS)}")
    model_path = Path(model_path)
    suffix = ".json" if kind == "hf-bpe" else ".model"
    if model_path.suffix != suffix:
        raise DataError(f"a {kind} tokenizer's path must end in {suffix}, got {model_path}")
    if kind == "hf-bpe":
        return _train_byte_level_bpe(documents, model_path, vocab_size)
    if model_type not in MODEL_TYPES:
        raise DataError(f"model_type must be one of {', '.join(MODEL_TYPES)}, got {model_type!r}")
    if vocab_size < 260 and byte_fallback:
        raise DataError(f"vocab_size must be >= 260 with byte fallback (256 bytes + specials), got {vocab_size}")
    import sentencepiece as spm

    model_path.parent.mkdir(parents=True, exist_ok=True)
    max_bytes = 4192  # sentencepiece's max_sentence_length: longer lines would be dropped
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_nonempty(_training_lines(documents, max_bytes)),
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


def _train_byte_level_bpe(documents: Iterable[str], path: Path, vocab_size: int) -> Path:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise DataError(f"vocab_size must be >= 257 for a byte-level BPE (256 bytes + EOS), got {vocab_size}")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[HF_EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_nonempty(iter(d for d in documents if d)), trainer=trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


class Tokenizer:
    """A loaded tokenizer with the ids the data pipeline needs: ``kind`` (sentencepiece or
    huggingface), ``eos_id``, ``bos_id`` (None if it has none), ``vocab_size`` (every id it can
    emit is below it), ``sha256`` of its file and the name an export or checkpoint gives the file
    (``file_name``)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"tokenizer model not found: {self.path}")
        self.sha256 = file_sha256(self.path)
        if self.path.suffix == ".json":
            self._load_huggingface()
        else:
            self._load_sentencepiece()

    def _load_sentencepiece(self) -> None:
        import sentencepiece as spm

        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"tokenizer {self.path} is not a sentencepiece model ({first})") from None
        self.kind, self.file_name, self.hf = "sentencepiece", "tokenizer.model", None
        self.eos_id = self.sp.eos_id()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        if self.eos_id < 0:
            raise DataError(f"tokenizer {self.path} has no eos id")
        self.vocab_size = self.sp.get_piece_size()

    def _load_huggingface(self) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self.hf = HFTokenizer.from_file(str(self.path))
        except Exception as e:  # tokenizers raises its own Exception type for a bad file
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"tokenizer {self.path} is not a Hugging Face tokenizer.json ({first})") from None
        self.kind, self.file_name, self.sp = "huggingface", "tokenizer.json", None
        self.eos_token = self._eos_token()
        self.eos_id = self.hf.token_to_id(self.eos_token)
        self.bos_id = None
        # the id space, not the count: a tokenizer.json may number its tokens sparsely (ids past
        # 65535 with few tokens), and shards, embeddings and range checks need every id below it
        self.vocab_size = max(self.hf.get_vocab(with_added_tokens=True).values(), default=-1) + 1

    def _eos_token(self) -> str:
        config = self.path.with_name("tokenizer_config.json")
        if config.is_file():
            try:
                settings = json.loads(config.read_text())
            except ValueError:
                settings = None
            eos = settings.get("eos_token") if isinstance(settings, dict) else None
            eos = eos.get("content") if isinstance(eos, dict) else eos
            if isinstance(eos, str) and self.hf.token_to_id(eos) is not None:
                return eos
        for name in EOS_NAMES:
            if self.hf.token_to_id(name) is not None:
                return name
        raise DataError(
            f"tokenizer {self.path} has none of the EOS tokens {', '.join(EOS_NAMES)} and no tokenizer_config.json "
            "naming its eos_token beside it"
        )

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.sp is not None:
            return self.sp.encode(texts)
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        ids = list(ids)
        return self.sp.decode(ids) if self.sp is not None else self.hf.decode(ids, skip_special_tokens=False)

    def token(self, index: int) -> str:
        """The piece or token of an id."""
        return self.sp.id_to_piece(index) if self.sp is not None else self.hf.id_to_token(index)
