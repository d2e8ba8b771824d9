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
kernels, CUDA tensors; CPU only under ``TRITON_INTERPRET=1``). ``select_solver`` is the only
place that turns a request into a backend and block size: ``auto`` picks ``triton`` for CUDA
tensors and ``chunked`` otherwise, and the environment variable ``SESSA_FEEDBACK_BACKEND``
replaces ``auto`` wherever it was asked for.

Continuation. The blockwise backends solve a block of rows whose earlier rows live elsewhere
(a context-parallel rank, ``parallel/context_parallel.py``), in the flattened layout
q, k (N, T, Dk), f (N, T, Dv), gamma (N, T) with N = B * H:

    solve_forward(solver, q, k, f, gamma, scale, prefix)  -> Solved(s, c, lse)
        prefix = Prefix(lse_p, h_p): per own row, the log-sum-exp of its logits against the
        earlier keys and h_p = sum_j exp(logit_j - lse_p) s_j over them (None: no earlier rows).
        Out: the states s that later rows attend to, c = A s, and each row's log-sum-exp over
        all its keys (what the adjoint of later rows needs).
    solve_backward(solver, G, q, k, gamma, solved, scale) -> (dq, dk, df, dgamma)
        G = dL/ds plus what later rows push back into these rows (the adjoint's accumulator).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from sessa_train.config import FEEDBACK_BACKENDS
from sessa_train.errors import ConfigError
from sessa_train.ops.feedback_chunked import chunked_backward, chunked_forward
from sessa_train.ops.feedback_reference import feedback_solve_reference

BACKEND_ENV = "SESSA_FEEDBACK_BACKEND"
DEFAULT_CHUNK_SIZE = {"chunked": 128, "triton": 64}  # chunked: measured on CPU (docs/benchmarks.md)
TRITON_BLOCK_SIZES = (16, 32, 64, 128)
HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Solver:
    """A concrete backend (``reference``, ``chunked`` or ``triton``) and its rows per block
    (None for ``reference``), as chosen by ``select_solver``."""

    backend: str
    chunk: int | None
    graphs: bool = False  # Triton on CUDA: replay each shape's chunk loop from a CUDA graph

    @property
    def blockwise(self) -> bool:
        """Whether it has the continuation entry points (``solve_forward``/``solve_backward``)."""
        return self.backend != "reference"

    def compute_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype the solve runs in for inputs of ``dtype``: the Triton kernels take half
        inputs themselves (float32 accumulation); the torch solves compute them in float32."""
        return dtype if self.backend == "triton" or dtype not in HALF else torch.float32


def select_solver(
    backend: str = "auto", device: torch.device | str = "cpu", chunk_size: int | None = None, graphs: bool = False
) -> Solver:
    """The solver for ``backend`` (possibly ``auto``) on ``device``; ``chunk_size`` None = the
    backend's default; ``graphs``: capture the Triton kernels' chunk loops in CUDA graphs (on CUDA).
    Raises a one-line ConfigError for a request that cannot run: call it at set-up time."""
    device = torch.device(device)
    if backend == "auto":
        backend = os.environ.get(BACKEND_ENV, "auto")
        if backend not in FEEDBACK_BACKENDS:
            raise ConfigError(
                f"{BACKEND_ENV}={backend!r} is not a feedback backend; valid: {', '.join(FEEDBACK_BACKENDS)}"
            )
    elif backend not in FEEDBACK_BACKENDS:
        raise ConfigError(f"feedback_solve: unknown backend {backend!r}; valid: {', '.join(FEEDBACK_BACKENDS)}")
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "chunked"
    if backend == "reference":
        return Solver("reference", None)
    if chunk_size is None:
        chunk_size = DEFAULT_CHUNK_SIZE[backend]
    if chunk_size < 1:
        raise ConfigError(f"feedback_solve: chunk_size must be >= 1, got {chunk_size}")
    if backend == "triton":
        if chunk_size not in TRITON_BLOCK_SIZES:
            raise ConfigError(
                f"feedback_solve: the triton backend needs chunk_size in {TRITON_BLOCK_SIZES}, got {chunk_size}"
            )
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise ConfigError(
                f"feedback_solve: the triton backend needs CUDA tensors (got device {device}); "
                "on CPU use backend 'chunked', or set TRITON_INTERPRET=1 before importing triton"
            )
    return Solver(backend, chunk_size, graphs and backend == "triton" and device.type == "cuda")


class Prefix(NamedTuple):
    """What rows before a block contribute to each of its rows (see the module docstring)."""

    lse: torch.Tensor  # (N, T)
    h: torch.Tensor  # (N, T, Dv)


class Solved(NamedTuple):
    """A block's solution and what its adjoint (and later rows' adjoints) need."""

    s: torch.Tensor  # (N, T, Dv)
    c: torch.Tensor  # (N, T, Dv), c = A s (dgamma = lambda . c)
    lse: torch.Tensor  # (N, T), every row's log-sum-exp over all its earlier keys


def _blockwise(solver: Solver):
    """(forward, backward) functions of a blockwise backend."""
    if solver.backend == "triton":
        from sessa_train.ops import feedback_triton as ft  # imports triton: only when used

        return ft.triton_forward, ft.triton_backward
    if solver.backend == "chunked":
        return chunked_forward, chunked_backward
    raise ConfigError(f"the {solver.backend} feedback backend cannot continue a solve; use chunked or triton")


def solve_forward(solver: Solver, q, k, f, gamma, scale: float, prefix: Prefix | None = None) -> Solved:
    """Blocked forward substitution of one block of rows, continuing from ``prefix``."""
    forward = _blockwise(solver)[0]
    if solver.graphs and prefix is None:
        from sessa_train.ops.feedback_triton import graphed

        return Solved(*graphed(forward, (q, k, f, gamma), scale, solver.chunk))
    return Solved(*forward(q, k, f, gamma, scale, solver.chunk, prefix))


def solve_backward(solver: Solver, grad_s, q, k, gamma, solved: Solved, scale: float) -> tuple[torch.Tensor, ...]:
    """The adjoint of ``solve_forward``: (dq, dk, df, dgamma) for G = ``grad_s``."""
    backward = _blockwise(solver)[1]
    if solver.graphs:
        from sessa_train.ops.feedback_triton import graphed

        return graphed(backward, (grad_s, q, k, gamma, *solved), scale, solver.chunk)
    return backward(grad_s, q, k, gamma, *solved, scale, solver.chunk)


class BlockwiseFeedbackSolve(torch.autograd.Function):
    """Autograd of a blockwise solver: saves q, k, gamma, s, c and lse (all O(T * D)); no
    T x T tensor in either pass. Gradients come back in the inputs' dtypes."""

    @staticmethod
    def forward(ctx, q, k, f, gamma, scale: float, solver: Solver):  # type: ignore[override]
        solved = solve_forward(solver, q, k, f, gamma, scale)
        ctx.save_for_backward(q, k, gamma, *solved)
        ctx.scale, ctx.solver = scale, solver
        ctx.dtypes = (q.dtype, k.dtype, f.dtype, gamma.dtype)
        return solved.s.to(f.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_s):  # type: ignore[override]
        q, k, gamma, *solved = ctx.saved_tensors
        grads = solve_backward(ctx.solver, grad_s.contiguous(), q, k, gamma, Solved(*solved), ctx.scale)
        return (*(g.to(dt) for g, dt in zip(grads, ctx.dtypes, strict=True)), None, None)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, f: torch.Tensor, gamma: torch.Tensor, solver: Solver) -> None:
    for name, x, rank in (("q_b", q, 4), ("k_b", k, 4), ("f", f, 4), ("gamma", gamma, 3)):
        if x.dim() != rank:
            raise ValueError(f"feedback_solve: {name} must have rank {rank}, got shape {tuple(x.shape)}")
    if q.shape != k.shape:
        raise ValueError(f"feedback_solve: q_b shape {tuple(q.shape)} != k_b shape {tuple(k.shape)}")
    if f.shape[:3] != q.shape[:3]:
        raise ValueError(f"feedback_solve: f shape {tuple(f.shape)} must match q_b's (B, H, T) = {tuple(q.shape[:3])}")
    if gamma.shape != q.shape[:3]:
        raise ValueError(f"feedback_solve: gamma shape {tuple(gamma.shape)} must be (B, H, T) = {tuple(q.shape[:3])}")
    triton_dtypes = (torch.float32, *HALF)
    if solver.backend == "triton" and (f.dtype not in triton_dtypes or len({q.dtype, k.dtype, f.dtype}) != 1):
        raise ValueError(
            f"feedback_solve: the triton backend needs q_b, k_b, f of one dtype among float32/float16/bfloat16, "
            f"got {q.dtype}, {k.dtype}, {f.dtype}"
        )
    if solver.backend == "triton" and f.is_cuda:
        from sessa_train.ops.feedback_triton import block_fits

        major, minor = torch.cuda.get_device_capability(f.device)
        if not block_fits(solver.chunk, f.dtype, 10 * major + minor):
            raise ConfigError(
                f"feedback_solve: the triton backend's {solver.chunk}-row blocks need bf16/fp16 inputs on sm_90 or "
                f"later and Triton >= 3.6; got {f.dtype} on sm_{major}{minor}: use compute.feedback_chunk_size=64"
            )


