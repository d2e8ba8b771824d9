"""The feedback solve of one sequence split over a context-parallel (CP) group of P ranks.

Rank r owns rows R_r, a contiguous block of the sequence (block sizes ``sizes``, in rank order).
The system (I - diag(gamma) A) s = f couples every row to all earlier ones, so exact forward
substitution is a chain over ranks: ring forward substitution (docs/parallelism.md weighs it
against block-Jacobi and head/channel all-to-all).

Forward, rank r (pieces of earlier blocks travel r-1 -> r and are relayed on to r+1):
    for each piece (k_j, s_j) of an earlier block j = 0..r-1:
        online softmax over its logits L = scale q_r k_j^T:   (m, z, h) += (max, sum e^L, e^L s_j)
    lse_p = m + log z,  h_p = h / z                        (earlier keys only)
    s_r, c_r, lse_r = ops.solve_forward of own rows, continuing from (lse_p, h_p)
    send its own (k_r, s_r) pieces to r+1
Backward, rank r (row pieces of later blocks travel r+1 -> r and are relayed on to r-1):
    for each piece (q_b, lse_b, gamma_b, lam_b, dgamma_b, dq_b) of a later block b:
        A = exp(scale q_b k_r^T - lse_b)                   (rows of b, own columns)
        push  += A^T (gamma_b lam_b)                       (what later rows feed back to ours)
        dL    =  gamma_b A (lam_b s_r^T - dgamma_b)        (dlogits of that block)
        dk_r  += scale dL^T q_b;  dq_b += scale dL k_r     (rank 0 sends the finished dq_b home)
    lam_r, own dq/dk, dgamma_r = ops.solve_backward of own rows with G + push
    send its own row pieces (dq accumulator 0) to r-1

Communication follows NCCL's rules, not only gloo's: every rank derives the same lock-step
schedule from the block sizes (``schedule``). At each step a rank posts the sends and receives
the schedule gives it as one batch (``distributed.exchange``) and waits; the peer posts the
matching half in its batch of the same step. So the ring completes whether the backend runs a
rank's point-to-point operations per peer pair or all in one order, one batch at a time, and
no tag is needed. Each link carries one piece of ``chunk`` rows per step: a rank holds O(T_r D)
plus a few pieces, so memory per rank falls like 1/P. The chain of dependencies is P-1 steps
long each way; compute is not overlapped with the transfers of the same rank.
"""

from __future__ import annotations

from collections import deque
from functools import lru_cache
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from sessa_train import distributed as comm
from sessa_train.ops.feedback import (
    Prefix,
    Solved,
    Solver,
    flatten_heads,
    flatten_starts,
    solve_backward,
    solve_forward,
)


class _GatherSequence(torch.autograd.Function):
    """All-gather equal sequence blocks along ``dim``; backward sums every rank's gradient of the
    full tensor and keeps this rank's block (all-reduce: gloo has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, group, dim: int):  # type: ignore[override]
        ctx.group, ctx.dim = group, dim
        return torch.cat(comm.all_gather(x.contiguous(), group), dim)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        grad = comm.all_reduce(grad.contiguous(), ctx.group)
        return grad.chunk(dist.get_world_size(ctx.group), ctx.dim)[dist.get_rank(ctx.group)], None, None


def gather_sequence(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """The whole sequence of ``x`` from every rank's block along ``dim`` (forward-branch K/V)."""
    return _GatherSequence.apply(x, group, dim)


# -- the schedule --------------------------------------------------------------------------


class Msg(NamedTuple):
    """A piece of ``chunk`` rows of ``block`` travelling the ring: forward (k, s) pieces ("ks"),
    backward row pieces ("row") and finished dq pieces going home from rank 0 ("dq")."""

    kind: str
    block: int
    piece: int


def _pieces(n: int, chunk: int) -> list[slice]:
    """Blocks travel in pieces of ``chunk`` rows: one piece per link and step, never a whole block."""
    return [slice(a, min(a + chunk, n)) for a in range(0, n, chunk)]


def _rows(n: int, chunk: int, piece: int) -> int:
    return min(chunk, n - piece * chunk)


def _piece_starts(starts: torch.Tensor | None, T: int, chunk: int) -> list[int]:
    """Per piece of own rows, the earliest document start of its rows (0 for one document)."""
    return [0] * len(_pieces(T, chunk)) if starts is None else starts[:, ::chunk].amin(dim=0).tolist()


