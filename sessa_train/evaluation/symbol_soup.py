"""SymbolSoup, the paper's synthetic 20-class long-sequence classification task, generated as the
reference repository's ``datasets/SymbolSoup.py`` specifies it (re-implemented from that spec).

An example is a character-level text over the symbols a-p with special tokens:

    <bos> \\n noise0 \\n <sep1> \\n block1 \\n <sep2> \\n noise1
          \\n <sep1> \\n block2 \\n <sep2> \\n noise2 \\n <sep> <label>

Symbols inside a block are separated by spaces; spaces and newlines are tokens. Of the two
stylized blocks one is drawn from one of 4 "left" styles and the other from one of 5 "right"
styles, in random order; the class is left * 5 + right (20 classes). A style is a unigram table
over a shuffled vocabulary (4 primaries weight 3, 4 secondaries 2, the rest 1), preferred bigrams
(weight x (1 + 3)) and motif weights over the 3-5-symbol substrings of a-p (1 + 0.9 per primary
+ 0.5 per secondary symbol); a block takes a motif with probability 0.3 at each step, else a
Markov step, then 3% of its symbols are replaced by another symbol. The noise blocks are uniform.
With M symbols in all, an example has 2 M + 13 tokens; M is uniform over the bounds that keep it
within [min_tokens, max_tokens], the noise takes 0.3-0.6 M of it, split over three blocks.
The style tables come from ``random.Random(123)`` (left) and ``random.Random(456)`` (right) as in
the reference, so the styles are the reference's.

As sessa-train samples (``tasks.Sample``, ``seq_len + 1`` token ids): the example, its class
token, ``<eos>``, then padding; the answer is the prediction made at ``<label>``. At length L an
example spans [2L/3, L - 1] tokens up to ``<label>`` (the reference's default 400-600 has that
ratio). Example i of a seed is generated from its own RNG and is of class i mod 20, so any slice
of a split is balanced and any example can be regenerated alone.
"""

from __future__ import annotations

import math
import random

import numpy as np

N_LEFT, N_RIGHT = 4, 5
N_CLASSES = N_LEFT * N_RIGHT
SYMBOLS = list("abcdefghijklmnop")
BIGRAM_STRENGTH = 3.0
MOTIF_PROB = 0.3
FLIP_PROB = 0.03
SPECIALS = ["<bos>", "<sep1>", "<sep2>", "<sep>", "<label>", "<eos>", "[MASK]"]

# token ids: specials 0-6, space 7, newline 8, symbols 9-24, classes 25-44, padding 45
TOKENS = [*SPECIALS, " ", "\n", *SYMBOLS, *(f"CLASS_{i}" for i in range(N_CLASSES)), "<pad>"]
ID = {t: i for i, t in enumerate(TOKENS)}
CLASS_IDS = np.arange(ID["CLASS_0"], ID["CLASS_0"] + N_CLASSES)
EOS, PAD = ID["<eos>"], ID["<pad>"]
VOCAB_SIZE = 64  # room above the 46 tokens (a multiple of 64, like the other tasks)


def _motifs() -> list[str]:
    return ["".join(SYMBOLS[i : i + n]) for n in (3, 4, 5) for i in range(len(SYMBOLS) - n + 1)]


MOTIFS = _motifs()


def _styles(count: int, seed: int) -> list[tuple[dict[str, float], set[tuple[str, str]], dict[str, float]]]:
    """(unigram weights, preferred bigrams, motif weights) of each style."""
    rng = random.Random(seed)
    styles = []
    for _ in range(count):
        order = SYMBOLS.copy()
        rng.shuffle(order)
        primary, secondary = order[:4], order[4:8]
        unigram = {t: 3.0 for t in primary} | {t: 2.0 for t in secondary} | {t: 1.0 for t in order[8:]}
        bigrams = {(a, primary[(i + 1) % 4]) for i, a in enumerate(primary)} | {(a, a) for a in primary}
        bigrams |= {(b, b) for b in secondary} | {(a, b) for a, b in zip(primary, secondary, strict=True)}
        bigrams |= {(b, a) for a, b in zip(primary, secondary, strict=True)}
        p, s = set(primary), set(secondary)
        motifs = {m: 1.0 + 0.9 * len(set(m) & p) + 0.5 * len(set(m) & s) for m in MOTIFS}
        styles.append((unigram, bigrams, motifs))
    return styles


