"""Zoology's multi-query associative recall (``evaluation/mqar.py``): the layout of an example,
the disjoint vocabularies, the power-law placement of the queries against an independent
sampler, and accuracy counted at the recalled values only."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from sessa_train.evaluation.mqar import power_law, sample
from sessa_train.evaluation.tasks import make


def test_an_example_is_pairs_then_each_key_queried_once_with_its_value_a_label_only():
    """Read back by hand: N pairs of a key below V/2 and a value from V/2, then each key exactly
    once at an even offset after them; each query's label is its own key's value, and that value
    is not the input after the query (a random id, as Zoology writes it): over 50 examples the
    input after a query equals its value no more often than chance."""
    seq_len, pairs, vocab = 64, 4, 200
    shown = 0
    for index in range(50):
        tokens, queries, labels = sample(seq_len, 3, index, pairs=pairs, vocab=vocab)
        assert tokens.shape == (seq_len + 1,) and tokens.min() >= 0 and tokens.max() < vocab
        keys, values = tokens[0 : 2 * pairs : 2].tolist(), tokens[1 : 2 * pairs : 2].tolist()
        assert len(set(keys)) == pairs and all(1 <= k < vocab // 2 for k in keys)
        assert len(set(values)) == pairs and all(vocab // 2 <= v < vocab for v in values)
        value_of = dict(zip(keys, values, strict=True))
        assert len(queries) == pairs and queries == sorted(queries)
        assert all(j >= 2 * pairs and (j - 2 * pairs) % 2 == 0 and j + 1 <= seq_len - 1 for j in queries)
        assert sorted(tokens[j] for j in queries) == sorted(keys)  # each key queried once
        assert labels == [value_of[tokens[j]] for j in queries]
        shown += sum(int(tokens[j + 1] == value_of[tokens[j]]) for j in queries)
    assert shown <= 2  # 200 queries, a 1 in 200 chance each
    s = make("mqar", seq_len, 3, 0, pairs=pairs, vocab=vocab)
    assert s.answers == sample(seq_len, 3, 0, pairs=pairs, vocab=vocab)[1] and s.expected.tolist() == s.labels
    a, b = sample(seq_len, 3, 7, pairs=pairs, vocab=vocab), sample(seq_len, 3, 7, pairs=pairs, vocab=vocab)
    assert np.array_equal(a[0], b[0]) and a[1:] == b[1:]  # an example regenerates alone
    assert not np.array_equal(a[0], sample(seq_len, 4, 7, pairs=pairs, vocab=vocab)[0])  # another seed


def test_scored_shards_hold_the_labels_at_the_queries_only(tmp_path):
    """``write_task_shards(..., scored=True)``: each written example's targets are -1 but after
    each query, where they hold its label; the loader gives them as targets and loss_mask."""
    from sessa_train.data import PackedTokenLoader
    from sessa_train.evaluation.tasks import write_task_shards

    write_task_shards("mqar", tmp_path, seq_len=32, train=6, val=2, seed=2, pairs=4, vocab=64, scored=True)
    batch = next(iter(PackedTokenLoader(tmp_path, micro_batch_size=6, shuffle=False, max_epochs=1)))
    for i in range(6):
        s = make("mqar", 32, 2, i, pairs=4, vocab=64)
        assert batch["tokens"][i].tolist() == s.tokens.tolist()
        assert batch["loss_mask"][i].nonzero().flatten().tolist() == s.answers
        assert batch["targets"][i, s.answers].tolist() == s.labels


def _inclusion(draw, space: int, pairs: int, n: int) -> np.ndarray:
    counts = np.zeros(space)
    for i in range(n):
        for g in draw(i):
            counts[g] += 1
    return counts / n


@pytest.mark.parametrize("power_a", [0.01, 0.5, 1.0])
def test_query_gaps_follow_zoologys_power_law(power_a):
    """How often each gap holds a query, over 3000 examples, against an independent sampler of
    the same law (sequential weighted draws without replacement, Python's random) within 4
    standard errors; and 1.0 is uniform: every gap pairs/space of the time."""
    seq_len, pairs, n = 64, 4, 3000
    space = (seq_len - 2 * pairs) // 2
    weights = [power_a * (g + 1) ** (power_a - 1) for g in range(space)]
    assert np.allclose(power_law(space, power_a), np.array(weights) / sum(weights))

    def ours(i):
        _, answers, _ = sample(seq_len, 0, i, pairs=pairs, vocab=256, power_a=power_a)
        return [(j - 2 * pairs) // 2 for j in answers]

    rng = random.Random(1)

    def reference(_):
        left, out = list(range(space)), []
        for _ in range(pairs):
            g = rng.choices(left, [weights[x] for x in left])[0]
            left.remove(g)
            out.append(g)
        return out

    got, want = _inclusion(ours, space, pairs, n), _inclusion(reference, space, pairs, n)
    se = np.sqrt(np.maximum(want * (1 - want), 1 / n) / n) * np.sqrt(2)
    assert np.all(np.abs(got - want) <= 4 * se), np.round(np.stack([got, want]), 3)
    if power_a == 1.0:
        assert np.allclose(got, pairs / space, atol=4 * np.sqrt(pairs / space / n))
    else:  # most queries early: the first gap far more often than the last
        assert got[0] > 3 * got[-1]


def test_bad_sizes_are_refused_naming_the_bound():
    with pytest.raises(ValueError, match=r"even seq_len >= 4 x pairs, got seq_len=30, pairs=8"):
        sample(30, 0, 0, pairs=8)
    with pytest.raises(ValueError, match=r"vocab > seq_len"):
        sample(64, 0, 0, pairs=4, vocab=64)


class _Oracle(torch.nn.Module):
    """Logits that predict, at every position, the true next token of the examples it was built
    from (at the queries their labels), except where ``wrong`` says (those predict another id)."""

    def __init__(self, samples, vocab: int, wrong) -> None:
        super().__init__()
        self.samples, self.vocab, self.wrong = samples, vocab, wrong
        self.served = 0

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(*tokens.shape, self.vocab)
        for row in range(tokens.shape[0]):
            s = self.samples[self.served + row]
            target = torch.as_tensor(s.tokens[1:]).clone()
            target[s.answers] = torch.as_tensor(s.expected)
            for j in self.wrong(s):
                target[j] = (target[j] + 1) % self.vocab
            out[row, torch.arange(tokens.shape[1]), target] = 1.0
        self.served += tokens.shape[0]
        return out


def test_accuracy_counts_the_recalled_values_only():
    """``task_accuracy`` on MQAR: right at every answer and wrong everywhere else is 1.0; right
    everywhere but the answers is 0.0; one answer of each example wrong is 1 - 1/pairs."""
    from sessa_train.evaluation.evaluate import task_accuracy

    n, seq_len, pairs, vocab = 10, 32, 4, 100
    samples = [make("mqar", seq_len, 5, i, pairs=pairs, vocab=vocab) for i in range(n)]

    def accuracy(wrong) -> float:
        model = _Oracle(samples, vocab, wrong)
        return task_accuracy(model, "mqar", seq_len, samples=n, seed=5, batch_size=3, pairs=pairs, vocab=vocab)

    assert accuracy(lambda s: [j for j in range(seq_len) if j not in s.answers]) == 1.0
    assert accuracy(lambda s: s.answers) == 0.0
    assert accuracy(lambda s: s.answers[:1]) == pytest.approx(1 - 1 / pairs)


def test_a_row_keeps_the_best_rate_per_cell_and_its_accuracy_recounts(tmp_path, capsys):
    """``sessa-mqar-row`` end to end on a tiny cell, two learning rates: the row keeps the rate of
    the higher held-out accuracy; that accuracy recounts one example at a time from the kept run's
    checkpoint; the tables and the plot are written; run again, it trains nothing."""
    from sessa_train.evaluation.mqar_row import TEST_SEED, main
    from sessa_train.evaluation.report import load_model

    args = ["transformer", "16", "--cells", "16:2", "--lrs", "3e-3", "3e-2", "--test", "40",
            "--data", str(tmp_path / "data"), "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "out"),
            "schedule.train_steps=12", "schedule.warmup_steps=2", "logging.every_steps=1",
            "model.vocab_size=64"]  # fmt: skip
    assert main(args) == 0
    row = json.loads((tmp_path / "out" / "results.json").read_text())[0]
    cell = row["cells"]["16x2"]
    by_lr = {float(lr): r["accuracy"] for lr, r in cell["by_lr"].items()}
    assert by_lr.keys() == {3e-3, 3e-2} and cell["lr"] == max(by_lr, key=by_lr.get)
    model = load_model(tmp_path / "runs" / f"transformer-d16-16x2-lr{cell['lr']:g}" / "checkpoints")
    assert row["parameters"] == model.num_parameters() and model.cfg.vocab_size == 64
    right = total = 0
    with torch.no_grad():
        for i in range(40):
            s = make("mqar", 16, TEST_SEED, i, pairs=2, vocab=64)
            tokens = torch.as_tensor(s.tokens)
            predicted = model(tokens[None, :-1])[0].argmax(-1)
            right += sum(int(predicted[j] == v) for j, v in zip(s.answers, s.labels, strict=True))
            total += len(s.answers)
    assert cell["accuracy"] == pytest.approx(right / total, abs=1.01 / total)  # a near tie may flip one
    table = (tmp_path / "out" / "results.md").read_text().splitlines()
    assert table[0] == "| row | parameters | 16x2: accuracy (lr) | minutes |"
    assert table[2].startswith(f"| transformer-d16 | {row['parameters']:,} | {cell['accuracy']:.3f} ({cell['lr']:g}) |")
    assert (tmp_path / "out" / "accuracy.png").stat().st_size > 5_000
    capsys.readouterr()
    assert main(args) == 0 and "training " not in capsys.readouterr().out  # finished runs are kept
    again = json.loads((tmp_path / "out" / "results.json").read_text())[0]
    assert again["seconds"] == row["seconds"] == sum(r["train_seconds"] for r in cell["by_lr"].values())
    assert main([*args, "schedule.warmup_steps=3"]) == 2  # a kept run of another recipe is not reused
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was trained with schedule.warmup_steps=2, this row asks for 3" in err[0], err


def test_a_bad_cell_or_sweep_is_one_line(capsys):
    from sessa_train.evaluation.mqar_row import main

    assert main(["transformer", "16", "--cells", "30:8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cell '30:8': MQAR needs an even length >= 4 x pairs" in err[0], err
    assert main(["transformer", "16", "--lrs", "0"]) == 2
    assert "--lrs must be positive" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # an override right after the rates: argparse's one-line usage error
        main(["transformer", "16", "--lrs", "1e-3", "schedule.train_steps=10"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "'schedule.train_steps=10' is not a learning rate; put key=value overrides before --lrs or after --" in err


def test_a_cell_as_long_as_the_vocabulary_takes_the_next_power_of_two():
    from sessa_train.evaluation.mqar_row import cell_vocab

    assert [cell_vocab(256, n) for n in (64, 128, 255, 256, 300, 512)] == [256, 256, 256, 512, 512, 1024]
    assert cell_vocab(8192, 256) == 8192


def test_perplexity_of_scored_shards_counts_their_labels_only(tmp_path):
    """``evaluate.perplexity`` over scored MQAR shards: the mean cross-entropy of the predictions
    at the queries against their labels, recomputed here example by example."""
    import torch.nn.functional as F

    from sessa_train.config import ModelConfig
    from sessa_train.evaluation.evaluate import perplexity
    from sessa_train.evaluation.tasks import write_task_shards
    from sessa_train.models import SessaLM

    write_task_shards("mqar", tmp_path, seq_len=32, train=2, val=6, seed=2, pairs=4, vocab=64, scored=True)
    torch.manual_seed(0)
    model = SessaLM(ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2))
    loss, _ = perplexity(model, tmp_path, batches=3, batch_size=2)
    want = []
    with torch.no_grad():
        for i in range(6):  # the validation split: seed + 1
            s = make("mqar", 32, 3, i, pairs=4, vocab=64)
            logits = model(torch.as_tensor(s.tokens)[None, :-1])[0]
            want += F.cross_entropy(logits[s.answers], torch.as_tensor(s.labels), reduction="none").tolist()
    assert loss == pytest.approx(sum(want) / len(want), rel=1e-5)