@lru_cache(maxsize=32)
def schedule(sizes: tuple[int, ...], chunk: int, backward: bool) -> list[list[tuple[int, int, Msg]]]:
    """Steps of (source rank, destination rank, message), the same on every rank.

    A rank relays a piece one step after receiving it; it sends its own pieces from the step
    after it has received every piece its solve needs (forward: those of earlier blocks,
    backward: those of later blocks); each link (r -> r+1 forward, r -> r-1 backward, 0 -> b for
    the dq going home) carries one message per step, first come first served.
    """
    P = len(sizes)
    count = [len(_pieces(n, chunk)) for n in sizes]
    step_dir = -1 if backward else 1
    need = [sum(count[r + 1 :]) if backward else sum(count[:r]) for r in range(P)]
    links: dict[tuple[int, int], deque] = {}

    def queue(src: int, dst: int, when: int, msg: Msg) -> None:
        links.setdefault((src, dst), deque()).append((when, msg))

    def own(rank: int, when: int) -> None:
        if 0 <= rank + step_dir < P:
            for i in range(count[rank]):
                queue(rank, rank + step_dir, when, Msg("row" if backward else "ks", rank, i))

    got = [0] * P
    for rank in range(P):
        if need[rank] == 0:
            own(rank, 0)
    steps, t = [], 0
    while any(links.values()):
        sends = [(src, dst, q.popleft()[1]) for (src, dst), q in links.items() if q and q[0][0] <= t]
        for _, dst, msg in sends:
            if msg.kind == "dq":
                continue
            got[dst] += 1
            if 0 <= dst + step_dir < P:  # relay
                queue(dst, dst + step_dir, t + 1, msg)
            elif backward:  # rank 0: the row piece's dq goes home
                queue(0, msg.block, t + 1, Msg("dq", msg.block, msg.piece))
            if got[dst] == need[dst]:
                own(dst, t + 1)
        if sends:
            steps.append(sends)
        t += 1
    return steps


def _run(steps, rank: int, group, message, shape, received) -> None:
    """Execute this rank's part of ``steps``: at each step one batch of its sends (``message(msg)``)
    and receives (into buffers of ``shape(msg)``, handed to ``received(msg, buffer)`` after)."""
    for step in steps:
        ops, arrivals = [], []
        for src, dst, msg in step:
            if src == rank:
                ops.append(("send", message(msg), dst))
            elif dst == rank:
                buf = shape(msg)
                ops.append(("recv", buf, src))
                arrivals.append((msg, buf))
        if ops:
            comm.exchange(ops, group)
            for msg, buf in arrivals:
                received(msg, buf)


# -- the solve -----------------------------------------------------------------------------


