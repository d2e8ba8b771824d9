"""The one dispatch point for the Sessa feedback solve.

    s = feedback_solve(q_b, k_b, f, gamma)   solves   (I - diag(gamma) A) s = f,
    A[t, j] = softmax_{j<t}(scale * q_b[t] . k_b[j]) for j < t, A[0, :] = 0.

Shapes (head-major, like ``scaled_dot_product_attention``):
    q_b, k_b  (B, H, T, Dk)   feedback queries / keys, H feedback heads
    f         (B, H, T, Dv)   forward-branch output split over the same heads
    gamma     (B, H, T)       per-token feedback gain
    returns s (B, H, T, Dv)

Backends: ``reference`` (dense T x T solve, the oracle), ``chunked`` (blocked forward
substitution in torch, O(T * D) memory) and ``triton`` (the same algorithm as fused Triton
kernels, CUDA tensors; CPU only under ``TRITON_INTERPRET=1``). ``auto`` picks ``triton`` for
CUDA tensors and ``chunked`` otherwise. The environment variable ``SESSA_FEEDBACK_BACKEND``
forces a backend wherever ``auto`` was asked for.
"""

from __future__ import annotations

import math
import os
from typing import Literal

import torch

from sessa_train.ops.feedback_chunked import feedback_solve_chunked
from sessa_train.ops.feedback_reference import feedback_solve_reference

Backend = Literal["auto", "reference", "chunked", "triton"]
BACKENDS: tuple[str, ...] = ("auto", "reference", "chunked", "triton")
DEFAULT_CHUNK_SIZE = {"chunked": 128, "triton": 64}  # chunked: measured on CPU (docs/benchmarks.md)
BACKEND_ENV = "SESSA_FEEDBACK_BACKEND"


TRITON_BLOCK_SIZES = (16, 32, 64)


def resolve_backend(backend: str, device: torch.device, chunk_size: int | None = None) -> tuple[str, int | None]:
    """The concrete backend and chunk size for ``backend`` (possibly ``auto``) on ``device``.

    Raises a one-line ValueError for a request that cannot run: call it at set-up time.
    """
    if backend == "auto":
        backend = os.environ.get(BACKEND_ENV, "auto")
        if backend not in BACKENDS:
            raise ValueError(f"{BACKEND_ENV}={backend!r} is not a feedback backend; valid: {', '.join(BACKENDS)}")
    elif backend not in BACKENDS:
        raise ValueError(f"feedback_solve: unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "chunked"
    if backend == "reference":
        return backend, None
    if chunk_size is None:
        chunk_size = DEFAULT_CHUNK_SIZE[backend]
    if chunk_size < 1:
        raise ValueError(f"feedback_solve: chunk_size must be >= 1, got {chunk_size}")
    if backend == "triton":
        if chunk_size not in TRITON_BLOCK_SIZES:
            raise ValueError(
                f"feedback_solve: the triton backend needs chunk_size in {TRITON_BLOCK_SIZES}, got {chunk_size}"
            )
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise ValueError(
                f"feedback_solve: the triton backend needs CUDA tensors (got device {device}); "
                "on CPU use backend 'chunked', or set TRITON_INTERPRET=1 before importing triton"
            )
    return backend, chunk_size


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
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Solve the causal feedback system; see the module docstring for shapes.

    ``scale`` defaults to Dk**-0.5 (the reference's 1/sqrt(D) for one head over width D).
    ``chunk_size`` (rows per block; None = the backend's default) does not apply to ``reference``.
    """
    _check_inputs(q, k, f, gamma)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    backend, chunk_size = resolve_backend(backend, q.device, chunk_size)
    if backend == "reference":
        return feedback_solve_reference(q, k, f, gamma, scale)
    if backend == "triton":
        from sessa_train.ops.feedback_triton import feedback_solve_triton  # imports triton: only when used

        return feedback_solve_triton(q, k, f, gamma, scale, chunk_size)
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
