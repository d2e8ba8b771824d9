"""How the one model definition is realised on a rank: its linear classes, the communication
between ranks, its pipeline stage and the solve's kernel (Megatron-core's ``ModuleSpec`` idea).

The layers are written once against this interface; head counts are inferred from tensor widths
(``view(B, T, -1, head_dim)``), so the same forward runs whole or on a tensor-parallel rank.
``ModelPlan`` is the plain realisation (one process, everything whole, communication the
identity); ``parallel/plan.py`` overrides its pieces. Every parameter a plan creates records how
tensor parallelism cuts it (a ``Split``; absent: replicated) in its module's ``tp_splits``, which
``parameter_splits`` (and so ``parallel/layout.py``) reads from a model built on the meta device.
The records live on the modules, not on the parameters: libraries that rebuild parameters from
their attributes (transformers' ``from_pretrained``) see plain parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from sessa_train.config import ComputeConfig
from sessa_train.models.attention import attend
from sessa_train.models.positions import Positions
from sessa_train.ops import Solver, feedback_solve, select_solver


@dataclass(frozen=True)
class Split:
    """How tensor parallelism cuts a parameter: along ``dim`` (0: output features, vocabulary
    rows or heads; 1: input features), the tensor being ``parts`` equal blocks along ``dim`` that
    are each cut over the ranks (a fused projection such as W_in = [W_a; W_g] has parts=2:
    rank r holds [W_a block r; W_g block r], so its output chunks into its a and its g)."""

    dim: int
    parts: int = 1


def tag(module: nn.Module, **splits: Split | None) -> nn.Module:
    """Record how ``module``'s parameters (by name) are split (None: replicated)."""
    module.__dict__.setdefault("tp_splits", {}).update(splits)
    return module


def parameter_splits(model: nn.Module) -> dict[str, Split | None]:
    """Every parameter name of ``model`` (tied ones under each name) -> how TP cuts it."""
    splits: dict[str, Split | None] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        recorded = module.__dict__.get("tp_splits", {})
        for name, _ in module.named_parameters(prefix=prefix, recurse=False, remove_duplicate=False):
            splits[name] = recorded.get(name.rsplit(".", 1)[-1])
    return splits


