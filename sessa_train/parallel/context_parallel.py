"""The feedback solve of one sequence split over a context-parallel (CP) group of P ranks.

Rank r owns rows R_r, a contiguous block of the sequence (block sizes ``sizes``, in rank order).
The system (I - diag(gamma) A) s = f couples every row to all earlier ones, so exact forward
substitution is a chain over ranks: ring forward substitution (docs/parallelism.md weighs it
against block-Jacobi and head/channel all-to-all).

Forward, rank r (blocks travel r-1 -> r, forwarded on to r+1 as they arrive):
    for each earlier block j = 0..r-1, received as (k_j, s_j):
        online softmax over its logits L = scale q_r k_j^T:   (m, z, h) += (max, sum e^L, e^L s_j)
    lse_p = m + log z,  h_p = h / z                        (earlier keys only)
    s_r, c_r, lse_r = chunked solve of own rows, continuing from (lse_p, h_p)
    send (k_r, s_r) to r+1
Backward, rank r (row blocks travel r+1 -> r, forwarded on to r-1):
    for each later block b = P-1..r+1, received as (q_b, lse_b, gamma_b, lam_b, dgamma_b, dq_b):
        A = exp(scale q_b k_r^T - lse_b)                   (rows of b, own columns)
        push  += A^T (gamma_b lam_b)                       (what later rows feed back to ours)
        dL    =  gamma_b A (lam_b s_r^T - dgamma_b)        (dlogits of that block)
        dk_r  += scale dL^T q_b;  dq_b += scale dL k_r     (dq_b returns home from rank 0)
    lam_r, own dq/dk, dgamma_r = chunked adjoint solve of own rows with G + push
    send (q_r, lse_r, gamma_r, lam_r, dgamma_r, dq_r = 0) to r-1
Blocks travel in pieces of ``chunk`` rows, so each rank holds O(T_r D) plus a few pieces in
flight: memory per rank falls like 1/P. The dependency is a (P-1)-step chain each way; a rank
works on the pieces that already arrived while its predecessor finishes (sends are
asynchronous, one piece in flight per rank).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from sessa_train.ops.feedback import Prefix, Solved, Solver, flatten_heads, solve_backward, solve_forward


class _GatherSequence(torch.autograd.Function):
    """All-gather equal sequence blocks along ``dim``; backward sums every rank's gradient of the
    full tensor and keeps this rank's block (all-reduce: gloo has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, group, dim: int):  # type: ignore[override]
        ctx.group, ctx.dim = group, dim
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group)
        return torch.cat(parts, dim)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad.chunk(dist.get_world_size(ctx.group), ctx.dim)[dist.get_rank(ctx.group)], None, None


