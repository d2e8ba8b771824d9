"""The one dispatch point for the Sessa feedback solve, and one record per backend.

    s = feedback_solve(q_b, k_b, f, gamma)   solves   (I - diag(gamma) A) s = f,
    A[t, j] = softmax_{j<t}(scale * q_b[t] . k_b[j]) for j < t, A[0, :] = 0.

Shapes (head-major, like ``scaled_dot_product_attention``):
    q_b, k_b  (B, H, T, Dk)   feedback queries / keys, H feedback heads
    f         (B, H, T, Dv)   forward-branch output split over the same heads
    gamma     (B, H, T)       per-token feedback gain
    returns s (B, H, T, Dv)

Backends (``BACKENDS``, one ``Backend`` record each: what it runs on, its blocks, the dtype it
computes in, the memory of its strips, its functions): ``reference`` (dense T x T solve, the
oracle), ``chunked`` (blocked forward substitution in torch, O(T * D) memory) and ``triton`` (the
same algorithm as fused Triton kernels, CUDA tensors; CPU only under ``TRITON_INTERPRET=1``).
``select_solver`` is the only place that turns a request into a ``Solver`` (a backend and its rows
per block): ``auto`` picks ``triton`` for CUDA tensors and ``chunked`` otherwise, and the
environment variable ``SESSA_FEEDBACK_BACKEND`` replaces ``auto`` wherever it was asked for.
Dispatch, context parallelism and ``sessa-plan`` all read the records.

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
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from sessa_train.config import FEEDBACK_BACKENDS
from sessa_train.errors import ConfigError
from sessa_train.ops.feedback_chunked import chunked_backward, chunked_forward
from sessa_train.ops.feedback_reference import feedback_solve_reference

BACKEND_ENV = "SESSA_FEEDBACK_BACKEND"
AUTO = {"cuda": "triton"}  # what ``auto`` means on a device type; ``chunked`` on any other
HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Backend:
    """What the framework knows of one way to solve the system.

    ``devices``: the tensor devices it runs on (``triton`` also on CPU when interpreting);
    ``blocks``: the rows per block it takes (None: any >= 1; ``()``: not blockwise);
    ``default_block``: its block for a sequence of T rows of width Dv; ``half_inputs``: it takes
    fp16/bf16 q, k, f as they are (float32 accumulators) instead of float32 copies; ``functions``:
    gives (forward, backward), its blockwise entry points (None: not blockwise; the Triton kernels
    are imported on first use);
    ``strip_bytes(N, T, block, itemsize)``: the memory of its largest transient (strips, or the
    dense system) during one backward of N sequences (the planner's model of it); ``cuda_graphs``:
    its chunk loops can be replayed from CUDA graphs; ``interpreter``: an environment variable
    that, set to 1, lets it run on CPU; ``check(block, dtype, device)`` refuses, in one line, a
    block the device cannot run."""

    name: str
    devices: tuple[str, ...]
    blocks: tuple[int, ...] | None
    default_block: Callable[[int, int], int] | None
    half_inputs: bool
    functions: Callable[[], tuple[Callable, Callable]] | None
    strip_bytes: Callable[[int, int, int, int], float]
    cuda_graphs: bool = False
    interpreter: str | None = None
    check: Callable[[int, torch.dtype, torch.device], None] | None = None

    @property
    def blockwise(self) -> bool:
        """Whether it has the continuation entry points (``solve_forward``/``solve_backward``)."""
        return self.functions is not None

    def compute_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype q, k, f and gamma are handed to it in, for inputs of ``dtype``."""
        return dtype if self.half_inputs or dtype not in HALF else torch.float32

    def entry_points(self) -> tuple[Callable, Callable]:
        """(forward, backward) of a blockwise backend."""
        if self.functions is None:
            raise ConfigError(f"the {self.name} feedback backend cannot continue a solve; use chunked or triton")
        return self.functions()

    def runs_on(self, device: torch.device) -> bool:
        return device.type in self.devices or bool(self.interpreter and os.environ.get(self.interpreter, "0") == "1")


def _triton_functions() -> tuple[Callable, Callable]:
    from sessa_train.ops import feedback_triton  # imports triton: only when used

    return feedback_triton.triton_forward, feedback_triton.triton_backward


def _triton_check(block: int, dtype: torch.dtype, device: torch.device) -> None:
    from sessa_train.ops import feedback_triton

    feedback_triton.check_block(block, dtype, device)


# The chunked solve's fastest block (rows) per (T, head width Dv), measured on the project's CPU
# (2 cores, fp32 forward + backward; a smaller block within 3% of the fastest wins):
# tools/bench_feedback.py --blocks, docs/bench_feedback_blocks.json, docs/benchmarks.md.
CHUNKED_BLOCKS: dict[tuple[int, int], int] = {
    (1024, 64): 64,
    (1024, 256): 256,
    (1024, 1024): 64,
    (2048, 64): 128,
    (2048, 256): 128,
    (2048, 1024): 128,
    (4096, 64): 256,
    (4096, 256): 256,
    (4096, 1024): 256,
    (8192, 64): 128,
    (8192, 256): 256,
    (8192, 1024): 256,
}


def _chunked_block(T: int, Dv: int) -> int:
    """The measured block of the nearest measured shape (distance in log2 T + log2 Dv)."""

    def distance(shape: tuple[int, int]) -> tuple[float, tuple[int, int]]:
        return abs(math.log2(shape[0] / T)) + abs(math.log2(shape[1] / Dv)), shape

    return CHUNKED_BLOCKS[min(CHUNKED_BLOCKS, key=distance)]


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        # several (N, T, T) tensors live at once: logits, A, the system and their gradients
        Backend("reference", ("cpu", "cuda"), (), None, False, None, lambda N, T, C, size: 4 * N * T * T * 4),
        # forward and backward hold float32 strips of C x T: scores, probabilities, their gradient
        Backend(
            "chunked", ("cpu", "cuda"), None, _chunked_block, False, lambda: (chunked_forward, chunked_backward),
            lambda N, T, C, size: 3 * N * C * T * 4,
        ),
        # the backward's column strip and dlogits strip in the GEMM dtype, and the float32 diagonal blocks
        Backend(
            "triton", ("cuda",), (16, 32, 64, 128), lambda T, Dv: 64, True, _triton_functions,
            lambda N, T, C, size: N * C * T * (2 * size + 4),
            cuda_graphs=True, interpreter="TRITON_INTERPRET", check=_triton_check,
        ),
    )
}  # fmt: skip


