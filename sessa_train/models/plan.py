"""How the one model definition is realised on a rank: its linear classes, the communication
between ranks, its pipeline stage and the solve's kernel (Megatron-core's ``ModuleSpec`` idea).

The layers are written once against this interface; head counts are inferred from tensor widths
(``view(B, T, -1, head_dim)``), so the same forward runs whole or on a tensor-parallel rank.
``ModelPlan`` is the plain realisation (one process, everything whole, communication the
identity); ``parallel/plan.py`` overrides its pieces. Every parameter a plan creates records how
tensor parallelism cuts it (``tp_split``, a ``Split``; absent: replicated), which
``parallel/layout.py`` reads from a model built on the meta device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from sessa_train.config import ComputeConfig
from sessa_train.ops import Solver, feedback_solve, select_solver


@dataclass(frozen=True)
class Split:
    """How tensor parallelism cuts a parameter: along ``dim`` (0: output features, vocabulary
    rows or heads; 1: input features), the tensor being ``parts`` equal blocks along ``dim`` that
    are each cut over the ranks (a fused projection such as W_in = [W_a; W_g] has parts=2:
    rank r holds [W_a block r; W_g block r], so its output chunks into its a and its g)."""

    dim: int
    parts: int = 1


def tag(module: nn.Module, weight: Split | None, bias: Split | None = None) -> nn.Module:
    """Record how ``module``'s weight and bias are split (None: replicated)."""
    for name, split in (("weight", weight), ("bias", bias)):
        p = getattr(module, name, None)
        if isinstance(p, nn.Parameter) and split is not None:
            p.tp_split = split
    return module


def split_of(p: torch.Tensor) -> Split | None:
    return getattr(p, "tp_split", None)


@dataclass
class ModelPlan:
    """The plain realisation: one process holds the whole model (or, with ``stages`` > 1, the
    layers of pipeline ``stage``) and nothing is communicated."""

    compute: ComputeConfig = field(default_factory=ComputeConfig)
    stages: int = 1
    stage: int = 0

    # -- pipeline stage ---------------------------------------------------------------------
    @property
    def first_stage(self) -> bool:
        return self.stage == 0

    @property
    def last_stage(self) -> bool:
        return self.stage == self.stages - 1

    def layer_ids(self, n_layers: int) -> range:
        """Global indices of this stage's layers: contiguous blocks, and when n_layers % stages
        != 0 the first stages take one layer more."""
        base, extra = divmod(n_layers, self.stages)
        start = self.stage * base + min(self.stage, extra)
        return range(start, start + base + (self.stage < extra))

    # -- modules ----------------------------------------------------------------------------
    def column(self, n_in: int, n_out: int, *, bias: bool = True, parts: int = 1) -> nn.Module:
        """A linear whose output features are split over tensor-parallel ranks."""
        return tag(nn.Linear(n_in, n_out, bias=bias), Split(0, parts), Split(0, parts))

    def row(self, n_in: int, n_out: int, *, bias: bool = True) -> nn.Module:
        """A linear whose input features are split over tensor-parallel ranks; its output is
        summed over them (the bias is added once, after the sum)."""
        return tag(nn.Linear(n_in, n_out, bias=bias), Split(1))

    def replicated(self, n_in: int, n_out: int, *, bias: bool = True) -> nn.Module:
        """A linear every tensor-parallel rank holds whole."""
        return nn.Linear(n_in, n_out, bias=bias)

    def embedding(self, vocab_size: int, dim: int) -> nn.Module:
        """The token embedding; tensor parallelism splits its vocabulary rows."""
        return tag(nn.Embedding(vocab_size, dim), Split(0))

    def parameter(self, value: torch.Tensor, split: Split | None) -> nn.Parameter:
        """A free parameter (e.g. the gamma gate's bias): this rank's part of ``value``."""
        p = nn.Parameter(value)
        if split is not None:
            p.tp_split = split
        return p

    # -- activations between tensor-parallel ranks --------------------------------------------
    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's channels of the last dim -> all channels."""
        return x

    def scatter(self, x: torch.Tensor) -> torch.Tensor:
        """All channels of the last dim -> this rank's channels."""
        return x

    def shared(self, x: torch.Tensor) -> torch.Tensor:
        """Marks a tensor every rank computes alike but consumes differently: its gradient is
        summed over the ranks (a replicated feedback head feeding each rank's channels)."""
        return x

    # -- sequence ---------------------------------------------------------------------------
    def sequence_start(self, length: int) -> int:
        """Position of this rank's first token in the sequence (context parallelism splits it)."""
        return 0

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
        """Causal attention of q (B, H, T, d) at positions start.. over k, v (B, Hkv, start+T, d)."""
        return F.scaled_dot_product_attention(q, k, v, is_causal=start == 0, enable_gqa=q.shape[1] != k.shape[1])

    def recompute(self, kind: str, fn, *args):
        """``fn(*args)``; when training with ``compute.recompute == kind`` its activations are not
        kept but recomputed in the backward (torch's non-reentrant activation checkpointing)."""
        if self.compute.recompute == kind and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def solver(self, device: torch.device) -> Solver:
        c = self.compute
        return select_solver(c.feedback_backend, device, c.feedback_chunk_size or None, c.feedback_cuda_graphs)

    def solve(self, q: torch.Tensor, k: torch.Tensor, f: torch.Tensor, gamma: torch.Tensor, scale: float):
        """The feedback solve of this rank's heads and channels (``ops.feedback_solve`` shapes)."""
        return feedback_solve(q, k, f, gamma, scale=scale, solver=self.solver(q.device))

    def token_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy (B, T) in float32 of logits (B, T, V) against targets (B, T)."""
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
        return loss.view(targets.shape)
