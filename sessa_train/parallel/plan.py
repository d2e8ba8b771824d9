"""Tensor x pipeline x context parallelism applied to the one model definition.

``MegatronPlan`` realises ``models.plan.ModelPlan`` on megatron-core: column/row linears are
Column/RowParallelLinear, the embedding is VocabParallelEmbedding, gather/scatter/shared are its
TP mappings, the loss is vocab_parallel_cross_entropy (full logits are never gathered); with
CP > 1 attention all-gathers K/V and the solve is the ring of ``context_parallel.py``.
``build_model`` gives this rank its share of the plain model's weights (the whole model, through
the plain ``ModelPlan``, when every model-parallel size is 1), so every layout starts from the
same weights. megatron-core is imported only for model-parallel layouts.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from torch import nn

from sessa_train.config import ComputeConfig, ModelConfig, TrainConfig
from sessa_train.errors import ConfigError
from sessa_train.models import ModelPlan, Positions, SessaLM, Split
from sessa_train.models.plan import at_least_fp32
from sessa_train.models.registry import RECORDS
from sessa_train.ops import Solver
from sessa_train.parallel.layout import rank_initial_state, shard_state, stage_splits
from sessa_train.parallel.state import ParallelState, check_sizes, mark_norm_owners

_KEEP = nn.init.zeros_  # weights come from layout (rank_initial_state, shard_state) or a checkpoint


def check_parallel_model(cfg: ModelConfig, tensor: int, pipeline: int, context: int = 1, virtual: int = 1) -> None:
    """One-line errors for a model that cannot be split ``tensor`` x ``pipeline`` x ``context`` ways
    (with ``virtual`` model chunks per pipeline stage)."""
    arch = RECORDS[cfg.arch]
    for size, name, supported in (
        ("tensor", tensor, arch.tensor_parallel),
        ("context", context, arch.context_parallel),
    ):
        if name > 1 and not supported:
            raise ConfigError(f"model.arch={cfg.arch} cannot be split by parallel.{size}={name}; valid: 1")
    divisible = {"vocab_size": cfg.vocab_size, **arch.tensor_divisible(cfg)}
    for name, value in divisible.items():
        if value % tensor:
            one = " 1 or" if name == "feedback_heads" else ""
            raise ConfigError(f"model.{name}={value} must be{one} divisible by parallel.tensor={tensor}")
    if cfg.n_layers < pipeline:
        raise ConfigError(f"model.n_layers={cfg.n_layers} is fewer than parallel.pipeline={pipeline} stages")
    if virtual > 1 and pipeline == 1:
        raise ConfigError(f"parallel.virtual_stages={virtual} interleaves pipeline stages: needs parallel.pipeline > 1")
    if virtual > 1 and cfg.n_layers % (pipeline * virtual):
        raise ConfigError(
            f"model.n_layers={cfg.n_layers} is not divisible by parallel.pipeline={pipeline} x "
            f"parallel.virtual_stages={virtual} (interleaved stages hold equal blocks of layers)"
        )


def micro_batches(cfg: TrainConfig, data_parallel: int) -> int:
    """Micro-batches per optimizer step on each rank; a one-line error when the batch does not tile."""
    per_step = cfg.data.micro_batch_size * data_parallel
    if cfg.schedule.global_batch_size % per_step:
        raise ConfigError(
            f"schedule.global_batch_size={cfg.schedule.global_batch_size} is not divisible by "
            f"data.micro_batch_size={cfg.data.micro_batch_size} x {data_parallel} data-parallel ranks"
        )
    return cfg.schedule.global_batch_size // per_step


def check_layout(cfg: TrainConfig, world_size: int) -> None:
    """One-line errors for a layout a run cannot have: the one check ``sessa-train`` and
    ``sessa-plan`` both make."""
    par = cfg.parallel
    model_parallel = par.tensor * par.pipeline * par.context
    if model_parallel > 1 and par.zero_stage > 1:
        raise ConfigError(
            f"parallel.zero_stage={par.zero_stage} with tensor/pipeline/context parallelism; valid: 0 or 1 "
            "(ZeRO-2/3 partition gradients during a backward that megatron-core's schedule drives)"
        )
    check_parallel_model(cfg.model, par.tensor, par.pipeline, par.context, par.virtual_stages)
    check_sizes(par.tensor, par.pipeline, par.context, world_size)
    n = micro_batches(cfg, world_size // model_parallel)
    if par.virtual_stages > 1 and n % par.pipeline:
        raise ConfigError(
            f"parallel.virtual_stages={par.virtual_stages}: the {n} micro-batches per step on each rank must be a "
            f"multiple of parallel.pipeline={par.pipeline} (the interleaved schedule runs them in groups of PP)"
        )


def megatron_config(cfg: ModelConfig, state: ParallelState, dtype: torch.dtype, cuda: bool):
    """The megatron-core config the parallel layers and the pipeline schedule read (with
    sequence parallelism the schedule sends each stage's rows of the residual stream)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        sequence_parallel=state.sequence_parallel,
        num_layers=cfg.n_layers,
        hidden_size=cfg.d_model,
        num_attention_heads=cfg.n_heads,
        tensor_model_parallel_size=state.tp,
        pipeline_model_parallel_size=state.pp,
        virtual_pipeline_model_parallel_size=state.vp if state.vp > 1 else None,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        use_cpu_initialization=True,
        # zeros: weights come from layout.shard_state or a checkpoint; megatron's init also
        # marks TP-split weights (tensor_model_parallel), which the gradient norm relies on
        init_method=_KEEP,
        batch_p2p_comm=cuda,  # gloo: plain isend/irecv
        gradient_accumulation_fusion=False,
    )


