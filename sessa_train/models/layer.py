"""The Sessa layer (pre-norm, gated, residual) and the optional MLP sub-block.

u    = LayerNorm(x);   a, g = split(W_in u, 2);   s = Mixer(GELU(a))
y    = x + W_out(s * g)
y    = y + MLP(LayerNorm(y))        only when ffn_hidden_size > 0 (the reference has none)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sessa_train.config import ModelConfig
from sessa_train.models.mixer import MixerCache, SessaMixer


class MLP(nn.Module):
    """GELU feed-forward D -> ffn_hidden_size -> D."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, hidden)
        self.fc2 = nn.Linear(hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SessaLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        D = cfg.d_model
        self.norm = nn.LayerNorm(D, eps=cfg.ln_eps)
        self.in_proj = nn.Linear(D, 2 * D)
        self.mixer = SessaMixer(cfg)
        self.out_proj = nn.Linear(D, D)
        self.mlp_norm = nn.LayerNorm(D, eps=cfg.ln_eps) if cfg.ffn_hidden_size else None
        self.mlp = MLP(D, cfg.ffn_hidden_size) if cfg.ffn_hidden_size else None

    def forward(self, x: torch.Tensor, cache: MixerCache | None = None) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D)."""
        a, g = self.in_proj(self.norm(x)).chunk(2, dim=-1)
        y = x + self.out_proj(self.mixer(F.gelu(a), cache) * g)
        if self.mlp is not None:
            y = y + self.mlp(self.mlp_norm(y))
        return y
