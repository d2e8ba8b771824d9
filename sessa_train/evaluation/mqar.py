"""Multi-query associative recall (MQAR), as Zoology specifies it (Arora et al. 2023,
arXiv 2312.04927; HazyResearch/zoology ``zoology/data/associative_recall.py``), re-implemented
from that specification.

An example of length L with N key-value pairs over a vocabulary of V ids:

    inputs   k1 v1 k2 v2 ... kN vN | the rest: each key once, as a query, at an even offset 2g after
                                     the pairs; every other position a random id of [0, V)
    labels   only at the queries: the value the key was paired with

- keys are N distinct ids of [1, V/2), values N distinct ids of [V/2, V): disjoint halves;
- the query gaps g are N distinct draws of [0, (L - 2N) / 2) with probability proportional to
  ``power_a * (g + 1) ** (power_a - 1)`` (Zoology's power law: most queries come soon after the
  pairs, a long tail far from them; ``power_a`` 1 is uniform);
- only the values recalled at the queries are scored ("answers"), and, as in Zoology, a recalled
  value is a label only: the input after a query is a random id like any other. Were the value
  there (the next token, as a language model reads text), each answered query would show its value
  to the later ones, and a model could answer the last query by elimination, the values not yet
  answered: a Transformer learnt exactly that here (accuracy 1.0 / 0.49 / 0.35 / 0.26 on the
  fourth / third / second / first query) and stayed there instead of learning to recall.

As sessa-train samples (``tasks.Sample``: ``seq_len + 1`` ids, the model reads tokens[:-1]), an
example is written with its own targets (``scored`` shards: the trainer scores the answers
only, against the labels). Example i of a seed comes from its own RNG, so any example can be
regenerated alone.
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
) -> tuple[np.ndarray, list[int], list[int]]:
    """(``seq_len + 1`` input ids, the queries' positions j in order, the value each recalls: the
    label of the prediction made at j)."""
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
    tokens[queries] = keys
    order = np.argsort(queries)
    return tokens.astype(np.int64), queries[order].tolist(), values[order].tolist()
