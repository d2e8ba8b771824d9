"""Synthetic tasks, task accuracy, the Transformer baseline and the memory-tail diagnostic."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from sessa_train import ModelConfig, SessaLM
from sessa_train.evaluation import tasks
from sessa_train.evaluation.evaluate import task_accuracy
from sessa_train.evaluation.memory_tail import fit_power_law, fits, influence_by_lag
from sessa_train.evaluation.report import write_outputs


def solve_by_rule(task: str, tokens: np.ndarray, answer: int) -> int:
    """The answer token (tokens[answer + 1]) from the context before it, by a hand-written rule."""
    seen = tokens[: answer + 1]
    if task == "recall":  # the value that followed this key in the pair list at the start
        key = seen[-1]
        pairs = dict(zip(seen[0:16:2].tolist(), seen[1:16:2].tolist(), strict=True))
        return pairs[int(key)]
    if task == "needle":  # the value after NEEDLE key
        key = seen[-1]
        at = next(i for i in range(len(seen) - 2) if seen[i] == tasks.NEEDLE and seen[i + 1] == key)
        return int(seen[at + 2])
    raise AssertionError(f"no rule for {task}")


@pytest.mark.parametrize(("task", "kwargs"), [("recall", {}), ("needle", {"lag": 40}), ("needle", {})])
def test_generators_are_deterministic_and_solvable_by_rule(task, kwargs):
    for index in range(50):
        a, b = tasks.make(task, 96, 7, index, **kwargs), tasks.make(task, 96, 7, index, **kwargs)
        assert np.array_equal(a.tokens, b.tokens) and a.answers == b.answers
        assert a.tokens.shape == (97,) and a.tokens.min() >= 0 and a.tokens.max() < tasks.VOCAB_SIZE
        for answer in a.answers:
            assert solve_by_rule(task, a.tokens, answer) == a.tokens[answer + 1]
    other = tasks.make(task, 96, 8, 0, **kwargs)
    assert not np.array_equal(other.tokens, tasks.make(task, 96, 7, 0, **kwargs).tokens)


def test_needle_sits_at_the_requested_lag():
    s = tasks.needle(100, 0, 3, lag=57)
    query_value, needle_value = 100, 100 - 57
    assert s.tokens[query_value - 2] == tasks.QUERY and s.tokens[needle_value - 2] == tasks.NEEDLE
    assert s.tokens[query_value] == s.tokens[needle_value]


def test_bad_task_arguments_are_one_line_errors():
    with pytest.raises(ValueError, match=r"needle lag must be in \[3, seq_len - 3\] = \[3, 61\], got 62"):
        tasks.make("needle", 64, 0, 0, lag=62)
    with pytest.raises(ValueError, match="unknown task 'copy'; valid: recall, needle, symbol_soup"):
        tasks.make("copy", 64, 0, 0)


class Oracle(torch.nn.Module):
    """Predicts tokens by looking them up in the generated samples (cheats on purpose)."""

    def __init__(self, task: str, seq_len: int, seed: int, shift: int = 0) -> None:
        super().__init__()
        self.samples = [tasks.make(task, seq_len, seed, i).tokens for i in range(64)]
        self.shift = shift

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        rows = [next(s for s in self.samples if np.array_equal(s[:-1], x.numpy())) for x in inputs]
        nxt = torch.as_tensor(np.stack(rows))[:, 1:]
        return torch.nn.functional.one_hot((nxt + self.shift) % tasks.VOCAB_SIZE, tasks.VOCAB_SIZE).float()


def test_task_accuracy_counts_answers_only():
    assert task_accuracy(Oracle("recall", 64, 3), "recall", 64, samples=20, seed=3, batch_size=6) == 1.0
    assert task_accuracy(Oracle("recall", 64, 3, shift=1), "recall", 64, samples=20, seed=3) == 0.0


def test_eval_report_has_a_row_per_model_and_point(tmp_path):
    rows = [
        {"model": m, "task": "recall", "seq_len": n, "accuracy": a}
        for m, a in (("sessa", 0.5), ("tf", 0.25))
        for n in (64, 128)
    ]
    rows.append({"model": "sessa", "task": "val", "loss": 2.0, "perplexity": 7.39})
    table = write_outputs(rows, "recall", tmp_path)
    lines = table.splitlines()
    assert lines[0] == "| seq_len | sessa | tf |" and lines[2] == "| 64 | 0.500 | 0.250 |"
    assert "validation (sessa): loss 2.0000, perplexity 7.39" in table
    assert (tmp_path / "accuracy.png").stat().st_size > 1000 and (tmp_path / "eval.json").is_file()
    assert any((tmp_path / "tb").iterdir())


def test_transformer_baseline_matches_the_parameter_budget_and_decodes_exactly():
    cfg = ModelConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4)
    sessa, tf = SessaLM(cfg), SessaLM(dataclasses.replace(cfg, arch="transformer"))
    count = lambda m: sum(p.numel() for n, p in m.named_parameters() if n.startswith("layers"))  # noqa: E731
    assert abs(count(tf) - count(sessa)) / count(sessa) < 0.02
    ids = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(0))
    tf = tf.double().eval()
    with torch.no_grad():
        full = tf(ids)
        cache = tf.init_cache(2, 20)
        steps = [tf(ids[:, :5], cache)[:, -1]] + [tf(ids[:, t : t + 1], cache)[:, -1] for t in range(5, 20)]
    assert (torch.stack(steps, 1) - full[:, 4:]).abs().max() < 1e-10


@pytest.mark.parametrize("arch", ["sessa", "transformer"])
def test_memory_tail_equals_finite_differences(arch):
    torch.manual_seed(0)
    model = SessaLM(ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, arch=arch)).double()
    tokens = torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(1))
    influence = influence_by_lag(model, tokens, targets=[9, 11])
    x = model.embed(tokens).detach()
    eps = 1e-6
    for lag in (0, 3, 9):
        norms = []
        for t in (9, 11):
            jac = torch.zeros(2, 16, 16, dtype=torch.float64)
            for j in range(16):  # column j of each sample's Jacobian d h_t / d x_{t-lag}
                bump = torch.zeros_like(x)
                bump[:, t - lag, j] = eps
                with torch.no_grad():
                    plus = model.layers["1"](model.layers["0"](x + bump))[:, t]
                    minus = model.layers["1"](model.layers["0"](x - bump))[:, t]
                jac[:, :, j] = (plus - minus) / (2 * eps)
            norms.append(jac.flatten(1).norm(dim=1).mean())
        assert abs(influence[lag].item() - torch.stack(norms).mean().item()) < 1e-6 * influence[lag].item() + 1e-9


def test_power_law_fit_recovers_the_exponent():
    lags = torch.arange(0, 200, dtype=torch.float64).clamp_min(1)
    beta, c = fit_power_law(3.0 * lags**-0.7, 4, 150)
    assert abs(beta - 0.7) < 1e-9 and abs(c - np.log(3.0)) < 1e-9


def test_the_residuals_tell_a_power_law_from_an_exponential_tail():
    lags = torch.arange(0, 200, dtype=torch.float64).clamp_min(1)
    power, exponential = fits(3.0 * lags**-0.7, 4, 150), fits(2.0 * torch.exp(-0.05 * lags), 4, 150)
    assert abs(power["beta"] - 0.7) < 1e-9 and power["rms_power"] < 1e-9 < 0.1 < power["rms_exp"]
    assert abs(exponential["lambda"] - 0.05) < 1e-9 and abs(exponential["c_exp"] - np.log(2.0)) < 1e-9
    assert exponential["rms_exp"] < 1e-9 < 0.1 < exponential["rms_power"]