def resolve_backend(backend: str, device_type: str) -> Backend:
    """The record a request names for tensors on ``device_type`` (``auto``: the environment's
    choice, else ``triton`` on CUDA and ``chunked`` otherwise). No check that it can run here."""
    if backend == "auto":
        backend = os.environ.get(BACKEND_ENV, "auto")
        if backend not in FEEDBACK_BACKENDS:
            raise ConfigError(
                f"{BACKEND_ENV}={backend!r} is not a feedback backend; valid: {', '.join(FEEDBACK_BACKENDS)}"
            )
    elif backend not in FEEDBACK_BACKENDS:
        raise ConfigError(f"feedback_solve: unknown backend {backend!r}; valid: {', '.join(FEEDBACK_BACKENDS)}")
    if backend == "auto":
        backend = AUTO.get(device_type, "chunked")
    return BACKENDS[backend]


@dataclass(frozen=True)
class Solver:
    """A backend (by name, its record in ``BACKENDS``) and its rows per block (None: the record's
    default for each shape; always None for ``reference``), as chosen by ``select_solver``."""

    backend: str
    chunk: int | None = None
    graphs: bool = False  # Triton on CUDA: replay each shape's chunk loop from a CUDA graph (training)

    @property
    def record(self) -> Backend:
        return BACKENDS[self.backend]

    def block(self, T: int, Dv: int) -> int:
        """Rows per block for a sequence of T rows of width Dv."""
        return self.chunk or self.record.default_block(T, Dv)


