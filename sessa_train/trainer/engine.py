"""This rank's part of the model under DeepSpeed, and how one optimizer step runs through it."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sessa_train import distributed as comm
from sessa_train.config import TrainConfig
from sessa_train.models import SessaLM
from sessa_train.parallel.layout import stage_splits
from sessa_train.parallel.state import ParallelState
from sessa_train.trainer.runner import Runner


@dataclass
class Engine:
    """This rank's part of the model under DeepSpeed (``ds``), and how a step runs through it."""

    cfg: TrainConfig
    state: ParallelState
    device: torch.device
    model: SessaLM  # DeepSpeed's module: the whole model, or this rank's stage / shard
    ds: object  # deepspeed.DeepSpeedEngine
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    runner: Runner
    gas: int  # micro-batches per optimizer step on this rank
    n_params: int  # of the whole model
    before_update: Callable[[], None] = lambda: None  # what must finish before the weights change

    def global_mean(self, total: torch.Tensor) -> float:
        """Mean token loss over the job from every rank's (loss sum, token count)."""
        total = comm.sum_values(total)
        return (total[0] / total[1]).item()

    def forward_backward(self, batches) -> float:
        """Forward and backward of one step's ``gas`` micro-batches; leaves the gradients reduced
        over the data-parallel ranks. Returns the step's mean token loss over the job."""
        return self.global_mean(self.runner.run(batches, self.gas))

    def grad_norm(self) -> float:
        """The L2 norm of the step's whole gradient before clipping, from the gradients left on
        the parameters (fp32 without ZeRO, where DeepSpeed records no norm): each tensor x pipeline
        rank's sum of squares of the parameters it ``owns``, summed over the model-parallel group."""
        splits = stage_splits(self.cfg.model, self.state.pp, self.state.pp_rank, self.state.vp)
        squares = torch.zeros((), dtype=torch.float64, device=self.device)
        for name, p in self.ds.module.named_parameters():
            if p.grad is not None and self.state.owns(splits[name]):
                squares += p.grad.detach().double().square().sum()
        if (group := self.state.model_parallel_group()) is not None:
            squares = comm.sum_values(squares, group)
        return squares.sqrt().item()

    def update(self, loss: float) -> tuple[bool, float]:
        """The optimizer step: (whether it changed the weights, the gradient norm before
        clipping). A step whose loss is not finite on any rank changes no weight and no optimizer
        state: DeepSpeed's ZeRO 1/2 and bf16 optimizers skip a step whose gradient norm is not
        finite themselves (tested with and without clipping); otherwise DeepSpeed calls our
        SkippableAdamW, told here to skip. The norm is DeepSpeed's where its optimizer wrapper
        (ZeRO 1-3, bf16) computes one, else ``grad_norm()``."""
        skipped_before = self.ds.skipped_steps
        own = self.ds.optimizer is self.optimizer  # fp32 without ZeRO: no wrapper, no recorded norm
        norm = self.grad_norm() if own else math.nan
        if not math.isfinite(loss) and not hasattr(self.ds.optimizer, "overflow"):
            self.optimizer.skip_next = True
        self.before_update()  # a background save's copy of the weights and moments
        with torch.profiler.record_function("sessa.optimizer"):
            self.ds.step()
        if not own:
            norm = float(self.ds.get_global_grad_norm())
        return math.isfinite(loss) and self.ds.skipped_steps == skipped_before, norm

    def train_step(self, batches) -> tuple[float, bool, float]:
        """One optimizer step: (mean loss over the job, update applied, gradient norm)."""
        loss = self.forward_backward(batches)
        return loss, *self.update(loss)

    @torch.no_grad()
    def evaluate(self, batches: list[dict]) -> float:
        """Mean token loss over every rank's ``batches`` (forward only)."""
        self.ds.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        if batches:
            total = self.runner.run(iter(batches), len(batches), forward_only=True)
        self.ds.train()
        return self.global_mean(total)
