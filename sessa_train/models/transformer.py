"""The matched Transformer baseline (``model.arch: transformer``): same width, depth, attention
(RoPE, GQA, SDPA) and a parameter budget matched to a Sessa layer.

    y = x + Wo . SDPA(RoPE(q), RoPE(k), v, causal)(LayerNorm(x))
    y = y + MLP(LayerNorm(y))          MLP: D -> F -> D, GELU

A Sessa layer holds about 9 D^2 weights (W_in 2, q/k/v 3, Wo 1, W_fb 2, W_out 1); attention
holds 4 D^2, so F = 5 D / 2 (rounded up to a multiple of 8) matches it, unless
``ffn_hidden_size`` sets F.
"""

from __future__ import annotations

import torch
from torch import nn

from sessa_train.config import ModelConfig
from sessa_train.models.architecture import Architecture
from sessa_train.models.attention import AttentionCache, attention_cache, causal_attention
from sessa_train.models.layer import MLP
from sessa_train.models.plan import ModelPlan
from sessa_train.models.positions import Positions


def matched_ffn_hidden_size(cfg: ModelConfig) -> int:
    return cfg.ffn_hidden_size or -(-5 * cfg.d_model // 2 // 8) * 8


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, plan: ModelPlan) -> None:
        super().__init__()
        self.cfg, self.plan = cfg, plan
        D, hd = cfg.d_model, cfg.head_dim
        self.q_proj = plan.column(D, cfg.n_heads * hd, residual=True)
        self.k_proj = plan.column(D, cfg.kv_heads * hd, residual=True)
        self.v_proj = plan.column(D, cfg.kv_heads * hd, residual=True)
        self.o_proj = plan.row(D, D, residual=True)

    def sequence_flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token of QK^T and AV over on average T/2 keys."""
        return 2 * 2 * (seq_len / 2) * self.cfg.d_model

    def forward(self, x: torch.Tensor, pos: Positions, cache: AttentionCache | None = None) -> torch.Tensor:
        return causal_attention(self, x, pos, cache)


class TransformerLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, plan: ModelPlan | None = None) -> None:
        super().__init__()
        plan = plan or ModelPlan()
        D = cfg.d_model
        self.norm = plan.norm(D, cfg.ln_eps)
        self.mixer = CausalSelfAttention(cfg, plan)
        self.mlp_norm = plan.norm(D, cfg.ln_eps)
        self.mlp = MLP(D, matched_ffn_hidden_size(cfg), plan)

    def init_cache(self, batch_size: int, max_len: int, *, device=None, dtype=None) -> AttentionCache:
        p = self.mixer.q_proj.weight
        return attention_cache(self.mixer.cfg, batch_size, max_len, device or p.device, dtype or p.dtype)

    def forward(
        self, x: torch.Tensor, pos: Positions | None = None, cache: AttentionCache | None = None
    ) -> torch.Tensor:
        pos = pos or self.mixer.plan.positions(x.shape[1])
        y = x + self.mixer(self.norm(x), pos, cache)
        return y + self.mlp(self.mlp_norm(y))


TRANSFORMER = Architecture(
    "transformer",
    TransformerLayer,
    lambda cfg: {
        "n_heads": cfg.n_heads,
        "n_kv_heads": cfg.kv_heads,
        "ffn_hidden_size (matched: 5 d_model / 2)": matched_ffn_hidden_size(cfg),
    },
)