LEFT, RIGHT = _styles(N_LEFT, 123), _styles(N_RIGHT, 456)


def _draw(rng: random.Random, weights: dict[str, float]) -> str:
    """A key with probability proportional to its weight (cumulative, in the table's order)."""
    r, acc, key = rng.random() * sum(weights.values()), 0.0, None
    for key, w in weights.items():
        acc += w
        if r <= acc:
            return key
    return key


def _stylized(rng: random.Random, length: int, style) -> list[str]:
    unigram, bigrams, motifs = style
    out: list[str] = []
    while len(out) < length:
        left = length - len(out)
        if left >= 3 and rng.random() < MOTIF_PROB:
            fitting = {m: w for m, w in motifs.items() if len(m) <= left}
            out.extend(_draw(rng, fitting))
            continue
        prev = out[-1] if out else None
        weights = unigram if prev is None else {
            t: w * (1.0 + BIGRAM_STRENGTH) if (prev, t) in bigrams else w for t, w in unigram.items()
        }  # fmt: skip
        out.append(_draw(rng, weights))
    return [rng.choice([x for x in SYMBOLS if x != t]) if rng.random() < FLIP_PROB else t for t in out[:length]]


def length_bounds(seq_len: int) -> tuple[int, int]:
    """(min_tokens, max_tokens) of an example up to ``<label>`` at sample length ``seq_len``."""
    return math.ceil(2 * seq_len / 3), seq_len - 1


def example(min_tokens: int, max_tokens: int, label: int, rng: random.Random) -> list[str]:
    """The tokens of one example of class ``label`` up to and including ``<label>``."""
    m_min, m_max = max(5, math.ceil((min_tokens - 13) / 2)), max(5, (max_tokens - 13) // 2)
    if m_min > m_max:
        raise ValueError(f"SymbolSoup cannot fit examples in [{min_tokens}, {max_tokens}] tokens (need >= 23)")
    M = rng.randint(m_min, m_max)
    noise_min = max(3, int(0.3 * M))
    noise = min(max(rng.randint(noise_min, max(noise_min, int(0.6 * M))), 3), M - 2)
    main = M - noise
    if main < 2:
        main, noise = 2, M - 2
    n_left = rng.randint(1, main - 1)
    n0 = rng.randint(1, noise - 2)
    n1 = rng.randint(1, noise - n0 - 1)
    left = _stylized(rng, n_left, LEFT[label // N_RIGHT])
    right = _stylized(rng, main - n_left, RIGHT[label % N_RIGHT])
    first, second = (left, right) if rng.random() < 0.5 else (right, left)
    noise0, noise1, noise2 = ([rng.choice(SYMBOLS) for _ in range(n)] for n in (n0, n1, noise - n0 - n1))

    def spaced(block: list[str]) -> list[str]:
        return [t for s in block for t in (s, " ")][:-1]

    parts = [["<bos>"], noise0, ["<sep1>"], first, ["<sep2>"], noise1, ["<sep1>"], second, ["<sep2>"], noise2]
    tokens = [t for i, part in enumerate(parts) for t in (part if i % 2 == 0 else spaced(part)) + ["\n"]]
    tokens[-1:] = ["\n", "<sep>", " ", "<label>"]
    assert min_tokens <= len(tokens) <= max_tokens, (len(tokens), min_tokens, max_tokens)
    return tokens


def sample_tokens(seq_len: int, seed: int, index: int) -> tuple[np.ndarray, int]:
    """(``seq_len + 1`` token ids, the index of ``<label>``) of example ``index`` of ``seed``."""
    rng = random.Random(f"symbol-soup/{seed}/{index}")
    text = example(*length_bounds(seq_len), index % N_CLASSES, rng)
    ids = np.full(seq_len + 1, PAD, dtype=np.int64)
    ids[: len(text)] = [ID[t] for t in text]
    ids[len(text) : len(text) + 2] = CLASS_IDS[index % N_CLASSES], EOS
    return ids, len(text) - 1
