"""Where the rows of one forward sit in their sequences, and the decode state a model keeps.

``Positions`` travels with the hidden states through every layer: the index of the first row
(a context-parallel rank's offset, or the tokens a decode cache already holds) and the number of
rows. ``DecodeCache`` is the state of prefill + token-by-token decoding: one entry per layer
(each layer's own ``init_cache``) and the positions filled, the same for every row of the batch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Positions:
    """Rows ``start .. start + length - 1`` of every sequence of the batch."""

    start: int
    length: int

    def arange(self, device: torch.device) -> torch.Tensor:
        """(length,) the rows' indices in the sequence."""
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
    """The decode state of a whole model: ``layers`` (each layer's cache, in order) and the
    positions already filled."""

    layers: list
    length: int = 0

    @property
    def max_len(self) -> int | None:
        """Positions the caches hold (None: recurrent states of a fixed size, no limit)."""
        sizes = [c.max_len for c in self.layers if isinstance(c, TimeCache)]
        return min(sizes) if sizes else None

    def positions(self, tokens: int) -> Positions:
        """The positions of ``tokens`` new tokens: a prefill into an empty cache, then one at a time."""
        if self.length > 0 and tokens != 1:
            raise ValueError(f"decode takes one token at a time after prefill, got {tokens} tokens")
        if self.max_len is not None and self.length + tokens > self.max_len:
            raise ValueError(f"cache overflow: {self.length} + {tokens} tokens > max_len={self.max_len}")
        return Positions(self.length, tokens)

    def reserve(self, tokens: int) -> None:
        """Room for ``tokens`` more positions (the time-indexed caches are grown, at least doubled)."""
        if self.max_len is None or self.length + tokens <= self.max_len:
            return
        size = max(self.length + tokens, 2 * self.max_len)
        self.layers = [c.grown(size, self.length) if isinstance(c, TimeCache) else c for c in self.layers]