def flatten_heads(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, H, T, ...) -> contiguous (B * H, T, ...) in ``dtype``: the layout of the blockwise solvers."""
    return x.to(dtype).reshape(-1, *x.shape[2:]).contiguous()


def feedback_solve(
    q: torch.Tensor,
    k: torch.Tensor,
    f: torch.Tensor,
    gamma: torch.Tensor,
    *,
    scale: float | None = None,
    backend: str = "auto",
    chunk_size: int | None = None,
    solver: Solver | None = None,
) -> torch.Tensor:
    """Solve the causal feedback system; see the module docstring for shapes.

    ``scale`` defaults to Dk**-0.5 (the reference's 1/sqrt(D) for one head over width D).
    ``solver`` (from ``select_solver``) replaces ``backend``/``chunk_size``; ``chunk_size``
    (rows per block; None = the backend's default) does not apply to ``reference``.
    """
    solver = solver or select_solver(backend, q.device, chunk_size)
    _check_inputs(q, k, f, gamma, solver)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if solver.backend == "reference":
        return feedback_solve_reference(q, k, f, gamma, scale)
    B, H, T, Dv = f.shape
    dtype = solver.compute_dtype(f.dtype)
    s = BlockwiseFeedbackSolve.apply(
        flatten_heads(q, dtype),
        flatten_heads(k, dtype),
        flatten_heads(f, dtype),
        flatten_heads(gamma, dtype),
        scale,
        solver,
    )
    return s.reshape(B, H, T, Dv).to(f.dtype)


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
