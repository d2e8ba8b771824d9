"""The runner interface: how one optimizer step's micro-batches go forward and backward.

    run(batches, n, forward_only=False) -> (2,) float64 tensor [loss sum, token count]

runs ``n`` micro-batches of ``batches`` (dicts with "tokens" (B, T + 1), and "position_ids" (B, T)
of packed documents under ``data.document_masking``) through this rank's
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


class Runner(Protocol):
    def run(self, batches: Iterator[dict], n: int, forward_only: bool = False) -> torch.Tensor: ...


class EngineRunner:
    """Micro-batches through the DeepSpeed engine: each loss is the mean over its tokens divided
    by ``n``; the last backward is the accumulation boundary, where DeepSpeed reduces gradients."""

    def __init__(self, engine, device: torch.device) -> None:
        self.engine, self.device = engine, device

    def run(self, batches: Iterator[dict], n: int, forward_only: bool = False) -> torch.Tensor:
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for i in range(n):
            batch = next(batches)
            tokens = batch["tokens"].to(self.device)
            positions = batch.get("position_ids")
            if not forward_only:
                self.engine.set_gradient_accumulation_boundary(i == n - 1)
            per_token = self.engine(
                tokens[:, :-1],
                targets=tokens[:, 1:],
                position_ids=None if positions is None else positions.to(self.device),
            )
            if not forward_only:
                self.engine.backward(per_token.mean() / n)
            total[0] += per_token.detach().sum().double()
            total[1] += per_token.numel()
        return total