class ContextParallelFeedbackSolve(torch.autograd.Function):
    """Local rows of the solve on every rank of ``group``, in the blockwise solvers' (N, T, .) layout;
    the own rows are solved by ``ops.solve_forward``/``solve_backward`` continuing across ranks."""

    @staticmethod
    def forward(ctx, q, k, f, gamma, starts, scale: float, solver: Solver, group, sizes: tuple[int, ...]):  # type: ignore[override]
        N, T, dk = q.shape
        dv = f.shape[-1]
        rank, chunk = dist.get_rank(group), solver.block(T, dv)
        offset = sum(sizes[:rank])  # the index of the first own row in the sequence
        local = None if starts is None else (starts - offset).clamp_(min=0)  # own keys of each row's document
        firsts = _piece_starts(starts, T, chunk)
        # the ring's own state is at least float32 whatever the solver computes in (like its accumulators)
        acc = {"dtype": torch.promote_types(q.dtype, torch.float32), "device": q.device}
        m = torch.full((N, T, 1), float("-inf"), **acc)
        z, h = torch.zeros(N, T, 1, **acc), torch.zeros(N, T, dv, **acc)
        relay: dict[Msg, torch.Tensor] = {}  # received pieces waiting to go on to rank + 1
        solved: list[Solved] = []
        seen: list[Msg] = []

        def solve() -> None:
            prefix = Prefix((m + z.log()).squeeze(-1), torch.where(z > 0, h / z, 0.0)) if rank > 0 else None
            solved.append(solve_forward(solver, q, k, f, gamma, scale, prefix, local))

        def received(msg: Msg, piece: torch.Tensor) -> None:  # an earlier block's (k_j, s_j) rows
            if rank + 1 < len(sizes):
                relay[msg] = piece
            kj, sj = piece[..., :dk], piece[..., dk:]
            base = sum(sizes[: msg.block]) + msg.piece * chunk  # the piece's first key in the sequence
            for rows, first in zip(_pieces(T, chunk), firsts, strict=True):
                if first >= base + kj.shape[1]:  # every document of these rows starts after the piece
                    continue
                L = torch.matmul(q[:, rows].to(kj.dtype), kj.transpose(1, 2)).mul_(scale)
                if starts is not None:
                    keys = torch.arange(base, base + kj.shape[1], device=q.device)
                    L.masked_fill_(keys[None, None, :] < starts[:, rows, None], float("-inf"))
                m_new = torch.maximum(m[:, rows], L.amax(dim=-1, keepdim=True))
                decay = torch.where(torch.isneginf(m[:, rows]), 0.0, (m[:, rows] - m_new).exp())
                e = L.sub_(torch.where(torch.isneginf(m_new), 0.0, m_new)).exp_()
                z[:, rows] = z[:, rows] * decay + e.sum(dim=-1, keepdim=True)
                h[:, rows] = h[:, rows] * decay + torch.bmm(e, sj)
                m[:, rows] = m_new
            seen.append(msg)
            if len(seen) == need:
                solve()

        def message(msg: Msg) -> torch.Tensor:
            if msg.block == rank:  # own rows, made when sent
                rows = _pieces(T, chunk)[msg.piece]
                return torch.cat([k[:, rows].to(acc["dtype"]), solved[0].s[:, rows].to(acc["dtype"])], dim=-1)
            return relay.pop(msg)

        def shape(msg: Msg) -> torch.Tensor:
            return torch.empty(N, _rows(sizes[msg.block], chunk, msg.piece), dk + dv, **acc)

        need = sum(len(_pieces(n, chunk)) for n in sizes[:rank])
        if need == 0:
            solve()
        _run(schedule(tuple(sizes), chunk, backward=False), rank, group, message, shape, received)
        s, c, lse = solved[0]
        ctx.save_for_backward(q, k, gamma, s, c, lse)
        ctx.dtypes = (q.dtype, k.dtype, f.dtype, gamma.dtype)
        ctx.scale, ctx.solver, ctx.group, ctx.sizes, ctx.starts = scale, solver, group, sizes, starts
        return s.to(f.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_s):  # type: ignore[override]
        q, k, gamma, s, c, lse = ctx.saved_tensors
        group, sizes, scale = ctx.group, ctx.sizes, ctx.scale
        rank = dist.get_rank(group)
        N, T, dk = q.shape
        dv = s.shape[-1]
        chunk = ctx.solver.block(T, dv)
        offset, starts = sum(sizes[:rank]), ctx.starts
        local = None if starts is None else (starts - offset).clamp(min=0)
        width = 2 * dk + dv + 4  # q, lam, dq accumulator, lse, gamma, dgamma, document start
        f32 = {"dtype": torch.promote_types(q.dtype, torch.float32), "device": q.device}  # the ring's state
        # a copy, contiguous as the kernels read it (an incoming gradient may be a strided view)
        push = grad_s.to(f32["dtype"], memory_format=torch.contiguous_format, copy=True)
        dk_cross = torch.zeros(N, T, dk, **f32)
        relay: dict[Msg, torch.Tensor] = {}  # received pieces waiting to go on (rank 0: their dq, home)
        done: list = []  # [dq, dk, lam, dgamma] of the own rows
        dq_home = torch.zeros(N, T, dk, **f32)  # dq of the own rows over earlier ranks' columns
        k32, s32 = k.to(f32["dtype"]), s.to(f32["dtype"])

        def solve() -> None:
            done.extend(solve_backward(ctx.solver, push, q, k, gamma, Solved(s, c, lse), scale, local))

        def received(msg: Msg, piece: torch.Tensor) -> None:
            if msg.kind == "dq":  # the own rows' dq over all earlier columns, home from rank 0
                dq_home[:, _pieces(T, chunk)[msg.piece]] = piece
                return
            qb, lamb, dqb = piece[..., :dk], piece[..., dk : dk + dv], piece[..., dk + dv : 2 * dk + dv]
            lse_b, g_b, dg_b, start_b = (piece[..., 2 * dk + dv + i, None] for i in range(4))
            if starts is None or int(start_b[:, 0].min()) < offset + T:  # else: their documents start after ours
                logits = torch.matmul(qb, k32.transpose(1, 2)).mul_(scale)
                if starts is not None:
                    keys = torch.arange(offset, offset + T, device=q.device, dtype=start_b.dtype)
                    logits.masked_fill_(keys[None, None, :] < start_b, float("-inf"))
                A = logits.sub_(lse_b).exp_()  # (N, C, T_r)
                push.baddbmm_(A.transpose(1, 2), g_b * lamb)
                P_ = torch.bmm(lamb, s32.transpose(1, 2)).sub_(dg_b).mul_(A)
                w = g_b * scale
                dk_cross.baddbmm_(P_.transpose(1, 2), qb * w)
                dqb += torch.bmm(P_, k32).mul_(w)
            relay[msg] = piece
            seen.append(msg)
            if len(seen) == need:
                solve()

        def message(msg: Msg) -> torch.Tensor:
            if msg.kind == "dq":  # rank 0: the finished dq of a later block's rows
                return relay.pop(Msg("row", msg.block, msg.piece))[..., dk + dv : 2 * dk + dv]
            if msg.block == rank:  # own rows, made when sent: q, lam, a zero dq accumulator, lse, gamma, dgamma
                rows = _pieces(T, chunk)[msg.piece]
                lam, dgamma = done[2], done[3]
                first = (torch.zeros_like(lse[:, rows]) if starts is None else starts[:, rows]).to(f32["dtype"])
                extras = torch.stack([lse[:, rows], gamma[:, rows], dgamma[:, rows], first], dim=-1).to(f32["dtype"])
                q_rows = q[:, rows].to(f32["dtype"])
                return torch.cat([q_rows, lam[:, rows].to(f32["dtype"]), torch.zeros_like(q_rows), extras], dim=-1)
            return relay.pop(msg)

        def shape(msg: Msg) -> torch.Tensor:
            rows = _rows(sizes[msg.block], chunk, msg.piece)
            return torch.empty(N, rows, dk if msg.kind == "dq" else width, **f32)

        seen: list[Msg] = []
        need = sum(len(_pieces(n, chunk)) for n in sizes[rank + 1 :])
        if need == 0:
            solve()
        _run(schedule(tuple(sizes), chunk, backward=True), rank, group, message, shape, received)
        dq, dk_own, lam, dgamma = done
        grads = (dq.to(f32["dtype"]) + dq_home, dk_own.to(f32["dtype"]) + dk_cross, lam, dgamma)
        return (*(g.to(dt) for g, dt in zip(grads, ctx.dtypes, strict=True)), None, None, None, None, None)