@dataclass
class ModelPlan:
    """The plain realisation: one process holds the whole model (or, with ``stages`` > 1, the
    layers of pipeline ``stage``) and nothing is communicated."""

    compute: ComputeConfig = field(default_factory=ComputeConfig)
    stages: int = 1
    stage: int = 0
    virtual: int = 1  # model chunks per stage: interleaved pipeline stages (Megatron's virtual pipeline)

    # -- pipeline stage ---------------------------------------------------------------------
    @property
    def first_stage(self) -> bool:
        return self.stage == 0

    @property
    def last_stage(self) -> bool:
        return self.stage == self.stages - 1

    def chunk_layers(self, n_layers: int, chunk: int) -> range:
        """Global indices of the layers of this stage's model chunk ``chunk``: virtual stage
        chunk x stages + stage of stages x virtual, each a contiguous block (when they do not
        divide, the first take one layer more). One chunk per stage: the stage's block."""
        parts, part = self.stages * self.virtual, chunk * self.stages + self.stage
        base, extra = divmod(n_layers, parts)
        start = part * base + min(part, extra)
        return range(start, start + base + (part < extra))

    def layer_ids(self, n_layers: int) -> list[int]:
        """Global indices of this stage's layers, chunk after chunk."""
        return [i for chunk in range(self.virtual) for i in self.chunk_layers(n_layers, chunk)]

    # -- modules ----------------------------------------------------------------------------
    def column(self, n_in: int, n_out: int, *, bias: bool = True, parts: int = 1, residual: bool = False) -> nn.Module:
        """A linear whose output features are split over tensor-parallel ranks. ``residual``: its
        input is the residual stream (B, T, D), which sequence parallelism splits along T: the
        linear then gathers the rows it reads (and sums their gradients back); otherwise it sums
        its input's gradient over the ranks. Not ``residual``: its input is marked ``shared`` by
        the caller, which sums the gradient once for every linear that reads it."""
        return tag(nn.Linear(n_in, n_out, bias=bias), weight=Split(0, parts), bias=Split(0, parts))

    def row(self, n_in: int, n_out: int, *, bias: bool = True, residual: bool = False) -> nn.Module:
        """A linear whose input features are split over tensor-parallel ranks; its output is
        summed over them (the bias is added once, after the sum). ``residual``: its output joins
        the residual stream, so under sequence parallelism each rank keeps the sum of its rows only."""
        return tag(nn.Linear(n_in, n_out, bias=bias), weight=Split(1))

    def replicated(self, n_in: int, n_out: int, *, bias: bool = True) -> nn.Module:
        """A linear every tensor-parallel rank holds whole."""
        return nn.Linear(n_in, n_out, bias=bias)

    def embedding(self, vocab_size: int, dim: int) -> nn.Module:
        """The token embedding; tensor parallelism splits its vocabulary rows."""
        return tag(nn.Embedding(vocab_size, dim), weight=Split(0))

    def norm(self, dim: int, eps: float) -> nn.Module:
        """A LayerNorm of the residual stream (replicated over tensor-parallel ranks)."""
        return nn.LayerNorm(dim, eps=eps)

    def parameter(self, owner: nn.Module, name: str, value: torch.Tensor, split: Split | None) -> None:
        """A free parameter ``owner.<name>`` (e.g. the gamma gate's bias): this rank's part of ``value``."""
        owner.register_parameter(name, nn.Parameter(self.part(value, split)))
        tag(owner, **{name: split})

    def part(self, value: torch.Tensor, split: Split | None) -> torch.Tensor:
        """This rank's part of a whole tensor cut as ``split``."""
        return value

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
    def positions(self, length: int, position_ids: torch.Tensor | None = None) -> Positions:
        """The rows a layer's mixer works on, for a residual stream of ``length`` rows on this rank
        (context parallelism splits the sequence, sequence parallelism the residual stream within
        that), with their positions in their documents (``Positions.of``)."""
        return Positions.of(0, length, position_ids)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: Positions) -> torch.Tensor:
        """Causal attention of q (B, H, T, d) at rows ``pos`` over k, v (B, Hkv, pos.start + T, d)
        (``models.attention.attend``)."""
        with torch.profiler.record_function("sessa.attention"):
            return attend(q, k, v, pos)

    def recompute(self, kind: str, fn, *args):
        """``fn(*args)``; when training with ``compute.recompute == kind`` its activations are not
        kept but recomputed in the backward (torch's non-reentrant activation checkpointing)."""
        if self.compute.recompute == kind and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def solver(self, device: torch.device) -> Solver:
        """The solve's backend for tensors on ``device``, chosen once per device type (at set-up:
        the trainer asks before the first step) and kept."""
        solvers, key = self.__dict__.setdefault("_solvers", {}), (device.type, self.compute)
        if key not in solvers:
            c = self.compute
            solvers[key] = select_solver(
                c.feedback_backend, device, c.feedback_chunk_size or None, c.feedback_cuda_graphs
            )
        return solvers[key]

    def solve(
        self, q: torch.Tensor, k: torch.Tensor, f: torch.Tensor, gamma: torch.Tensor, scale: float, pos: Positions
    ):
        """The feedback solve of this rank's heads and channels (``ops.feedback_solve`` shapes),
        each row over the earlier rows of its own document."""
        with torch.profiler.record_function("sessa.solve"):
            return feedback_solve(q, k, f, gamma, scale=scale, solver=self.solver(q.device), key_start=pos.doc_start)

    def token_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy (B, T) in float32 (float64 for float64 logits) of logits (B, T, V) against
        targets (B, T)."""
        loss = F.cross_entropy(at_least_fp32(logits).flatten(0, 1), targets.flatten(), reduction="none")
        return loss.view(targets.shape)


def scored_sum(per_token: torch.Tensor, loss_mask: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """(sum of the per-token losses (B, T) that ``loss_mask`` (B, T, 0/1) scores, how many it
    scores); without a mask every token. The count is read from the mask on the host: pass the
    loader's CPU mask and no device sync happens."""
    if loss_mask is None:
        return per_token.sum(), per_token.numel()
    return (per_token * loss_mask.to(per_token.device, per_token.dtype)).sum(), int(loss_mask.sum())


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 when it is in a narrower float type, else as it is (float64 stays)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
