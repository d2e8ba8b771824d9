"""The synthetic main job: loss must fall far below chance, and bad CLI input is refused."""

from __future__ import annotations

import math

import pytest

from sessa_train.config import ModelConfig
from sessa_train.train_synthetic import copy_batch, main, train


def test_copy_batch_targets_are_the_copied_tokens():
    import torch

    ids, targets = copy_batch(3, 5, 10, torch.Generator().manual_seed(0))
    assert ids.shape == (3, 11) and bool((ids[:, 5] == 0).all())
    assert torch.equal(targets[:, 5:10], ids[:, :5])
    assert bool((targets[:, :5] == -100).all()) and bool((targets[:, 10] == -100).all())


def test_tiny_model_learns_the_copy_task():
    cfg = ModelConfig(vocab_size=12, d_model=32, n_layers=2, n_heads=2, feedback_chunk_size=16)
    losses = train(cfg, steps=120, batch_size=16, copy_len=8, lr=3e-3, seed=0)
    assert abs(losses[0] - math.log(11)) < 0.5  # starts near chance
    assert sum(losses[-10:]) / 10 < 0.6 * losses[0]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--steps", "0"], "must be a positive integer, got 0"),
        (["--vocab-size", "2"], "--vocab-size must be >= 3"),
        (["--d-model", "30", "--n-heads", "4"], "d_model=30 must be divisible by model.n_heads=4"),
        (["--backend", "gpu"], "invalid choice: 'gpu'"),
    ],
)
def test_bad_arguments_exit_with_a_one_line_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
