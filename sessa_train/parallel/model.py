"""One pipeline stage of the tensor-parallel Sessa LM (the whole model when PP = 1).

    first stage:  tokens (B, T) -> VocabParallelEmbedding -> x (B, T, D)
    every stage:  its contiguous block of TPSessaLayers (layout.stage_layers)
    last stage:   LayerNorm -> logits (B, T, V/P) for this rank's vocabulary rows,
                  consumed by megatron-core's vocab_parallel_cross_entropy

Between stages activations travel as (T, B, D), megatron-core's p2p layout. With tied
embeddings and PP > 1 the first stage owns the embedding matrix; the last stage borrows it
for the head each step (``tied_weight`` is a plain tensor, not a parameter, so optimizer,
checkpoint and gradient norm see one copy): ``pipeline.PipelineRunner`` broadcasts it over
megatron's embedding group before the micro-batches and sums its gradient back afterwards.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel as tp
from megatron.core.enums import ModelType
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn

from sessa_train.config import ModelConfig
from sessa_train.parallel.layout import shard_lm_state, stage_layers
from sessa_train.parallel.state import ParallelState, mark_norm_owners
from sessa_train.parallel.tensor_parallel import TPSessaLayer, check_tp_shapes


def check_parallel_model(cfg: ModelConfig, tensor: int, pipeline: int) -> None:
    """One-line errors for a model that cannot be split ``tensor`` x ``pipeline`` ways."""
    check_tp_shapes(cfg, tensor)
    if cfg.vocab_size % tensor:
        raise ValueError(f"model.vocab_size={cfg.vocab_size} must be divisible by parallel.tensor={tensor}")
    if cfg.n_layers < pipeline:
        raise ValueError(f"model.n_layers={cfg.n_layers} is fewer than parallel.pipeline={pipeline} stages")


def megatron_config(cfg: ModelConfig, state: ParallelState, dtype: torch.dtype, cuda: bool) -> TransformerConfig:
    """The megatron-core config our stages carry (its schedule reads hidden_size, dtypes, p2p)."""
    return TransformerConfig(
        num_layers=cfg.n_layers,
        hidden_size=cfg.d_model,
        num_attention_heads=cfg.n_heads,
        tensor_model_parallel_size=state.tp,
        pipeline_model_parallel_size=state.pp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        use_cpu_initialization=True,
        # zeros: weights come from layout.shard_lm_state or a checkpoint; megatron's init also
        # marks TP-split weights (tensor_model_parallel), which the gradient norm relies on
        init_method=torch.nn.init.zeros_,
        batch_p2p_comm=cuda,  # gloo: plain isend/irecv
        gradient_accumulation_fusion=False,
    )


class SessaStage(nn.Module):
    def __init__(self, cfg: ModelConfig, state: ParallelState, config: TransformerConfig) -> None:
        super().__init__()
        check_parallel_model(cfg, state.tp, state.pp)
        self.cfg, self.state, self.config = cfg, state, config  # megatron's schedule reads .config
        self.model_type = ModelType.encoder_or_decoder  # and .model_type
        keep = nn.init.zeros_
        self.layer_ids = stage_layers(cfg.n_layers, state.pp, state.pp_rank)
        if state.first_stage:
            self.embed = tp.VocabParallelEmbedding(cfg.vocab_size, cfg.d_model, init_method=keep, config=config)
        self.layers = nn.ModuleList(TPSessaLayer(cfg, config) for _ in self.layer_ids)
        borrow = state.last_stage and cfg.tie_embeddings and not state.first_stage
        shape = (cfg.vocab_size // state.tp, cfg.d_model)
        tied = torch.zeros(shape, dtype=config.params_dtype) if borrow else None
        self.register_buffer("tied_weight", tied, persistent=False)  # moves with .to(device); not saved
        if state.last_stage:
            self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps, dtype=config.params_dtype)
            if not cfg.tie_embeddings:
                self.lm_head = tp.ColumnParallelLinear(
                    cfg.d_model, cfg.vocab_size, config=config, init_method=keep, bias=False, gather_output=False
                )
        self.input_tensor: torch.Tensor | None = None

    def set_input_tensor(self, tensor: torch.Tensor | list[torch.Tensor] | None) -> None:
        """megatron-core's schedule hands a non-first stage its received activation here."""
        self.input_tensor = tensor[0] if isinstance(tensor, list) else tensor

    def output_weight(self) -> torch.Tensor:
        if not self.cfg.tie_embeddings:
            return self.lm_head.weight
        return self.embed.weight if self.state.first_stage else self.tied_weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) -> (T, B, D) activations, or (B, T, V/P) logits on the last stage."""
        x = self.embed(tokens) if self.state.first_stage else self.input_tensor.transpose(0, 1)
        for layer in self.layers:
            x = layer(x)
        if not self.state.last_stage:
            return x.transpose(0, 1).contiguous()
        h = tp.copy_to_tensor_model_parallel_region(self.norm(x))  # backward: all-reduce over TP
        return F.linear(h, self.output_weight())


def build_stage(
    cfg: ModelConfig, state: ParallelState, plain: dict[str, torch.Tensor], device: torch.device
) -> SessaStage:
    """This rank's stage with its share of the plain model's weights ``plain`` (fp32)."""
    stage = SessaStage(cfg, state, megatron_config(cfg, state, torch.float32, device.type == "cuda"))
    stage.load_state_dict(shard_lm_state(plain, cfg, state.tp_rank, state.tp, state.pp_rank, state.pp))
    mark_norm_owners(stage, state)
    return stage.to(device)
