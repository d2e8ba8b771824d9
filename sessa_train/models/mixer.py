"""The Sessa mixer: causal attention f, then the feedback solve (I - diag(gamma) A) s = f.

q, k, v  = Wq a, Wk a, Wv a              (B,T,D) -> heads; k, v may have fewer (GQA)
f        = Wo . SDPA(RoPE(q), RoPE(k), v, causal)        (Wo only when n_heads > 1)
q_b, k_b = split(W_fb a, 2)               feedback heads, no RoPE
gamma    = gamma_max * tanh(b + w . a)    (B,T,feedback_heads)
s        = feedback_solve(q_b, k_b, f, gamma)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sessa_train.config import ModelConfig
from sessa_train.models.rope import apply_rope, rope_angles
from sessa_train.ops import feedback_decode_step, feedback_solve


@dataclass
class MixerCache:
    """Per-layer decode state, preallocated to ``max_len`` positions.

    k, v (B, Hkv, max_len, head_dim): forward-branch keys (after RoPE) and values;
    k_b (B, Hfb, max_len, dfb): feedback keys; s (B, Hfb, max_len, dfb): past states.
    """

    k: torch.Tensor
    v: torch.Tensor
    k_b: torch.Tensor
    s: torch.Tensor
    length: int = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


def _check_width(x: torch.Tensor, d_model: int, what: str) -> None:
    if x.dim() != 3 or x.shape[-1] != d_model:
        raise ValueError(f"{what} expects input of shape (batch, seq, {d_model}), got {tuple(x.shape)}")


def _heads(x: torch.Tensor, n: int) -> torch.Tensor:
    """(B, T, n*c) -> (B, n, T, c)."""
    B, T, _ = x.shape
    return x.view(B, T, n, -1).transpose(1, 2)


def causal_attention(module: nn.Module, a: torch.Tensor, cache: MixerCache | None, start: int) -> torch.Tensor:
    """The forward branch f = Wo . SDPA(RoPE(q), RoPE(k), v, causal) of a module with q_proj,
    k_proj, v_proj, o_proj and cfg (shared by SessaMixer and the Transformer baseline).

    a (B, T, D) -> (B, T, D). With a cache, k and v of positions start.. are stored first.
    """
    cfg = module.cfg
    B, T, D = a.shape
    q = _heads(module.q_proj(a), cfg.n_heads)
    k = _heads(module.k_proj(a), cfg.kv_heads)
    v = _heads(module.v_proj(a), cfg.kv_heads)
    if cfg.rope:
        angles = rope_angles(torch.arange(start, start + T, device=a.device), cfg.head_dim, cfg.rope_theta, a.dtype)
        q, k = apply_rope(q, angles), apply_rope(k, angles)
    if cache is not None:
        end = start + T
        cache.k[:, :, start:end], cache.v[:, :, start:end] = k, v
        k, v = cache.k[:, :, :end], cache.v[:, :, :end]
    f = F.scaled_dot_product_attention(q, k, v, is_causal=start == 0, enable_gqa=cfg.kv_heads != cfg.n_heads)
    return module.o_proj(f.transpose(1, 2).reshape(B, T, D))


class SessaMixer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D, hd = cfg.d_model, cfg.head_dim
        self.q_proj = nn.Linear(D, cfg.n_heads * hd)
        self.k_proj = nn.Linear(D, cfg.kv_heads * hd)
        self.v_proj = nn.Linear(D, cfg.kv_heads * hd)
        self.o_proj = nn.Linear(D, D, bias=False) if cfg.n_heads > 1 else nn.Identity()
        self.fb_proj = nn.Linear(D, 2 * D)
        self.gamma_proj = nn.Linear(D, cfg.feedback_heads, bias=False)
        self.gamma_bias = nn.Parameter(torch.full((cfg.feedback_heads,), cfg.gamma_bias_init))

    def init_cache(self, batch_size: int, max_len: int, *, device=None, dtype=None) -> MixerCache:
        cfg = self.cfg
        p = self.fb_proj.weight
        device, dtype = device or p.device, dtype or p.dtype
        dfb = cfg.d_model // cfg.feedback_heads
        kv = (batch_size, cfg.kv_heads, max_len, cfg.head_dim)
        fb = (batch_size, cfg.feedback_heads, max_len, dfb)
        new = lambda shape: torch.zeros(shape, device=device, dtype=dtype)  # noqa: E731
        return MixerCache(k=new(kv), v=new(kv), k_b=new(fb), s=new(fb))

    def forward(self, a: torch.Tensor, cache: MixerCache | None = None) -> torch.Tensor:
        """a (B, T, D) -> s (B, T, D).

        With a cache: an empty cache is filled by the parallel forward (prefill); a non-empty
        one takes exactly one new token (decode), which continues the recurrence.
        """
        cfg = self.cfg
        _check_width(a, cfg.d_model, "SessaMixer")
        B, T, D = a.shape
        start = 0 if cache is None else cache.length
        if cache is not None:
            if start > 0 and T != 1:
                raise ValueError(f"decode takes one token at a time after prefill, got {T} tokens")
            if start + T > cache.max_len:
                raise ValueError(f"cache overflow: {start} + {T} tokens > max_len={cache.max_len}")

        f = causal_attention(self, a, cache, start)  # (B, T, D); writes k, v into the cache
        q_b, k_b = (_heads(x, cfg.feedback_heads) for x in self.fb_proj(a).chunk(2, dim=-1))
        gamma = (cfg.gamma_max * torch.tanh(self.gamma_bias + self.gamma_proj(a))).transpose(1, 2)  # (B,Hfb,T)
        scale = 1.0 / math.sqrt(q_b.shape[-1])
        if cache is not None:
            cache.k_b[:, :, start : start + T] = k_b
        f = _heads(f, cfg.feedback_heads)  # (B, Hfb, T, dfb)

        if start == 0:
            chunk = cfg.feedback_chunk_size or None
            s = feedback_solve(q_b, k_b, f, gamma, scale=scale, backend=cfg.feedback_backend, chunk_size=chunk)
        else:
            s = feedback_decode_step(
                q_b[:, :, 0], cache.k_b[:, :, :start], cache.s[:, :, :start], f[:, :, 0], gamma[:, :, 0], scale
            ).unsqueeze(2)
        if cache is not None:
            cache.s[:, :, start : start + T] = s
            cache.length = start + T
        return s.transpose(1, 2).reshape(B, T, D)