class MegatronPlan(ModelPlan):
    """With sequence parallelism (``state.sequence_parallel``) the residual stream of a rank is
    (B, T / TP, D): megatron-core's linears gather the rows they read from it and reduce-scatter
    what they add to it (its ``sequence_parallel`` in the ``residual`` linears), the embedding
    reduce-scatters its output, and the gradients of the parameters that see only this rank's rows
    (LayerNorms, the residual linears' biases) are summed over the TP group after the backward
    (``pipeline.py``). megatron-core's layers work sequence-first, (T, B, D): the residual linears
    take and give batch-first views."""

    def __init__(self, compute: ComputeConfig, state: ParallelState, config) -> None:
        from megatron.core import parallel_state as ps
        from megatron.core import tensor_parallel as tp

        super().__init__(compute, stages=state.pp, stage=state.pp_rank, virtual=state.vp)
        self.state, self.config, self.ps, self.tp = state, config, ps, tp

    @functools.cached_property
    def inner_config(self):
        """The config of the linears inside a layer, which read and give whole rows (the mixer's
        q/k/v, W_fb, Wo)."""
        return dataclasses.replace(self.config, sequence_parallel=False)

    # -- modules ----------------------------------------------------------------------------
    def column(self, n_in: int, n_out: int, *, bias: bool = True, parts: int = 1, residual: bool = False) -> nn.Module:
        column = _megatron_linears()[0]
        if residual:
            return column(n_in, n_out, config=self.config, init_method=_KEEP, bias=bias, gather_output=False)
        # its input is ``shared``: the gradient is summed there once for all its readers
        return column(n_in, n_out, config=self.inner_config, init_method=_KEEP, bias=bias, gather_output=False,
                      disable_grad_reduce=True)  # fmt: skip

    def row(self, n_in: int, n_out: int, *, bias: bool = True, residual: bool = False) -> nn.Module:
        row = _megatron_linears()[1]
        config = self.config if residual else self.inner_config
        return row(
            n_in, n_out, config=config, init_method=_KEEP, bias=bias, input_is_parallel=True, skip_bias_add=False
        )

    def embedding(self, vocab_size: int, dim: int) -> nn.Module:
        return _megatron_embedding()(
            vocab_size,
            dim,
            init_method=_KEEP,
            config=self.config,
            reduce_scatter_embeddings=self.state.sequence_parallel,
        )

    def norm(self, dim: int, eps: float) -> nn.Module:
        """Under sequence parallelism a LayerNorm's gradients come from this rank's rows only: they
        are marked (megatron's ``sequence_parallel``) to be summed over the TP group."""
        module = super().norm(dim, eps)
        for p in module.parameters():
            p.sequence_parallel = self.state.sequence_parallel
        return module

    def part(self, value: torch.Tensor, split: Split | None) -> torch.Tensor:
        if split is None:
            return value
        return value.chunk(self.state.tp, split.dim)[self.state.tp_rank].clone()

    # -- activations ------------------------------------------------------------------------
    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.gather_from_tensor_model_parallel_region(x)

    def scatter(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.scatter_to_tensor_model_parallel_region(x)

    def shared(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.copy_to_tensor_model_parallel_region(x)

    # -- sequence ---------------------------------------------------------------------------
    def positions(self, length: int, position_ids: torch.Tensor | None = None) -> Positions:
        if self.state.sequence_parallel:
            length *= self.state.tp  # the mixer works on the whole block of the TP group
        return Positions.of(self.state.cp_rank * length, length, position_ids)  # this rank's block of every sequence

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: Positions) -> torch.Tensor:
        """Under context parallelism the keys and values of every rank are gathered and this rank's
        rows attend to those up to their own (causal, aligned to the last key; documents masked)."""
        if self.state.cp == 1:
            return super().attend(q, k, v, pos)
        from sessa_train.parallel.context_parallel import gather_sequence

        group = self.ps.get_context_parallel_group()
        k, v = gather_sequence(k, group, 2), gather_sequence(v, group, 2)
        end = pos.start + pos.length  # later ranks' keys are never read
        return super().attend(q, k[:, :, :end], v[:, :, :end], pos)

    def solver(self, device: torch.device) -> Solver:
        solver = super().solver(device)
        if self.state.cp > 1 and not solver.record.blockwise:
            raise ConfigError(
                f"feedback backend {solver.backend!r} (compute.feedback_backend or SESSA_FEEDBACK_BACKEND) solves "
                "the whole T x T system at once and cannot be split by parallel.context > 1; use chunked or triton"
            )
        return solver

    def solve(
        self, q: torch.Tensor, k: torch.Tensor, f: torch.Tensor, gamma: torch.Tensor, scale: float, pos: Positions
    ):
        if self.state.cp == 1:
            return super().solve(q, k, f, gamma, scale, pos)
        from sessa_train.parallel.context_parallel import feedback_solve_context_parallel

        group, T = self.ps.get_context_parallel_group(), q.shape[2]
        with torch.profiler.record_function("sessa.solve"):
            return feedback_solve_context_parallel(
                q, k, f, gamma, scale, self.solver(q.device), group, (T,) * self.state.cp, pos.doc_start
            )

    def token_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if not self.state.sequence_parallel:
            return self.tp.vocab_parallel_cross_entropy(at_least_fp32(logits), targets)
        # the head's logits are (T, B, V / TP) underneath: taken in that order, not copied
        loss = self.tp.vocab_parallel_cross_entropy(at_least_fp32(logits.transpose(0, 1)), targets.t().contiguous())
        return loss.t()


@functools.cache
def _megatron_linears() -> tuple[type, type]:
    """megatron-core's column- and row-parallel linears on (B, T, features), returning their
    output only (bias added). With sequence parallelism megatron gathers and reduce-scatters
    along its first dimension, the sequence: those linears see (T, B, features)."""
    from megatron.core import tensor_parallel as tp

    class Column(tp.ColumnParallelLinear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            if self.sequence_parallel:  # x: this rank's rows -> output over every row
                return super().forward(x.transpose(0, 1).contiguous())[0].transpose(0, 1)
            return super().forward(x)[0]

    class Row(tp.RowParallelLinear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            if self.sequence_parallel:  # every row -> the sum of this rank's rows
                return super().forward(x.transpose(0, 1))[0].transpose(0, 1)
            return super().forward(x)[0]

    return Column, Row


@functools.cache
def _megatron_embedding() -> type:
    """megatron-core's vocabulary-parallel embedding on (B, T); reduce-scattering its output over
    the sequence, it gives this rank's rows as (B, T / TP, D)."""
    from megatron.core import tensor_parallel as tp

    class Embedding(tp.VocabParallelEmbedding):
        def forward(self, ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            out = super().forward(ids)
            return out.transpose(0, 1) if self.reduce_scatter_embeddings else out

    return Embedding


def build_model(
    cfg: ModelConfig,
    compute: ComputeConfig,
    state: ParallelState,
    seed: int,
    device,
    weights: dict[str, torch.Tensor] | None = None,
) -> SessaLM:
    """This rank's part of the model (its pipeline stage, its tensor-parallel shard) holding its
    share of the initial weights of ``seed``, or of the plain model's fp32 ``weights``: no rank
    builds more of the whole model than one unit at a time (models/lm.py)."""
    check_parallel_model(cfg, state.tp, state.pp, state.cp, state.vp)
    torch.manual_seed(seed)
    if state.model_parallel == 1:  # the whole model: built under the seed, it holds that seed's weights
        model = SessaLM(cfg, ModelPlan(compute))
        if weights is not None:
            model.load_state_dict(weights)
        return model.to(device)
    cuda = torch.device(device).type == "cuda"
    model = SessaLM(cfg, MegatronPlan(compute, state, megatron_config(cfg, state, torch.float32, cuda)))
    ranks = (state.tp_rank, state.tp, state.pp_rank, state.pp, state.vp)
    own = rank_initial_state(cfg, seed, *ranks) if weights is None else shard_state(weights, cfg, *ranks)
    model.load_state_dict(own)
    mark_norm_owners(model, stage_splits(cfg, state.pp, state.pp_rank, state.vp), state)
    return model.to(device)
