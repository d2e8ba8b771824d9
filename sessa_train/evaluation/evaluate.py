"""Task accuracy by sequence length / lag and validation perplexity (python -m sessa_train.evaluation.report)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from sessa_train.evaluation.tasks import make
from sessa_train.models import SessaLM
from sessa_train.models.plan import scored_sum


@torch.no_grad()
def task_accuracy(
    model: SessaLM, task: str, seq_len: int, *, samples: int, seed: int, batch_size: int = 16, **kwargs
) -> float:
    """Fraction of answers predicted exactly (argmax) over ``samples`` generated samples."""
    model.eval()
    correct = total = 0
    for first in range(0, samples, batch_size):
        batch = [make(task, seq_len, seed, i, **kwargs) for i in range(first, min(samples, first + batch_size))]
        tokens = torch.stack([torch.as_tensor(s.tokens) for s in batch])
        predicted = model(tokens[:, :-1]).argmax(dim=-1)
        for row, sample in enumerate(batch):
            answers = torch.tensor(sample.answers)
            correct += int((predicted[row, answers] == torch.as_tensor(sample.expected)).sum())
            total += len(sample.answers)
    return correct / total


@torch.no_grad()
def perplexity(model: SessaLM, shards: str | Path, *, batches: int, batch_size: int = 8) -> tuple[float, float]:
    """(mean loss, perplexity) over the first ``batches`` validation batches of a shard directory
    (of scored shards: over their scored targets)."""
    from sessa_train.data import PackedTokenLoader

    loader = PackedTokenLoader(
        shards, "val", micro_batch_size=batch_size, rank=0, world_size=1, seed=0, shuffle=False, max_epochs=1
    )
    model.eval()
    loss_sum, count = 0.0, 0
    for i, batch in enumerate(loader):
        if i == batches:
            break
        tokens = batch["tokens"]
        targets = batch.get("targets", tokens[:, 1:])  # scored shards: their own, where loss_mask says
        per_token = model(tokens[:, :-1], targets=targets)
        total, scored = scored_sum(per_token, batch.get("loss_mask"))
        loss_sum, count = loss_sum + total.item(), count + scored
    if count == 0:
        raise ValueError(f"{shards} has no validation samples")
    mean = loss_sum / count
    return mean, math.exp(min(mean, 50.0))
