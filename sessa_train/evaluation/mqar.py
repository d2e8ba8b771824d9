"""Multi-query associative recall (MQAR), as Zoology specifies it (Arora et al. 2023,
arXiv 2312.04927; HazyResearch/zoology ``zoology/data/associative_recall.py``), re-implemented
from that specification.

An example of length L with N key-value pairs over a vocabulary of V ids:

    k1 v1 k2 v2 ... kN vN | the rest: each key once, as a query, at an even offset 2g after the
                            pairs; the value it recalls is the next token; every other position
                            a random id of [0, V)

- keys are N distinct ids of [1, V/2), values N distinct ids of [V/2, V): disjoint halves;
- the query gaps g are N distinct draws of [0, (L - 2N) / 2) with probability proportional to
  ``power_a * (g + 1) ** (power_a - 1)`` (Zoology's power law: most queries come soon after the
  pairs, a long tail far from them; ``power_a`` 1 is uniform);
- only the values after the queries are scored ("answers").

As sessa-train samples (``tasks.Sample``: ``seq_len + 1`` ids, the model reads tokens[:-1] and
predicts tokens[1:]), the recalled value stands in the sequence right after its query, where
Zoology keeps it as a label only: the prediction made at the query's position is scored. Because
queries sit at even offsets only, a recalled value never takes another query's place, and each
key is queried once, so no value seen after a query helps another. Example i of a seed comes
from its own RNG, so any example can be regenerated alone.
"""

from __future__ import annotations

import numpy as np

VOCAB = 8192  # Zoology's default


def power_law(space: int, power_a: float) -> np.ndarray:
    """P(gap = g) for g in [0, space): ``power_a * (g + 1) ** (power_a - 1)``, normalised."""
    p = power_a * np.arange(1, space + 1, dtype=np.float64) ** (power_a - 1)
    return p / p.sum()


def fits(seq_len: int, pairs: int) -> bool:
    """Zoology's bound on a length: even, with room for the pairs and as many query slots."""
    return seq_len % 2 == 0 and pairs >= 1 and 4 * pairs <= seq_len


def check(seq_len: int, pairs: int, vocab: int) -> None:
    """Zoology's bounds: ``fits``, and enough ids."""
    if not fits(seq_len, pairs):
        raise ValueError(f"mqar needs an even seq_len >= 4 x pairs, got seq_len={seq_len}, pairs={pairs}")
    if vocab <= seq_len or vocab // 2 - 1 < pairs:
        raise ValueError(f"mqar needs vocab > seq_len and vocab / 2 - 1 >= pairs, got vocab={vocab}")


def sample(
    seq_len: int, seed: int, index: int, *, pairs: int, power_a: float = 0.01, vocab: int = VOCAB
) -> tuple[np.ndarray, list[int]]:
    """(``seq_len + 1`` token ids, answer indices j: tokens[j + 1] is a recalled value)."""
    check(seq_len, pairs, vocab)
    rng = np.random.default_rng([0x4D514152, seed, index])  # "MQAR"
    half = vocab // 2
    keys = rng.choice(np.arange(1, half), pairs, replace=False)
    values = rng.choice(np.arange(half, vocab), pairs, replace=False)
    tokens = rng.integers(0, vocab, seq_len + 1)  # the non-query positions: random ids
    context = 2 * pairs
    tokens[0:context:2], tokens[1:context:2] = keys, values
    space = (seq_len - context) // 2
    gaps = rng.choice(space, pairs, replace=False, p=power_law(space, power_a))
    queries = context + 2 * gaps
    tokens[queries], tokens[queries + 1] = keys, values
    return tokens.astype(np.int64), sorted(int(q) for q in queries)