def select_solver(
    backend: str = "auto", device: torch.device | str = "cpu", chunk_size: int | None = None, graphs: bool = False
) -> Solver:
    """The solver for ``backend`` (possibly ``auto``) on ``device``; ``chunk_size`` None = the
    backend's default; ``graphs``: capture the Triton kernels' chunk loops in CUDA graphs (on CUDA).
    Raises a one-line ConfigError for a request that cannot run: call it at set-up time."""
    device = torch.device(device)
    record = resolve_backend(backend, device.type)
    if not record.blockwise:
        return Solver(record.name)
    if chunk_size is not None and chunk_size < 1:
        raise ConfigError(f"feedback_solve: chunk_size must be >= 1, got {chunk_size}")
    if chunk_size is not None and record.blocks is not None and chunk_size not in record.blocks:
        raise ConfigError(
            f"feedback_solve: the {record.name} backend needs chunk_size in {record.blocks}, got {chunk_size}"
        )
    if not record.runs_on(device):
        raise ConfigError(
            f"feedback_solve: the {record.name} backend needs CUDA tensors (got device {device}); "
            f"on CPU use backend 'chunked', or set {record.interpreter}=1 before importing triton"
        )
    return Solver(record.name, chunk_size, graphs and record.cuda_graphs and device.type == "cuda")


class Prefix(NamedTuple):
    """What rows before a block contribute to each of its rows (see the module docstring)."""

    lse: torch.Tensor  # (N, T)
    h: torch.Tensor  # (N, T, Dv)


class Solved(NamedTuple):
    """A block's solution and what its adjoint (and later rows' adjoints) need."""

    s: torch.Tensor  # (N, T, Dv)
    c: torch.Tensor  # (N, T, Dv), c = A s (dgamma = lambda . c)
    lse: torch.Tensor  # (N, T), every row's log-sum-exp over all its earlier keys


def _replayed(solver: Solver) -> bool:
    """CUDA-graph replay: asked for, and a training step (graphs are kept per shape; eval and
    generation see a new prompt length every call)."""
    return solver.graphs and torch.is_grad_enabled()


def solve_forward(
    solver: Solver, q, k, f, gamma, scale: float, prefix: Prefix | None = None, starts: torch.Tensor | None = None
) -> Solved:
    """Blocked forward substitution of one block of rows, continuing from ``prefix``; ``starts``
    (N, T) int64: each row's first key of its own document, in this block's indices (None: 0)."""
    forward = solver.record.entry_points()[0]
    block = solver.block(q.shape[1], f.shape[-1])
    if _replayed(solver) and prefix is None:
        from sessa_train.ops.cuda_graphs import graphed

        return Solved(*graphed(forward, (q, k, f, gamma, starts), scale, block))
    return Solved(*forward(q, k, f, gamma, starts, scale, block, prefix))


def solve_backward(
    solver: Solver,
    grad_s,
    q,
    k,
    gamma,
    solved: Solved,
    scale: float,
    starts: torch.Tensor | None = None,
    graphs: bool = False,
) -> tuple[torch.Tensor, ...]:
    """The adjoint of ``solve_forward``: (dq, dk, df, dgamma) for G = ``grad_s`` (``graphs``: its
    forward was replayed from a CUDA graph, so is this)."""
    backward = solver.record.entry_points()[1]
    block = solver.block(q.shape[1], solved.s.shape[-1])
    if graphs:
        from sessa_train.ops.cuda_graphs import graphed

        return graphed(backward, (grad_s, q, k, gamma, starts, *solved), scale, block)
    return backward(grad_s, q, k, gamma, starts, *solved, scale, block)


