"""The Sessa layer (pre-norm, gated, residual) and the optional MLP sub-block.

u    = LayerNorm(x);   a, g = split(W_in u, 2);   s = Mixer(GELU(a))
y    = x + W_out(s * g)
y    = y + MLP(LayerNorm(y))        only when ffn_hidden_size > 0 (the reference has none)

Under tensor parallelism W_in is column-parallel with a and g blocks cut alike (a rank gets
its channels of both); a is gathered (q/k/v and W_fb read all of it), g stays split like s,
and W_out is row-parallel. Under sequence parallelism x (the residual stream) and the
LayerNorms hold this rank's rows of the sequence only: W_in gathers the rows, W_out sums into
this rank's rows (``residual`` linears, ``models/plan.py``); the mixer always sees every row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sessa_train.config import ModelConfig
from sessa_train.models.architecture import Architecture
from sessa_train.models.mixer import SessaCache, SessaMixer
from sessa_train.models.plan import ModelPlan
from sessa_train.models.positions import Positions


class MLP(nn.Module):
    """GELU feed-forward D -> hidden -> D (column- then row-parallel)."""

    def __init__(self, d_model: int, hidden: int, plan: ModelPlan) -> None:
        super().__init__()
        self.fc1 = plan.column(d_model, hidden, residual=True)
        self.fc2 = plan.row(hidden, d_model, residual=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.profiler.record_function("sessa.mlp"):
            return self.fc2(F.gelu(self.fc1(x)))


class SessaLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, plan: ModelPlan | None = None) -> None:
        super().__init__()
        plan = plan or ModelPlan()
        D = cfg.d_model
        self.plan = plan
        self.norm = plan.norm(D, cfg.ln_eps)
        self.in_proj = plan.column(D, 2 * D, parts=2, residual=True)
        self.mixer = SessaMixer(cfg, plan)
        self.out_proj = plan.row(D, D, residual=True)
        self.mlp_norm = plan.norm(D, cfg.ln_eps) if cfg.ffn_hidden_size else None
        self.mlp = MLP(D, cfg.ffn_hidden_size, plan) if cfg.ffn_hidden_size else None

    def init_cache(self, batch_size: int, max_len: int, *, device=None, dtype=None) -> SessaCache:
        return self.mixer.init_cache(batch_size, max_len, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, pos: Positions | None = None, cache: SessaCache | None = None) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D); ``pos`` None: the rows are a whole sequence."""
        pos = pos or self.plan.positions(x.shape[1])
        a, g = self.in_proj(self.norm(x)).chunk(2, dim=-1)  # this rank's channels of each
        y = x + self.out_proj(self.mixer(self.plan.gather(F.gelu(a)), pos, cache) * g)
        if self.mlp is not None:
            y = y + self.mlp(self.mlp_norm(y))
        return y


def _sessa_divisible(cfg: ModelConfig) -> dict[str, int]:
    divisible = {"n_heads": cfg.n_heads, "n_kv_heads": cfg.kv_heads}
    if cfg.feedback_heads > 1:  # one head is replicated; several are split over the ranks
        divisible["feedback_heads"] = cfg.feedback_heads
    if cfg.ffn_hidden_size:
        divisible["ffn_hidden_size"] = cfg.ffn_hidden_size
    return divisible


SESSA = Architecture("sessa", SessaLayer, _sessa_divisible)
