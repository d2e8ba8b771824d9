"""The Sessa layer (pre-norm, gated, residual) and the optional MLP sub-block.

u    = LayerNorm(x);   a, g = split(W_in u, 2);   s = Mixer(GELU(a))
y    = x + W_out(s * g)
y    = y + MLP(LayerNorm(y))        only when ffn_hidden_size > 0 (the reference has none)

Under tensor parallelism W_in is column-parallel with a and g blocks cut alike (a rank gets
its channels of both); a is gathered (q/k/v and W_fb read all of it), g stays split like s,
and W_out is row-parallel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sessa_train.config import ModelConfig
from sessa_train.models.mixer import MixerCache, SessaMixer
from sessa_train.models.plan import ModelPlan


class MLP(nn.Module):
    """GELU feed-forward D -> hidden -> D (column- then row-parallel)."""

    def __init__(self, d_model: int, hidden: int, plan: ModelPlan) -> None:
        super().__init__()
        self.fc1 = plan.column(d_model, hidden)
        self.fc2 = plan.row(hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SessaLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, plan: ModelPlan | None = None) -> None:
        super().__init__()
        plan = plan or ModelPlan()
        D = cfg.d_model
        self.plan = plan
        self.norm = nn.LayerNorm(D, eps=cfg.ln_eps)
        self.in_proj = plan.column(D, 2 * D, parts=2)
        self.mixer = SessaMixer(cfg, plan)
        self.out_proj = plan.row(D, D)
        self.mlp_norm = nn.LayerNorm(D, eps=cfg.ln_eps) if cfg.ffn_hidden_size else None
        self.mlp = MLP(D, cfg.ffn_hidden_size, plan) if cfg.ffn_hidden_size else None

    def forward(self, x: torch.Tensor, cache: MixerCache | None = None) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D)."""
        a, g = self.in_proj(self.norm(x)).chunk(2, dim=-1)  # this rank's channels of each
        y = x + self.out_proj(self.mixer(self.plan.gather(F.gelu(a)), cache) * g)
        if self.mlp is not None:
            y = y + self.mlp(self.mlp_norm(y))
        return y
