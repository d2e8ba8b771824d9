"""Tensor x pipeline x context parallelism applied to the one model definition.

``MegatronPlan`` realises ``models.plan.ModelPlan`` on megatron-core: column/row linears are
Column/RowParallelLinear, the embedding is VocabParallelEmbedding, gather/scatter/shared are its
TP mappings, the loss is vocab_parallel_cross_entropy (full logits are never gathered); with
CP > 1 attention all-gathers K/V and the solve is the ring of ``context_parallel.py``.
``build_parallel_model`` gives this rank its share of the plain model's weights, so every layout
starts from the same weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel as tp
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn

from sessa_train.config import ComputeConfig, ModelConfig
from sessa_train.errors import ConfigError
from sessa_train.models import ModelPlan, SessaLM, Split
from sessa_train.models.transformer import matched_ffn_hidden_size
from sessa_train.ops import Solver
from sessa_train.parallel.context_parallel import feedback_solve_context_parallel, gather_sequence
from sessa_train.parallel.layout import rank_initial_state, shard_state, stage_splits
from sessa_train.parallel.state import ParallelState, mark_norm_owners

_KEEP = nn.init.zeros_  # weights come from layout (rank_initial_state, shard_state) or a checkpoint


class _Column(tp.ColumnParallelLinear):
    """megatron-core's column-parallel linear, returning its output only (bias added)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x)[0]


class _Row(tp.RowParallelLinear):
    """megatron-core's row-parallel linear (input split, output summed), returning its output only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x)[0]


def check_parallel_model(cfg: ModelConfig, tensor: int, pipeline: int) -> None:
    """One-line errors for a model that cannot be split ``tensor`` x ``pipeline`` ways."""
    divisible = {"n_heads": cfg.n_heads, "n_kv_heads": cfg.kv_heads, "vocab_size": cfg.vocab_size}
    if cfg.arch == "sessa":
        if cfg.feedback_heads > 1:
            divisible["feedback_heads"] = cfg.feedback_heads
        if cfg.ffn_hidden_size:
            divisible["ffn_hidden_size"] = cfg.ffn_hidden_size
    else:
        divisible["ffn_hidden_size (matched: 5 d_model / 2)"] = matched_ffn_hidden_size(cfg)
    for name, value in divisible.items():
        if value % tensor:
            one = " 1 or" if name == "feedback_heads" else ""
            raise ConfigError(f"model.{name}={value} must be{one} divisible by parallel.tensor={tensor}")
    if cfg.n_layers < pipeline:
        raise ConfigError(f"model.n_layers={cfg.n_layers} is fewer than parallel.pipeline={pipeline} stages")


def megatron_config(cfg: ModelConfig, state: ParallelState, dtype: torch.dtype, cuda: bool) -> TransformerConfig:
    """The megatron-core config the parallel layers and the pipeline schedule read."""
    return TransformerConfig(
        num_layers=cfg.n_layers,
        hidden_size=cfg.d_model,
        num_attention_heads=cfg.n_heads,
        tensor_model_parallel_size=state.tp,
        pipeline_model_parallel_size=state.pp,
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
    def __init__(self, compute: ComputeConfig, state: ParallelState, config: TransformerConfig) -> None:
        super().__init__(compute, stages=state.pp, stage=state.pp_rank)
        self.state, self.config = state, config

    # -- modules ----------------------------------------------------------------------------
    def column(self, n_in: int, n_out: int, *, bias: bool = True, parts: int = 1) -> nn.Module:
        return _Column(n_in, n_out, config=self.config, init_method=_KEEP, bias=bias, gather_output=False)

    def row(self, n_in: int, n_out: int, *, bias: bool = True) -> nn.Module:
        return _Row(
            n_in, n_out, config=self.config, init_method=_KEEP, bias=bias, input_is_parallel=True, skip_bias_add=False
        )

    def embedding(self, vocab_size: int, dim: int) -> nn.Module:
        return tp.VocabParallelEmbedding(vocab_size, dim, init_method=_KEEP, config=self.config)

    def parameter(self, value: torch.Tensor, split: Split | None) -> nn.Parameter:
        if split is not None:
            value = value.chunk(self.state.tp, split.dim)[self.state.tp_rank].clone()
        return nn.Parameter(value)

    # -- activations ------------------------------------------------------------------------
    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return tp.gather_from_tensor_model_parallel_region(x)

    def scatter(self, x: torch.Tensor) -> torch.Tensor:
        return tp.scatter_to_tensor_model_parallel_region(x)

    def shared(self, x: torch.Tensor) -> torch.Tensor:
        return tp.copy_to_tensor_model_parallel_region(x)

    # -- sequence ---------------------------------------------------------------------------
    def sequence_start(self, length: int) -> int:
        return self.state.cp_rank * length  # this rank's block of every sequence

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
        if self.state.cp == 1:
            return super().attend(q, k, v, start)
        group = ps.get_context_parallel_group()  # rows see every key up to their global position
        k, v = gather_sequence(k, group, 2), gather_sequence(v, group, 2)
        T = q.shape[2]
        rows = torch.arange(start, start + T, device=q.device)[:, None]
        mask = torch.arange(k.shape[2], device=q.device)[None, :] <= rows
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])

    def solver(self, device: torch.device) -> Solver:
        solver = super().solver(device)
        if self.state.cp > 1 and not solver.blockwise:
            raise ConfigError(
                f"feedback backend {solver.backend!r} (compute.feedback_backend or SESSA_FEEDBACK_BACKEND) solves "
                "the whole T x T system at once and cannot be split by parallel.context > 1; use chunked or triton"
            )
        return solver

    def solve(self, q: torch.Tensor, k: torch.Tensor, f: torch.Tensor, gamma: torch.Tensor, scale: float):
        if self.state.cp == 1:
            return super().solve(q, k, f, gamma, scale)
        group, T = ps.get_context_parallel_group(), q.shape[2]
        return feedback_solve_context_parallel(
            q, k, f, gamma, scale, self.solver(q.device), group, (T,) * self.state.cp
        )

    def token_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return tp.vocab_parallel_cross_entropy(logits.float(), targets)


def build_parallel_model(
    cfg: ModelConfig, compute: ComputeConfig, state: ParallelState, weights: dict[str, torch.Tensor] | int, device
) -> SessaLM:
    """This rank's part of the model (its pipeline stage, its tensor-parallel shard) holding its
    share of the plain model's weights ``weights`` (fp32), or with a seed the initial weights of
    that seed, built unit by unit: no rank ever holds the whole model."""
    check_parallel_model(cfg, state.tp, state.pp)
    plan = MegatronPlan(compute, state, megatron_config(cfg, state, torch.float32, torch.device(device).type == "cuda"))
    model = SessaLM(cfg, plan)
    ranks = (state.tp_rank, state.tp, state.pp_rank, state.pp)
    if isinstance(weights, int):
        model.load_state_dict(rank_initial_state(cfg, weights, *ranks))
    else:
        model.load_state_dict(shard_state(weights, cfg, *ranks))
    mark_norm_owners(model, stage_splits(cfg, state.pp, state.pp_rank), state)
    return model.to(device)
