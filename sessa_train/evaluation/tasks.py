"""Synthetic long-context tasks, written from their descriptions, deterministic from a seed.

Every sample is ``seq_len + 1`` tokens over a 64-token vocabulary (the model reads tokens[:-1]
and predicts tokens[1:]); ``answers`` are the target indices j whose token tokens[j + 1] is
the task's answer (predictable; MQAR's are labels instead), everything else is context or
unpredictable filler.

    ids 0-3: SEP, NEEDLE, QUERY, CLS     4-19: keys     20-35: values     36-63: filler

``recall``   multi-query associative recall: n key-value pairs, filler, then QUERY key -> value
             for every pair in a shuffled order (answers: the values after the queries)
``needle``   needle in a haystack: filler with NEEDLE key value at distance ``lag`` before the
             final QUERY key -> value (one answer)
``symbol_soup``
             the paper's 20-class SymbolSoup as the reference repository specifies it, with its
             own token ids (``symbol_soup.py``; one answer: the class after ``<label>``)
``mqar``     Zoology's multi-query associative recall over its own vocabulary (``mqar.py``,
             ``vocab`` ids, 8192 by default; answers: the value recalled at each query, a label
             only, not the next token: ``Sample.labels``)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sessa_train.evaluation import mqar as mqar_task
from sessa_train.evaluation.symbol_soup import EOS as SOUP_EOS
from sessa_train.evaluation.symbol_soup import sample_tokens as symbol_soup_sample

VOCAB_SIZE = 64
SEP, NEEDLE, QUERY, CLS = 0, 1, 2, 3
KEYS = np.arange(4, 20)
VALUES = np.arange(20, 36)
FILLER = np.arange(36, 64)
TASKS = ("recall", "needle", "symbol_soup", "mqar")
EOS_ID = {"recall": SEP, "needle": SEP, "symbol_soup": SOUP_EOS, "mqar": 0}


@dataclass(frozen=True)
class Sample:
    tokens: np.ndarray  # (seq_len + 1,) int64
    answers: list[int]  # target indices j: the prediction made at j is scored
    labels: list[int] | None = None  # each answer's label where it is not in the input (MQAR)

    @property
    def expected(self) -> np.ndarray:
        """The answers' values, in the order of ``answers``: ``labels``, else the next tokens."""
        return np.asarray(self.labels if self.labels is not None else self.tokens[np.asarray(self.answers) + 1])


def _rng(task: str, seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([TASKS.index(task), seed, index])


def recall(seq_len: int, seed: int, index: int, pairs: int = 8) -> Sample:
    if seq_len < 5 * pairs:
        raise ValueError(f"recall needs seq_len >= {5 * pairs} for {pairs} pairs, got {seq_len}")
    rng = _rng("recall", seed, index)
    keys = rng.choice(KEYS, pairs, replace=False)
    values = rng.choice(VALUES, pairs)
    tokens = rng.choice(FILLER, seq_len + 1)
    tokens[0 : 2 * pairs : 2], tokens[1 : 2 * pairs : 2] = keys, values
    order = rng.permutation(pairs)
    start = seq_len + 1 - 3 * pairs
    answers = []
    for i, p in enumerate(order):
        at = start + 3 * i
        tokens[at : at + 3] = QUERY, keys[p], values[p]
        answers.append(at + 1)  # the prediction made at the key's position is the value
    return Sample(tokens.astype(np.int64), answers)


def needle(seq_len: int, seed: int, index: int, lag: int | None = None) -> Sample:
    """``lag`` None: drawn uniformly from [3, seq_len - 3] per sample (for training)."""
    rng = _rng("needle", seed, index)
    if lag is None:
        lag = int(rng.integers(3, seq_len - 2))
    if not 3 <= lag <= seq_len - 3:
        raise ValueError(f"needle lag must be in [3, seq_len - 3] = [3, {seq_len - 3}], got {lag}")
    tokens = rng.choice(FILLER, seq_len + 1)
    key, value = rng.choice(KEYS), rng.choice(VALUES)
    end = seq_len  # QUERY key value occupy end-2, end-1, end
    tokens[end - 2 : end + 1] = QUERY, key, value
    at = end - lag  # the needle's value sits `lag` tokens before the query's value
    tokens[at - 2 : at + 1] = NEEDLE, key, value
    return Sample(tokens.astype(np.int64), [end - 1])


def symbol_soup(seq_len: int, seed: int, index: int) -> Sample:
    """The paper's SymbolSoup (``symbol_soup.py``): 20 classes, the answer after ``<label>``."""
    tokens, label_at = symbol_soup_sample(seq_len, seed, index)
    return Sample(tokens, [label_at])


def mqar(seq_len: int, seed: int, index: int, **kwargs) -> Sample:
    """Zoology's MQAR (``mqar.py``; ``pairs``, ``power_a``, ``vocab``)."""
    tokens, queries, values = mqar_task.sample(seq_len, seed, index, **kwargs)
    return Sample(tokens, queries, values)


def vocab_size(task: str, **kwargs) -> int:
    return kwargs.get("vocab", mqar_task.VOCAB) if task == "mqar" else VOCAB_SIZE


def make(task: str, seq_len: int, seed: int, index: int, **kwargs) -> Sample:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid: {', '.join(TASKS)}")
    makers = {"recall": recall, "needle": needle, "symbol_soup": symbol_soup, "mqar": mqar}
    return makers[task](seq_len, seed, index, **kwargs)


def write_task_shards(
    task: str,
    out_dir: str | Path,
    *,
    seq_len: int,
    train: int,
    val: int,
    seed: int,
    samples_per_shard: int = 1000,
    scored: bool = False,
    **kwargs,
) -> dict:
    """Train and val samples (val uses seed + 1) as sessa-train shards; returns the index. With
    ``scored`` each sample carries its answers as targets, the only ones the loss counts."""
    from sessa_train.data.shards import write_sample_shards

    def written(sample: Sample):
        if not scored:
            return sample.tokens
        targets = np.full(len(sample.tokens), -1)
        targets[np.asarray(sample.answers) + 1] = sample.expected  # answer j scores the prediction made at j
        return sample.tokens, targets

    def split(n: int, s: int):
        return (written(make(task, seq_len, s, i, **kwargs)) for i in range(n))

    return write_sample_shards(
        {"train": split(train, seed), "val": split(val, seed + 1)},
        out_dir,
        seq_len=seq_len,
        vocab_size=vocab_size(task, **kwargs),
        eos_id=EOS_ID[task],
        samples_per_shard=samples_per_shard,
        scored=scored,
    )
