"""Rotary position embedding over interleaved (even, odd) channel pairs.

Pair i of a head of width d is (x[2i], x[2i+1]) rotated by pos * theta^(-2i/d), the
convention of the public Sessa reference (not the rotate-half layout of GPT-NeoX/Llama).
Frequencies are rounded to float32 as in the reference; angles, cos and sin are computed
in float64 for float64 inputs and in float32 otherwise (also for bf16/fp16 inputs).
"""

from __future__ import annotations

import torch


def _table_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> torch.Tensor:
    """Angles (..., T, head_dim // 2) for integer positions (..., T) (one sequence, or one per
    row of a batch of packed documents), for inputs of ``dtype``."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    table = _table_dtype(dtype)
    return positions.to(table)[..., None] * inv_freq.to(table)


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, d) by angles (T, d/2) or (B, T, d/2); returns x's dtype."""
    if angles.dim() == 3:
        angles = angles.unsqueeze(1)  # the same angles for every head of a row
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)
