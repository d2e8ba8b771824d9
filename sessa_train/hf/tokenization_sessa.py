"""transformers tokenizer of a sessa-train export whose tokenizer is a sentencepiece model (copied
into the export folder; ``AutoTokenizer.from_pretrained(export, trust_remote_code=True)``).

It encodes with the export's own ``tokenizer.model`` and nothing else (no BOS added, no extra
normalisation or whitespace clean-up), so its ids are the ones the model was trained on. An export
whose tokenizer is a Hugging Face ``tokenizer.json`` needs no code: transformers' own fast
tokenizer reads it.
"""

from __future__ import annotations

import os
import shutil

import sentencepiece as spm
from transformers import PreTrainedTokenizer


class SessaSentencePieceTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "tokenizer.model"}  # noqa: RUF012 (transformers' class attribute)
    model_input_names = ["input_ids", "attention_mask"]  # noqa: RUF012

    def __init__(self, vocab_file: str, **kwargs) -> None:
        self.vocab_file = vocab_file
        self.sp = spm.SentencePieceProcessor(model_file=vocab_file)
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        super().__init__(**kwargs)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def get_vocab(self) -> dict[str, int]:
        return {self.sp.id_to_piece(i): i for i in range(self.vocab_size)} | dict(self.added_tokens_encoder)

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return self.sp.encode(text, out_type=str)

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp.id_to_piece(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """sentencepiece's text of the pieces; special tokens (EOS, ...) as their own text, which
        sentencepiece would drop (tools such as lm-eval stop on the EOS's text)."""
        out, pieces = "", []
        for token in tokens:
            if token in self.all_special_tokens:
                out += self.sp.decode_pieces(pieces) + token
                pieces = []
            else:
                pieces.append(token)
        return out + self.sp.decode_pieces(pieces)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        name = (filename_prefix + "-" if filename_prefix else "") + "tokenizer.model"
        out = os.path.join(save_directory, name)
        if os.path.abspath(out) != os.path.abspath(self.vocab_file):
            shutil.copyfile(self.vocab_file, out)
        return (out,)
