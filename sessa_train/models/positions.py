"""Where the rows of one forward sit in their sequences and documents, and the decode state a
model keeps.

``Positions`` travels with the hidden states through every layer: the index of the first row in
the sequence (a context-parallel rank's offset, or the tokens a decode cache already holds), the
number of rows and, for packed samples, each row's document. Documents follow transformers'
packing convention: ``position_ids`` restart at 0 at each document start
(``DataCollatorWithFlattening``); a row t whose position is p belongs to the document that starts
at index t - p, and reads keys of that document only (forward attention: doc_start..t, feedback
solve: doc_start..t-1); RoPE takes p. Without restarts nothing is masked (the fast path).

``DecodeCache`` is the state of prefill + token-by-token decoding: one entry per layer (each
layer's own ``init_cache``), the positions filled (the same for every row of the batch) and where
each row's current document started (left padding and EOS in a prompt start one).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


def document_starts(position_ids: torch.Tensor, first: int = 0) -> torch.Tensor:
    """(B, T) index in the sequence of each row's document start, for rows ``first ..`` whose
    positions in their documents are ``position_ids`` (B, T). ValueError unless positions count up
    by one from 0 within each document."""
    if position_ids.dim() != 2 or position_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"position_ids must be integers of shape (batch, seq), got {position_ids.dtype} "
                         f"{tuple(position_ids.shape)}")  # fmt: skip
    rows = torch.arange(first, first + position_ids.shape[1], device=position_ids.device)
    starts = rows - position_ids
    steps = position_ids[:, 1:]
    if bool((position_ids < 0).any() | (starts < 0).any()) or bool(
        ((steps != 0) & (steps != position_ids[:, :-1] + 1)).any()
    ):
        raise ValueError("position_ids must restart at 0 at each document and count up by 1 within it, got "
                         f"{position_ids[0, :16].tolist()}...")  # fmt: skip
    return starts


def positions_of(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, eos_id: int | None = None
) -> torch.Tensor | None:
    """transformers' ``position_ids`` (B, T) of a batch: every padding token (attention_mask 0) is a
    document of its own (left or right padding: real tokens never read one), real tokens count from
    each row's first one, and with ``eos_id`` (a model trained with document masking) a document
    also starts after every EOS. None when that is one document per row from position 0."""
    T = input_ids.shape[1]
    rows = torch.arange(T, device=input_ids.device).expand_as(input_ids)
    starts = torch.zeros_like(input_ids, dtype=torch.bool)
    starts[:, 0] = True
    if attention_mask is not None:
        real = attention_mask.to(torch.bool)
        starts[:, 1:] |= ~real[:, :-1]  # after a padding token
        starts |= ~real  # a padding token
    if eos_id is not None:
        starts[:, 1:] |= input_ids[:, :-1] == eos_id
    if bool(starts[:, 1:].any()):
        return rows - torch.where(starts, rows, 0).cummax(dim=1).values
    return None


@dataclass(frozen=True)
class Positions:
    """Rows ``start .. start + length - 1`` of every sequence of the batch; ``rope`` (B, T): their
    positions in their documents (None: ``start ..``); ``doc_start`` (B, T): the index of each row's
    document start (None: 0, one document)."""

    start: int
    length: int
    rope: torch.Tensor | None = None
    doc_start: torch.Tensor | None = None

    @classmethod
    def of(cls, start: int, length: int, position_ids: torch.Tensor | None) -> Positions:
        """The rows' positions from transformers' ``position_ids`` of these rows (None: one document)."""
        if position_ids is None:
            return cls(start, length)
        if position_ids.shape[-1] != length:
            raise ValueError(f"position_ids hold {position_ids.shape[-1]} positions for {length} tokens")
        starts = document_starts(position_ids, start)
        if not bool(starts.any()):  # one document from the start of the sequence: nothing to mask
            return cls(start, length)
        return cls(start, length, position_ids, starts)

    def arange(self, device: torch.device) -> torch.Tensor:
        """(length,) or (B, length): the rows' RoPE positions."""
        if self.rope is not None:
            return self.rope
        return torch.arange(self.start, self.start + self.length, device=device)


@dataclass
class TimeCache:
    """Per-layer tensors preallocated to ``max_len`` positions along dim 2 (B, heads, time, width)."""

    @property
    def max_len(self) -> int:
        return getattr(self, dataclasses.fields(self)[0].name).shape[2]

    def grown(self, max_len: int, length: int) -> TimeCache:
        """A copy with room for ``max_len`` positions holding the first ``length`` of these."""
        out = {}
        for f in dataclasses.fields(self):
            old = getattr(self, f.name)
            new = old.new_zeros(*old.shape[:2], max_len, *old.shape[3:])
            new[:, :, :length] = old[:, :, :length]
            out[f.name] = new
        return type(self)(**out)


@dataclass
class DecodeCache:
    """The decode state of a whole model: ``layers`` (each layer's cache, in order), the positions
    already filled and ``doc_start`` (B,), where each row's current document starts (None: 0)."""

    layers: list
    length: int = 0
    doc_start: torch.Tensor | None = None

    @property
    def max_len(self) -> int | None:
        """Positions the caches hold (None: recurrent states of a fixed size, no limit)."""
        sizes = [c.max_len for c in self.layers if isinstance(c, TimeCache)]
        return min(sizes) if sizes else None

    def positions(self, tokens: int, position_ids: torch.Tensor | None) -> Positions:
        """The positions of ``tokens`` new tokens: a prefill into an empty cache, then one at a
        time; without ``position_ids`` a row continues its current document."""
        if self.length > 0 and tokens != 1:
            raise ValueError(f"decode takes one token at a time after prefill, got {tokens} tokens")
        if self.max_len is not None and self.length + tokens > self.max_len:
            raise ValueError(f"cache overflow: {self.length} + {tokens} tokens > max_len={self.max_len}")
        if position_ids is None and self.doc_start is not None:  # the rows' documents go on
            position_ids = (self.length - self.doc_start).unsqueeze(1)
        if self.length == 0 or position_ids is None:
            pos = Positions.of(self.length, tokens, position_ids)
        else:  # one token: a new document (position 0) or the next position of the current one
            starts = self.length - position_ids
            current = self.doc_start if self.doc_start is not None else torch.zeros_like(starts[:, 0])
            if bool(((starts[:, 0] != self.length) & (starts[:, 0] != current)).any()):
                raise ValueError(f"position_ids {position_ids[:, 0].tolist()} neither continue each row's document "
                                 f"nor start a new one at {self.length}")  # fmt: skip
            pos = Positions(self.length, 1, position_ids, starts) if bool(starts.any()) else Positions(self.length, 1)
        self.doc_start = None if pos.doc_start is None else pos.doc_start[:, -1]
        return pos

    def reserve(self, tokens: int) -> None:
        """Room for ``tokens`` more positions (the time-indexed caches are grown, at least doubled)."""
        if self.max_len is None or self.length + tokens <= self.max_len:
            return
        size = max(self.length + tokens, 2 * self.max_len)
        self.layers = [c.grown(size, self.length) if isinstance(c, TimeCache) else c for c in self.layers]