def gather_sequence(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """The whole sequence of ``x`` from every rank's block along ``dim`` (forward-branch K/V)."""
    return _GatherSequence.apply(x, group, dim)


class _Ring:
    """Point-to-point over one group with global ranks; keeps async sends alive until done."""

    def __init__(self, group) -> None:
        self.group = group
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        self.pending: list = []

    def send(self, t: torch.Tensor, to: int, tag: int, in_flight: int = 1) -> None:
        """Asynchronous send; at most ``in_flight`` blocks stay alive waiting for their receiver."""
        t = t.contiguous()
        self.pending.append((dist.isend(t, dist.get_global_rank(self.group, to), self.group, tag), t))
        while len(self.pending) > in_flight:
            self.pending.pop(0)[0].wait()

    def irecv(self, into: torch.Tensor, src: int, tag: int):
        """Asynchronous receive straight into a (contiguous) view; returns the request."""
        return dist.irecv(into, dist.get_global_rank(self.group, src), self.group, tag)

    def recv(self, shape, dtype, device, src: int, tag: int) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(t, dist.get_global_rank(self.group, src), self.group, tag)
        return t

    def finish(self) -> None:
        for req, _ in self.pending:
            req.wait()
        self.pending.clear()


def _pieces(n: int, chunk: int) -> list[slice]:
    """Blocks travel in pieces of ``chunk`` rows: one piece in flight, never a whole block."""
    return [slice(a, min(a + chunk, n)) for a in range(0, n, chunk)]


def _earlier_blocks(ring: _Ring, q, k, sizes, scale: float, chunk: int, dv: int):
    """Receive (k_j, s_j) of every earlier block piece by piece, forward each piece, and fold
    it into the online softmax (m, z, h) of every own row. Returns (lse_p, h_p) or None."""
    N, T, dk = q.shape
    m = torch.full((N, T, 1), float("-inf"), dtype=q.dtype, device=q.device)
    z = torch.zeros(N, T, 1, dtype=q.dtype, device=q.device)
    h = torch.zeros(N, T, dv, dtype=q.dtype, device=q.device)
    for j in range(ring.rank):
        for cols in _pieces(sizes[j], chunk):
            piece = ring.recv((N, cols.stop - cols.start, dk + dv), q.dtype, q.device, ring.rank - 1, tag=j)
            if ring.rank + 1 < ring.size:
                ring.send(piece, ring.rank + 1, tag=j)
            kj, sj = piece[..., :dk], piece[..., dk:]
            for rows in _pieces(T, chunk):
                L = torch.matmul(q[:, rows], kj.transpose(1, 2)).mul_(scale)
                m_new = torch.maximum(m[:, rows], L.amax(dim=-1, keepdim=True))
                decay = torch.where(torch.isneginf(m[:, rows]), 0.0, (m[:, rows] - m_new).exp())
                e = L.sub_(m_new).exp_()
                z[:, rows] = z[:, rows] * decay + e.sum(dim=-1, keepdim=True)
                h[:, rows] = h[:, rows] * decay + torch.bmm(e, sj)
                m[:, rows] = m_new
    if ring.rank == 0:
        return None
    return Prefix((m + z.log()).squeeze(-1), h.div_(z))


def _later_blocks(ring: _Ring, k, s, grad_s, sizes, scale: float, chunk: int):
    """Receive every later row block piece by piece; fold each into the push and dk of the own
    columns, add its dq over the own columns and pass it on (rank 0 sends the finished dq home).
    Returns (G + push, dk from later rows or None)."""
    N, _, dk = k.shape
    dv = s.shape[-1]
    if ring.rank + 1 == ring.size:  # the last rank: nothing comes back
        return grad_s, None
    push, dk_cross = grad_s.clone(), torch.zeros_like(k)
    width = 2 * dk + dv + 3
    for b in range(ring.size - 1, ring.rank, -1):
        for rows in _pieces(sizes[b], chunk):
            piece = ring.recv((N, rows.stop - rows.start, width), k.dtype, k.device, ring.rank + 1, tag=b)
            qb, lamb, dqb = piece[..., :dk], piece[..., dk : dk + dv], piece[..., dk + dv : 2 * dk + dv]
            lse_b, g_b, dg_b = (piece[..., 2 * dk + dv + i, None] for i in range(3))
            A = torch.matmul(qb, k.transpose(1, 2)).mul_(scale).sub_(lse_b).exp_()  # (N, C, T_r)
            push.baddbmm_(A.transpose(1, 2), g_b * lamb)
            P = torch.bmm(lamb, s.transpose(1, 2)).sub_(dg_b).mul_(A)
            w = g_b * scale
            dk_cross.baddbmm_(P.transpose(1, 2), qb * w)
            dqb += torch.bmm(P, k).mul_(w)
            if ring.rank > 0:
                ring.send(piece, ring.rank - 1, tag=b)
            else:
                ring.send(dqb, b, tag=ring.size + b)
    return push, dk_cross


class ContextParallelFeedbackSolve(torch.autograd.Function):
    """Local rows of the solve on every rank of ``group``, in the blockwise solvers' (N, T, .) layout;
    the own rows are solved by ``ops.solve_forward``/``solve_backward`` continuing across ranks."""

    @staticmethod
    def forward(ctx, q, k, f, gamma, scale: float, solver: Solver, group, sizes: tuple[int, ...]):  # type: ignore[override]
        ring, chunk = _Ring(group), solver.chunk
        prefix = _earlier_blocks(ring, q, k, sizes, scale, chunk, f.shape[-1])
        s, c, lse = solve_forward(solver, q, k, f, gamma, scale, prefix)
        if ring.rank + 1 < ring.size:
            for rows in _pieces(q.shape[1], chunk):
                ring.send(torch.cat([k[:, rows], s[:, rows]], dim=-1), ring.rank + 1, tag=ring.rank)
        ring.finish()
        ctx.save_for_backward(q, k, gamma, s, c, lse)
        ctx.scale, ctx.solver, ctx.group, ctx.sizes = scale, solver, group, sizes
        return s

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_s):  # type: ignore[override]
        q, k, gamma, s, c, lse = ctx.saved_tensors
        ring, sizes, chunk = _Ring(ctx.group), ctx.sizes, ctx.solver.chunk
        far: list = []  # dq over all earlier columns arrives from rank 0: receive it whenever it comes
        for rows in _pieces(q.shape[1], chunk) if ring.rank > 0 else []:
            buf = q.new_empty(q.shape[0], rows.stop - rows.start, q.shape[2])
            far.append((rows, buf, ring.irecv(buf, 0, ring.size + ring.rank)))
        g_push, dk_cross = _later_blocks(ring, k, s, grad_s, sizes, ctx.scale, chunk)
        dq, dk, lam, dgamma = solve_backward(ctx.solver, g_push, q, k, gamma, Solved(s, c, lse), ctx.scale)
        del g_push
        if ring.rank > 0:  # own row block: q, lam, a zero dq accumulator, lse, gamma, dgamma
            extras = torch.stack([lse, gamma, dgamma], dim=-1)
            for rows in _pieces(q.shape[1], chunk):
                zeros = torch.zeros_like(q[:, rows])
                piece = torch.cat([q[:, rows], lam[:, rows], zeros, extras[:, rows]], dim=-1)
                ring.send(piece, ring.rank - 1, tag=ring.rank)
            for rows, buf, req in far:
                req.wait()
                dq[:, rows] += buf
        ring.finish()
        return dq, dk if dk_cross is None else dk.add_(dk_cross), lam, dgamma, None, None, None, None


