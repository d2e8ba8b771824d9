"""The runner interface: how one optimizer step's micro-batches go forward and backward.

    run(batches, n, forward_only=False) -> (2,) float64 tensor [loss sum, token count]

runs ``n`` micro-batches of ``batches`` (dicts with "tokens" (B, T + 1), "position_ids" (B, T)
of packed documents under ``data.document_masking``, and of scored shards "targets" (B, T), which
replace the next tokens, and "loss_mask" (B, T), Megatron-LM's: only the targets it flags count)
through this rank's
part of the model; unless ``forward_only`` it leaves the step's gradients, reduced over the
data-parallel ranks, for DeepSpeed's ``step()``. The sums are this rank's share, counted so that
their sum over every rank of the job counts each token once. Two implementations:
``EngineRunner`` (below: the whole model on every rank, DeepSpeed's engine, ZeRO 0-3) and
``parallel.pipeline.PipelineRunner`` (tensor/pipeline/context parallelism, megatron-core's schedule).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch

from sessa_train.models.plan import scored_sum
from sessa_train.parallel.state import ParallelState


class Runner(Protocol):
    def run(self, batches: Iterator[dict], n: int, forward_only: bool = False) -> torch.Tensor: ...


class EngineRunner:
    """Micro-batches through the DeepSpeed engine. Each backward takes its loss sum times
    ``ParallelState.step_weight`` (so that DeepSpeed's average over the data-parallel ranks is the
    step's mean over every scored token of the global batch); the last is the accumulation
    boundary, where DeepSpeed reduces gradients."""

    def __init__(self, engine, device: torch.device, state: ParallelState) -> None:
        self.engine, self.device, self.state = engine, device, state

    def run(self, batches: Iterator[dict], n: int, forward_only: bool = False) -> torch.Tensor:
        micro = [next(batches) for _ in range(n)]
        weight = 1.0 if forward_only else self.state.step_weight(micro)
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for i, batch in enumerate(micro):
            tokens = batch["tokens"].to(self.device)
            positions = batch.get("position_ids")
            if not forward_only:
                self.engine.set_gradient_accumulation_boundary(i == n - 1)
            targets = batch["targets"].to(self.device) if "targets" in batch else tokens[:, 1:]
            per_token = self.engine(
                tokens[:, :-1],
                targets=targets,
                position_ids=None if positions is None else positions.to(self.device),
            )
            loss_sum, count = scored_sum(per_token, batch.get("loss_mask"))
            if not forward_only:
                self.engine.backward(loss_sum * weight)
            total[0] += loss_sum.detach().double()
            total[1] += count
        return total
