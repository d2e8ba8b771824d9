"""The Sessa mixer: causal attention f, then the feedback solve (I - diag(gamma) A) s = f.

q, k, v  = Wq a, Wk a, Wv a               (B,T,D) -> heads; k, v may have fewer (GQA)
f        = Wo . SDPA(RoPE(q), RoPE(k), v, causal)        (Wo only when n_heads > 1)
q_b, k_b = split(W_fb a, 2)               feedback heads, no RoPE
gamma    = gamma_max * tanh(b + w . a)    (B,T,feedback_heads)
s        = feedback_solve(q_b, k_b, f, gamma)

Under tensor parallelism (``models/plan.py``) q/k/v are split by heads and Wo sums over ranks.
The feedback heads are split over ranks when there are several; the paper's single head is
replicated instead: every rank computes the whole q_b, k_b and gamma and solves its own
channels of f against them, and their gradients are summed over the ranks (``plan.shared``).
Either way a rank returns its channels of s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sessa_train.config import ModelConfig
from sessa_train.models.attention import AttentionCache, attention_cache, causal_attention, split_heads
from sessa_train.models.plan import ModelPlan, Split
from sessa_train.models.positions import Positions
from sessa_train.ops import feedback_decode_step


@dataclass
class SessaCache(AttentionCache):
    """Per-layer decode state: the forward branch's k, v, and the feedback keys k_b and past
    states s, (B, Hfb, max_len, D / Hfb) each."""

    k_b: torch.Tensor
    s: torch.Tensor


class SessaMixer(nn.Module):
    def __init__(self, cfg: ModelConfig, plan: ModelPlan | None = None) -> None:
        super().__init__()
        plan = plan or ModelPlan()
        self.cfg, self.plan = cfg, plan
        D, hd, H = cfg.d_model, cfg.head_dim, cfg.feedback_heads
        self.q_proj = plan.column(D, cfg.n_heads * hd)
        self.k_proj = plan.column(D, cfg.kv_heads * hd)
        self.v_proj = plan.column(D, cfg.kv_heads * hd)
        self.o_proj = plan.row(D, D, bias=False) if cfg.n_heads > 1 else nn.Identity()
        if H > 1:  # feedback heads split over tensor-parallel ranks
            self.fb_proj = plan.column(D, 2 * D, parts=2)
            self.gamma_proj = plan.column(D, H, bias=False)
        else:  # the single head: whole on every rank
            self.fb_proj = plan.replicated(D, 2 * D)
            self.gamma_proj = plan.replicated(D, 1, bias=False)
        plan.parameter(self, "gamma_bias", torch.full((H,), cfg.gamma_bias_init), Split(0) if H > 1 else None)

    def sequence_flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token that grow with the sequence: QK^T and AV of the forward branch
        over on average T/2 keys, and the feedback solve's q_b k_b^T and A s over T/2 earlier rows."""
        return 2 * (2 * 2 * (seq_len / 2) * self.cfg.d_model)

    def init_cache(self, batch_size: int, max_len: int, *, device=None, dtype=None) -> SessaCache:
        cfg, p = self.cfg, self.fb_proj.weight
        device, dtype = device or p.device, dtype or p.dtype
        kv = attention_cache(cfg, batch_size, max_len, device, dtype)
        fb = (batch_size, cfg.feedback_heads, max_len, cfg.d_model // cfg.feedback_heads)
        new = lambda: torch.zeros(fb, device=device, dtype=dtype)  # noqa: E731
        return SessaCache(k=kv.k, v=kv.v, k_b=new(), s=new())

    def forward(self, a: torch.Tensor, pos: Positions | None = None, cache: SessaCache | None = None) -> torch.Tensor:
        """a (B, T, D) -> s (B, T, D / tensor-parallel ranks).

        With a cache: an empty cache is filled by the parallel forward (prefill); a non-empty
        one takes exactly one new token (decode), which continues the recurrence.
        """
        cfg, plan = self.cfg, self.plan
        if a.dim() != 3 or a.shape[-1] != cfg.d_model:
            raise ValueError(f"SessaMixer expects input of shape (batch, seq, {cfg.d_model}), got {tuple(a.shape)}")
        B, T, _ = a.shape
        pos = pos or plan.positions(T)
        start = pos.start
        # the column-parallel projections read a through one mark: their gradients are summed over
        # the tensor-parallel ranks there, once; the single feedback head marks its own outputs
        split = plan.shared(a)
        f = causal_attention(self, split, pos, cache)  # (B, T, D), every channel; writes k, v into a cache
        head_input = split if cfg.feedback_heads > 1 else a
        fb = self.fb_proj(head_input)
        gamma = cfg.gamma_max * torch.tanh(self.gamma_bias + self.gamma_proj(head_input))  # (B, T, local heads)
        if cfg.feedback_heads == 1:
            fb, gamma = plan.shared(fb), plan.shared(gamma)
        dfb = cfg.d_model // cfg.feedback_heads
        q_b, k_b = (split_heads(x, dfb) for x in fb.chunk(2, dim=-1))  # (B, local heads, T, dfb)
        f = plan.scatter(f).view(B, T, q_b.shape[1], -1).transpose(1, 2)  # this rank's channels, per head
        gamma = gamma.transpose(1, 2)
        scale = dfb**-0.5
        if cache is not None:
            cache.k_b[:, :, start : start + T] = k_b
        if cache is not None and start > 0:
            first = None if pos.doc_start is None else pos.doc_start[:, 0]
            past = (cache.k_b[:, :, :start], cache.s[:, :, :start])
            s = feedback_decode_step(q_b[:, :, 0], *past, f[:, :, 0], gamma[:, :, 0], scale, first).unsqueeze(2)
        else:
            s = plan.solve(q_b, k_b, f, gamma, scale, pos)
        if cache is not None:
            cache.s[:, :, start : start + T] = s
        return s.transpose(1, 2).flatten(2)
