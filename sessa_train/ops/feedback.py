"""The one dispatch point for the Sessa feedback solve.

    s = feedback_solve(q_b, k_b, f, gamma)   solves   (I - diag(gamma) A) s = f,
    A[t, j] = softmax_{j<t}(scale * q_b[t] . k_b[j]) for j < t, A[0, :] = 0.

Shapes (head-major, like ``scaled_dot_product_attention``):
    q_b, k_b  (B, H, T, Dk)   feedback queries / keys, H feedback heads
    f         (B, H, T, Dv)   forward-branch output split over the same heads
    gamma     (B, H, T)       per-token feedback gain
    returns s (B, H, T, Dv)

Backends: ``reference`` (dense T x T solve, the oracle) and ``chunked`` (blocked forward
substitution, O(T * D) memory). ``auto`` picks ``chunked``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from sessa_train.ops.feedback_chunked import feedback_solve_chunked
from sessa_train.ops.feedback_reference import feedback_solve_reference

Backend = Literal["auto", "reference", "chunked"]
BACKENDS: tuple[str, ...] = ("auto", "reference", "chunked")
DEFAULT_CHUNK_SIZE = 64


def _check_inputs(q: torch.Tensor, k: torch.Tensor, f: torch.Tensor, gamma: torch.Tensor) -> None:
    for name, x, rank in (("q_b", q, 4), ("k_b", k, 4), ("f", f, 4), ("gamma", gamma, 3)):
        if x.dim() != rank:
            raise ValueError(f"feedback_solve: {name} must have rank {rank}, got shape {tuple(x.shape)}")
    if q.shape != k.shape:
        raise ValueError(f"feedback_solve: q_b shape {tuple(q.shape)} != k_b shape {tuple(k.shape)}")
    if f.shape[:3] != q.shape[:3]:
        raise ValueError(f"feedback_solve: f shape {tuple(f.shape)} must match q_b's (B, H, T) = {tuple(q.shape[:3])}")
    if gamma.shape != q.shape[:3]:
        raise ValueError(f"feedback_solve: gamma shape {tuple(gamma.shape)} must be (B, H, T) = {tuple(q.shape[:3])}")


def feedback_solve(
    q: torch.Tensor,
    k: torch.Tensor,
    f: torch.Tensor,
    gamma: torch.Tensor,
    *,
    scale: float | None = None,
    backend: Backend = "auto",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Solve the causal feedback system; see the module docstring for shapes.

    ``scale`` defaults to Dk**-0.5 (the reference's 1/sqrt(D) for one head over width D).
    """
    _check_inputs(q, k, f, gamma)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if backend not in BACKENDS:
        raise ValueError(f"feedback_solve: unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if chunk_size < 1:
        raise ValueError(f"feedback_solve: chunk_size must be >= 1, got {chunk_size}")
    if backend == "reference":
        return feedback_solve_reference(q, k, f, gamma, scale)
    return feedback_solve_chunked(q, k, f, gamma, scale, chunk_size)


def feedback_decode_step(
    q_t: torch.Tensor,
    k_past: torch.Tensor,
    s_past: torch.Tensor,
    f_t: torch.Tensor,
    gamma_t: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One recurrent step: s_t = f_t + gamma_t * softmax(scale * q_t . K_b[<t]) S[<t].

    q_t (B, H, Dk); k_past (B, H, t, Dk); s_past (B, H, t, Dv); f_t (B, H, Dv); gamma_t (B, H).
    With t == 0 (no past) s_t = f_t. O(t * D) per token.
    """
    if k_past.shape[-2] == 0:
        return f_t
    weights = torch.softmax(torch.einsum("bhd,bhjd->bhj", q_t, k_past) * scale, dim=-1)
    return f_t + gamma_t.unsqueeze(-1) * torch.einsum("bhj,bhjd->bhd", weights, s_past)
