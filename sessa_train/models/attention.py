"""The forward branch shared by the Sessa mixer and the Transformer baseline.

    f = Wo . SDPA(RoPE(q), RoPE(k), v, causal)      q, k, v = Wq a, Wk a, Wv a (k, v: GQA heads)

Head counts are inferred from the projections' widths, so a tensor-parallel rank (whose
column-parallel q/k/v hold its heads only) runs this same code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sessa_train.models.positions import Positions, TimeCache
from sessa_train.models.rope import apply_rope, rope_angles


@dataclass
class AttentionCache(TimeCache):
    """Forward-branch keys (after RoPE) and values, (B, Hkv, max_len, head_dim) each."""

    k: torch.Tensor
    v: torch.Tensor


def attention_cache(cfg, batch_size: int, max_len: int, device, dtype) -> AttentionCache:
    shape = (batch_size, cfg.kv_heads, max_len, cfg.head_dim)
    return AttentionCache(
        torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)
    )


def split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(B, T, n * head_dim) -> (B, n, T, head_dim)."""
    B, T, _ = x.shape
    return x.view(B, T, -1, head_dim).transpose(1, 2)


def causal_attention(module: nn.Module, a: torch.Tensor, pos: Positions, cache: AttentionCache | None) -> torch.Tensor:
    """f of a module with q_proj, k_proj, v_proj, o_proj, cfg and plan. a (B, T, D) -> (B, T, D).

    With a cache (one process), k and v of the rows are stored first and attention runs over
    every cached position.
    """
    cfg, plan = module.cfg, module.plan
    q = split_heads(module.q_proj(a), cfg.head_dim)
    k = split_heads(module.k_proj(a), cfg.head_dim)
    v = split_heads(module.v_proj(a), cfg.head_dim)
    if cfg.rope:
        angles = rope_angles(pos.arange(a.device), cfg.head_dim, cfg.rope_theta, a.dtype)
        q, k = apply_rope(q, angles), apply_rope(k, angles)
    if cache is not None:
        end = pos.start + pos.length
        cache.k[:, :, pos.start : end], cache.v[:, :, pos.start : end] = k, v
        k, v = cache.k[:, :, :end], cache.v[:, :, :end]
        f = plan.attend(q, k, v, pos)
    else:
        # selective recomputation: the attention core (its T x T scores where SDPA keeps them) is
        # recomputed in the backward from q, k, v, which are kept
        f = plan.recompute("selective", plan.attend, q, k, v, pos)
    return module.o_proj(f.transpose(1, 2).flatten(2))