class BlockwiseFeedbackSolve(torch.autograd.Function):
    """Autograd of a blockwise solver: saves q, k, gamma, s, c and lse (all O(T * D)); no
    T x T tensor in either pass. Gradients come back in the inputs' dtypes."""

    @staticmethod
    def forward(ctx, q, k, f, gamma, scale: float, solver: Solver, starts=None):  # type: ignore[override]
        ctx.graphs = _replayed(solver)
        solved = solve_forward(solver, q, k, f, gamma, scale, starts=starts)
        ctx.save_for_backward(q, k, gamma, *solved)
        ctx.scale, ctx.solver, ctx.starts = scale, solver, starts
        ctx.dtypes = (q.dtype, k.dtype, f.dtype, gamma.dtype)
        return solved.s.to(f.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_s):  # type: ignore[override]
        q, k, gamma, *solved = ctx.saved_tensors
        grads = solve_backward(
            ctx.solver, grad_s.contiguous(), q, k, gamma, Solved(*solved), ctx.scale, ctx.starts, ctx.graphs
        )
        return (*(g.to(dt) for g, dt in zip(grads, ctx.dtypes, strict=True)), None, None, None)


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
    record = solver.record
    if record.half_inputs and (f.dtype not in (torch.float32, *HALF) or len({q.dtype, k.dtype, f.dtype}) != 1):
        raise ValueError(
            f"feedback_solve: the {record.name} backend needs q_b, k_b, f of one dtype among float32/float16/bfloat16, "
            f"got {q.dtype}, {k.dtype}, {f.dtype}"
        )
    if record.check and f.is_cuda:
        record.check(solver.block(q.shape[2], f.shape[-1]), f.dtype, f.device)


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
    key_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Solve the causal feedback system; see the module docstring for shapes.

    ``scale`` defaults to Dk**-0.5 (the reference's 1/sqrt(D) for one head over width D).
    ``solver`` (from ``select_solver``) replaces ``backend``/``chunk_size``; ``chunk_size``
    (rows per block; None = the backend's default) does not apply to ``reference``.
    ``key_start`` (B, T) integer: packed documents, the index of each row's document start; row t's
    feedback attention is a softmax over keys key_start[t] .. t - 1 only (None: 0 .. t - 1). It
    must not decrease along a row's sequence (documents follow each other).
    """
    solver = solver or select_solver(backend, q.device, chunk_size)
    _check_inputs(q, k, f, gamma, solver)
    if key_start is not None and key_start.shape != q.shape[::2][:1] + q.shape[2:3]:
        raise ValueError(
            f"feedback_solve: key_start shape {tuple(key_start.shape)} must be (B, T) = {(q.shape[0], q.shape[2])}"
        )
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if not solver.record.blockwise:
        return feedback_solve_reference(q, k, f, gamma, scale, key_start)
    B, H, T, Dv = f.shape
    dtype = solver.record.compute_dtype(f.dtype)
    starts = None if key_start is None else flatten_starts(key_start, H)
    s = BlockwiseFeedbackSolve.apply(
        flatten_heads(q, dtype),
        flatten_heads(k, dtype),
        flatten_heads(f, dtype),
        flatten_heads(gamma, dtype),
        scale,
        solver,
        starts,
    )
    return s.reshape(B, H, T, Dv).to(f.dtype)


def flatten_starts(key_start: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, T) document starts -> (B * H, T) int64, the rows of every head of a sequence alike."""
    return key_start.to(torch.int64).repeat_interleave(heads, dim=0).contiguous()


def feedback_decode_step(
    q_t: torch.Tensor,
    k_past: torch.Tensor,
    s_past: torch.Tensor,
    f_t: torch.Tensor,
    gamma_t: torch.Tensor,
    scale: float,
    key_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """One recurrent step: s_t = f_t + gamma_t * softmax(scale * q_t . K_b[j0..t-1]) S[j0..t-1].

    q_t (B, H, Dk); k_past (B, H, t, Dk); s_past (B, H, t, Dv); f_t (B, H, Dv); gamma_t (B, H);
    ``key_start`` (B,): each row's document start j0 (None: 0). With no earlier key of its document
    s_t = f_t. O(t * D) per token.
    """
    if k_past.shape[-2] == 0:
        return f_t
    logits = torch.einsum("bhd,bhjd->bhj", q_t, k_past) * scale
    if key_start is not None:
        before = torch.arange(k_past.shape[-2], device=q_t.device)[None, :] < key_start[:, None]  # (B, t)
        logits = logits.masked_fill(before[:, None, :], float("-inf"))
        empty = before.all(dim=-1)[:, None, None]  # a row that starts a document here
        logits = logits.masked_fill(empty, 0.0)
        weights = torch.softmax(logits, dim=-1).masked_fill(empty, 0.0)
    else:
        weights = torch.softmax(logits, dim=-1)
    return f_t + gamma_t.unsqueeze(-1) * torch.einsum("bhj,bhjd->bhd", weights, s_past)