def feedback_solve_context_parallel(
    q: torch.Tensor,
    k: torch.Tensor,
    f: torch.Tensor,
    gamma: torch.Tensor,
    scale: float,
    solver: Solver,
    group,
    sizes: tuple[int, ...],
) -> torch.Tensor:
    """This rank's rows of the solve. q, k (B, H, T_r, Dk); f (B, H, T_r, Dv); gamma (B, H, T_r);
    ``solver`` a blockwise one (``ops.select_solver``), its chunk also the size of the pieces that
    travel; ``sizes``: T_r of every rank of ``group`` in rank order (they sum to the sequence length)."""
    B, H, T, _ = q.shape
    Dv = f.shape[-1]
    rank = dist.get_rank(group)
    if len(sizes) != dist.get_world_size(group) or sizes[rank] != T:
        raise ValueError(f"context-parallel block sizes {sizes} do not match this rank's {T} rows (rank {rank})")
    dtype = torch.float32 if f.dtype in (torch.float16, torch.bfloat16) else f.dtype  # one dtype on the ring
    s = ContextParallelFeedbackSolve.apply(
        *(flatten_heads(x, dtype) for x in (q, k, f, gamma)), scale, solver, group, tuple(sizes)
    )
    return s.reshape(B, H, T, Dv).to(f.dtype)
