"""The forward branch shared by the Sessa mixer and the Transformer baseline.

    f = Wo . SDPA(RoPE(q), RoPE(k), v, causal)      q, k, v = Wq a, Wk a, Wv a (k, v: GQA heads)

Head counts are inferred from the projections' widths, so a tensor-parallel rank (whose
column-parallel q/k/v hold its heads only) runs this same code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
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


ROWS_PER_BLOCK = 256  # query rows per masked attention call of packed documents


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: Positions) -> torch.Tensor:
    """Causal attention of q (B, H, T, d) at rows ``pos`` over k, v (B, Hkv, S, d) at positions
    0 .. S - 1 (S = pos.start + T, or all cached keys when decoding), each row reading the keys of
    its own document only.

    One document: SDPA with its causal mask (aligned to the last key when the rows do not start the
    sequence), which the flash kernels take. Packed documents: the rows in blocks of
    ``ROWS_PER_BLOCK``, each over the keys from the earliest document start of its rows on, with a
    (B, 1, block, keys) mask: blocks wholly before a row's document are skipped, not masked, and no
    T x T mask is materialised.
    """
    gqa = q.shape[1] != k.shape[1]
    T, S = q.shape[2], k.shape[2]
    if pos.doc_start is None:
        if T == S:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        from torch.nn.attention.bias import causal_lower_right  # here: its module imports torch._dynamo (~1 s)

        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(T, S), enable_gqa=gqa)
    first = S - T  # the index of the first row
    lows = pos.doc_start[:, ::ROWS_PER_BLOCK].amin(0).tolist()  # per block: its earliest document start
    out = []
    for block, r0 in enumerate(range(0, T, ROWS_PER_BLOCK)):
        r1, lo = min(r0 + ROWS_PER_BLOCK, T), lows[block]
        keys = torch.arange(lo, first + r1, device=q.device)
        rows = torch.arange(first + r0, first + r1, device=q.device)
        mask = (keys[None, :] <= rows[:, None]) & (keys[None, None, :] >= pos.doc_start[:, r0:r1, None])
        kv = slice(lo, first + r1)
        out.append(F.scaled_dot_product_attention(q[:, :, r0:r1], k[:, :, kv], v[:, :, kv],
                                                  attn_mask=mask.unsqueeze(1), enable_gqa=gqa))  # fmt: skip
    return torch.cat(out, dim=2)


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
