"""Memory-efficient feedback solve: blocked forward substitution in pure torch.

For chunk c with rows R = [r0, r1) (C rows), with the strip of logits against all
earlier keys ``L_R = scale * q_R k_{<r1}^T`` of shape (C, r1):

    forward   lse_R = logsumexp_{j<t} L_R[t, j];  A_R = exp(L_R - lse_R) (strictly causal)
              rhs_R = f_R + gamma_R * A_R[:, :r0] @ s_{<r0}
              s_R   = (I - gamma_R A_R[:, r0:r1])^{-1} rhs_R           (C x C unit lower solve)
    backward  (reverse chunk order, lambda = (I - M)^{-T} G with M = diag(gamma) A)
              lam_R = (I - gamma_R A_RR)^{-T} (G_R + acc_R)              (C x C unit upper solve)
              acc_{<r0} += (gamma_R A_R[:, :r0])^T lam_R                 (push to earlier rows)
              P      = lam_R s_{<r1}^T                                    = dL/dM on the strip
              dgamma_R = rowsum(A_R * P)
              dlogits  = gamma_R * A_R * (P - dgamma_R)   (softmax backward; delta = gamma*dgamma)
              dq_R = scale * dlogits @ k_{<r1};  dk_{<r1} += scale * dlogits^T @ q_R;  df = lam

Only (C, r1) strips and O(T * D) tensors are ever alive: memory is linear in T for a
fixed chunk size. The backward recomputes each strip from the saved per-row ``lse``.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


def _attention_strip(
    q_rows: torch.Tensor, k_prefix: torch.Tensor, r0: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Strictly-causal softmax rows for query rows [r0, r0+C) over keys [0, r1).

    q_rows (N, C, Dk), k_prefix (N, r1, Dk). Returns (A (N, C, r1), lse (N, C)).
    Rows with no earlier key (global row 0) get A = 0 and lse = 0.
    """
    C = q_rows.shape[1]
    logits = torch.matmul(q_rows, k_prefix.transpose(1, 2)).mul_(scale)  # (N, C, r1)
    future = torch.ones(C, C, dtype=torch.bool, device=q_rows.device).triu_()
    logits[:, :, r0:].masked_fill_(future, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    lse = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    return logits.sub_(lse.unsqueeze(-1)).exp_(), lse


def _attention_strip_from_lse(
    q_rows: torch.Tensor, k_prefix: torch.Tensor, lse_rows: torch.Tensor, r0: int, scale: float
) -> torch.Tensor:
    """Recompute A for rows [r0, r0+C) from the saved log-sum-exp (backward pass)."""
    C = q_rows.shape[1]
    logits = torch.matmul(q_rows, k_prefix.transpose(1, 2)).mul_(scale)
    future = torch.ones(C, C, dtype=torch.bool, device=q_rows.device).triu_()
    logits[:, :, r0:].masked_fill_(future, float("-inf"))
    return logits.sub_(lse_rows.unsqueeze(-1)).exp_()


def chunked_forward(
    q: torch.Tensor, k: torch.Tensor, f: torch.Tensor, gamma: torch.Tensor, scale: float, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocked forward substitution. q, k (N, T, Dk); f (N, T, Dv); gamma (N, T).

    Returns s (N, T, Dv) and the per-row log-sum-exp (N, T) for the backward.
    """
    N, T, _ = q.shape
    s = torch.empty_like(f)
    lse = torch.empty(N, T, dtype=q.dtype, device=q.device)
    for r0 in range(0, T, chunk):
        r1 = min(r0 + chunk, T)
        A, lse[:, r0:r1] = _attention_strip(q[:, r0:r1], k[:, :r1], r0, scale)
        g = gamma[:, r0:r1].unsqueeze(-1)  # (N, C, 1)
        rhs = f[:, r0:r1]
        if r0 > 0:
            rhs = rhs + g * torch.bmm(A[:, :, :r0], s[:, :r0])
        minus_m_diag = A[:, :, r0:r1].mul_(-g)  # -(gamma A) on the C x C diagonal block
        s[:, r0:r1] = torch.linalg.solve_triangular(minus_m_diag, rhs, upper=False, unitriangular=True)
    return s, lse


def chunked_backward(
    grad_s: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    gamma: torch.Tensor,
    s: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reverse-time adjoint solve. Returns (dq, dk, df, dgamma) with the input shapes."""
    T = q.shape[1]
    lam = grad_s.clone()  # accumulates G + pushes from later chunks, then holds lambda
    dq = torch.empty_like(q)
    dk = torch.zeros_like(k)
    dgamma = torch.empty_like(gamma)
    last_start = ((T - 1) // chunk) * chunk
    for r0 in range(last_start, -1, -chunk):
        r1 = min(r0 + chunk, T)
        q_rows = q[:, r0:r1]
        A = _attention_strip_from_lse(q_rows, k[:, :r1], lse[:, r0:r1], r0, scale)  # (N, C, r1)
        g = gamma[:, r0:r1].unsqueeze(-1)
        minus_mt_diag = (A[:, :, r0:r1] * -g).transpose(1, 2)
        lam_rows = torch.linalg.solve_triangular(minus_mt_diag, lam[:, r0:r1], upper=True, unitriangular=True)
        lam[:, r0:r1] = lam_rows
        if r0 > 0:
            lam[:, :r0].baddbmm_((A[:, :, :r0] * g).transpose(1, 2), lam_rows)
        P = torch.bmm(lam_rows, s[:, :r1].transpose(1, 2))  # dL/dM on the strip, (N, C, r1)
        AP = P.mul_(A)
        dg = AP.sum(-1)  # (N, C)
        dgamma[:, r0:r1] = dg
        dlogits = AP.sub_(A.mul_(dg.unsqueeze(-1))).mul_(g * scale)  # scale folded in
        dq[:, r0:r1] = torch.bmm(dlogits, k[:, :r1])
        dk[:, :r1].baddbmm_(dlogits.transpose(1, 2), q_rows)
    return dq, dk, lam, dgamma


class ChunkedFeedbackSolve(torch.autograd.Function):
    """Autograd wrapper: saves q, k, gamma, s and lse (all O(T * D)); no T x T tensor."""

    @staticmethod
    def forward(ctx, q, k, f, gamma, scale: float, chunk: int):  # type: ignore[override]
        s, lse = chunked_forward(q, k, f, gamma, scale, chunk)
        ctx.save_for_backward(q, k, gamma, s, lse)
        ctx.scale, ctx.chunk = scale, chunk
        return s

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_s):  # type: ignore[override]
        q, k, gamma, s, lse = ctx.saved_tensors
        dq, dk, df, dgamma = chunked_backward(grad_s.contiguous(), q, k, gamma, s, lse, ctx.scale, ctx.chunk)
        return dq, dk, df, dgamma, None, None


def feedback_solve_chunked(
    q: torch.Tensor, k: torch.Tensor, f: torch.Tensor, gamma: torch.Tensor, scale: float, chunk_size: int
) -> torch.Tensor:
    """Chunked solve with the (B, H, T, .) layout of the dispatch function.

    Half-precision inputs are computed in float32 and cast back.
    """
    B, H, T, Dk = q.shape
    Dv = f.shape[-1]
    compute = torch.float32 if f.dtype in (torch.float16, torch.bfloat16) else f.dtype
    s = ChunkedFeedbackSolve.apply(
        q.to(compute).reshape(B * H, T, Dk),
        k.to(compute).reshape(B * H, T, Dk),
        f.to(compute).reshape(B * H, T, Dv),
        gamma.to(compute).reshape(B * H, T),
        scale,
        chunk_size,
    )
    return s.reshape(B, H, T, Dv).to(f.dtype)
