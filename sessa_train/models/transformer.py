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
from sessa_train.models.attention import causal_attention
from sessa_train.models.layer import MLP
from sessa_train.models.mixer import MixerCache, check_cache
from sessa_train.models.plan import ModelPlan


def matched_ffn_hidden_size(cfg: ModelConfig) -> int:
    return cfg.ffn_hidden_size or -(-5 * cfg.d_model // 2 // 8) * 8


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, plan: ModelPlan) -> None:
        super().__init__()
        self.cfg, self.plan = cfg, plan
        D, hd = cfg.d_model, cfg.head_dim
        self.q_proj = plan.column(D, cfg.n_heads * hd)
        self.k_proj = plan.column(D, cfg.kv_heads * hd)
        self.v_proj = plan.column(D, cfg.kv_heads * hd)
        self.o_proj = plan.row(D, D)

    def sequence_flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token of QK^T and AV over on average T/2 keys."""
        return 2 * 2 * (seq_len / 2) * self.cfg.d_model

    def init_cache(self, batch_size: int, max_len: int, *, device=None, dtype=None) -> MixerCache:
        """A key/value cache (the feedback fields k_b, s are empty)."""
        cfg, p = self.cfg, self.q_proj.weight
        device, dtype = device or p.device, dtype or p.dtype
        kv = torch.zeros(batch_size, cfg.kv_heads, max_len, cfg.head_dim, device=device, dtype=dtype)
        empty = torch.zeros(batch_size, 1, max_len, 0, device=device, dtype=dtype)
        return MixerCache(k=kv, v=kv.clone(), k_b=empty, s=empty.clone())

    def forward(self, x: torch.Tensor, cache: MixerCache | None = None) -> torch.Tensor:
        T = x.shape[1]
        start = check_cache(cache, T) if cache is not None else self.plan.sequence_start(T)
        out = causal_attention(self, x, cache, start)
        if cache is not None:
            cache.length = start + T
        return out


class TransformerLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, plan: ModelPlan | None = None) -> None:
        super().__init__()
        plan = plan or ModelPlan()
        D = cfg.d_model
        self.norm = nn.LayerNorm(D, eps=cfg.ln_eps)
        self.mixer = CausalSelfAttention(cfg, plan)  # "mixer": the cache interface SessaLM expects
        self.mlp_norm = nn.LayerNorm(D, eps=cfg.ln_eps)
        self.mlp = MLP(D, matched_ffn_hidden_size(cfg), plan)

    def forward(self, x: torch.Tensor, cache: MixerCache | None = None) -> torch.Tensor:
        y = x + self.mixer(self.norm(x), cache)
        return y + self.mlp(self.mlp_norm(y))