def feedback_solve_context_parallel(
    q: torch.Tensor,
    k: torch.Tensor,
    f: torch.Tensor,
    gamma: torch.Tensor,
    scale: float,
    solver: Solver,
    group,
    sizes: tuple[int, ...],
    key_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """This rank's rows of the solve. q, k (B, H, T_r, Dk); f (B, H, T_r, Dv); gamma (B, H, T_r);
    ``solver`` a blockwise one (``ops.select_solver``), its chunk also the size of the pieces that
    travel; ``sizes``: T_r of every rank of ``group`` in rank order (they sum to the sequence length);
    ``key_start`` (B, T_r): packed documents, each own row's document start in the whole sequence (a
    document that spans ranks carries its state across; keys before it are masked, and a piece of
    keys that lies wholly before the documents of a rank's rows is skipped)."""
    B, H, T, _ = q.shape
    Dv = f.shape[-1]
    rank = dist.get_rank(group)
    if len(sizes) != dist.get_world_size(group) or sizes[rank] != T:
        raise ValueError(f"context-parallel block sizes {sizes} do not match this rank's {T} rows (rank {rank})")
    dtype = solver.record.compute_dtype(f.dtype)  # what the solver takes; the ring's own state is float32
    starts = None if key_start is None else flatten_starts(key_start, H)
    s = ContextParallelFeedbackSolve.apply(
        *(flatten_heads(x, dtype) for x in (q, k, f, gamma)), starts, scale, solver, group, tuple(sizes)
    )
    return s.reshape(B, H, T, Dv).to(f.dtype)
