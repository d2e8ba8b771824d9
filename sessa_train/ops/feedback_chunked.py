"""Memory-efficient feedback solve: blocked forward substitution in pure torch.

For chunk c with rows R = [r0, r1) (C rows), with the strip of logits against the earlier keys
``L_R = scale * q_R k_{lo:r1}^T`` of shape (C, r1 - lo):

    forward   A_R  = softmax_{j<t} L_R[t, j]  (strictly causal; row 0 of the sequence is 0)
              h_R  = A_R[:, :r0] @ s_{lo:r0}
              s_R  = (I - gamma_R A_RR)^{-1} (f_R + gamma_R h_R)        (C x C unit lower solve)
              c_R  = h_R + A_RR s_R          (= sum_j A[t, j] s_j, saved: dgamma needs it)
    backward  (reverse chunk order; lambda = (I - M)^{-T} G with M = diag(gamma) A)
              lam_R    = (I - gamma_R A_RR)^{-T} (G_R + acc_R)            (C x C unit upper solve)
              acc_{lo:r0} += A_R[:, :r0]^T (gamma_R lam_R)                (push to earlier rows)
              dgamma_R = lam_R . c_R
              dlogits  = gamma_R A_R (lam_R s_{lo:r1}^T - dgamma_R)       (softmax backward)
              dq_R = scale dlogits k_{lo:r1};  dk_{lo:r1} += scale dlogits^T q_R;  df = lam

lo = 0 for one document. Packed documents (``starts`` (N, T): each row's first key, its document's
start, not decreasing along a sequence) mask the keys before a row's document, and lo is the
earliest start of the chunk's rows over the batch: keys wholly before every row's document are
never computed, so a sample of n documents of length L costs about n L^2, not (n L)^2.

Only (C, r1 - lo) strips and O(T * D) tensors are ever alive: memory is linear in T for a fixed
chunk size. The backward recomputes each strip from the saved per-row log-sum-exp. Row scalings
(softmax normaliser, gamma, scale) are applied to the small (C, D) operands of the GEMMs, not to
the strips.
"""

from __future__ import annotations

import torch


def _chunk_starts(starts: torch.Tensor | None, T: int, chunk: int) -> list[int]:
    """Per chunk, the first key any of its rows reads (one host read for the whole solve)."""
    if starts is None:
        return [0] * -(-T // chunk)
    return starts[:, ::chunk].amin(dim=0).tolist()  # a chunk's first row has the earliest start


def _logit_strip(q_rows, k_keys, r0: int, lo: int, scale: float, future: torch.Tensor, starts_rows):
    """scale * q_rows k_keys^T (N, C, r1 - lo) over keys lo..r1 - 1, with the keys j >= t (future
    is (C, C)) and the keys before a row's document (``starts_rows`` (N, C), or None) set to -inf."""
    logits = torch.matmul(q_rows, k_keys.transpose(1, 2)).mul_(scale)
    C = q_rows.shape[1]
    logits[:, :, r0 - lo :].masked_fill_(future[:C, :C], float("-inf"))
    if starts_rows is not None:
        keys = torch.arange(lo, lo + k_keys.shape[1], device=q_rows.device)
        logits.masked_fill_(keys[None, None, :] < starts_rows[:, :, None], float("-inf"))
    return logits


def chunked_forward(q, k, f, gamma, starts, scale: float, chunk: int, prefix=None):
    """Blocked forward substitution. q, k (N, T, Dk); f (N, T, Dv); gamma (N, T); ``starts``
    (N, T) int64 or None (module docstring).

    ``prefix`` continues a solve whose earlier rows live elsewhere (a context-parallel rank):
    (lse_p (N, T), h_p (N, T, Dv)) with lse_p the log-sum-exp of each row's logits against the
    earlier keys (-inf: none) and h_p = sum_j exp(logit_j - lse_p) s_j over them. The softmax then
    runs over earlier and own keys together.

    Returns s (N, T, Dv), c = A s (N, T, Dv) and the per-row log-sum-exp (N, T).
    """
    N, T, _ = q.shape
    future = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).triu_()
    s, c = torch.empty_like(f), torch.empty_like(f)
    lse = torch.empty(N, T, dtype=q.dtype, device=q.device)
    for r0, lo in zip(range(0, T, chunk), _chunk_starts(starts, T, chunk), strict=True):
        r1 = min(r0 + chunk, T)
        rows_start = None if starts is None else starts[:, r0:r1]
        E = _logit_strip(q[:, r0:r1], k[:, lo:r1], r0, lo, scale, future, rows_start)
        m = E.amax(dim=-1, keepdim=True)
        m = torch.where(torch.isneginf(m), 0.0, m)  # a row with no earlier key: E = 0 below
        z = E.sub_(m).exp_().sum(dim=-1, keepdim=True)
        row_lse = torch.where(z > 0, m + z.log(), float("-inf"))
        if prefix is not None:
            row_lse = torch.logaddexp(row_lse, prefix[0][:, r0:r1].unsqueeze(-1))
        keys = ~torch.isneginf(row_lse)  # False only for a document's first row
        inv_z = torch.where(keys, (m - row_lse).exp(), 0.0)  # = 1 / (own + earlier normaliser)
        lse[:, r0:r1] = torch.where(keys, row_lse, 0.0).squeeze(-1)
        A_diag = E[:, :, r0 - lo :] * inv_z  # (N, C, C)
        g = gamma[:, r0:r1].unsqueeze(-1)
        rhs, h = f[:, r0:r1], None
        if r0 > lo:
            h = torch.bmm(E[:, :, : r0 - lo], s[:, lo:r0]).mul_(inv_z)
        if prefix is not None:
            scale_p = torch.where(keys, (prefix[0][:, r0:r1].unsqueeze(-1) - row_lse).exp(), 0.0)
            earlier = prefix[1][:, r0:r1] * scale_p
            h = earlier if h is None else h.add_(earlier)
        if h is not None:
            rhs = torch.addcmul(rhs, g, h)
        s_rows = torch.linalg.solve_triangular(A_diag * -g, rhs, upper=False, unitriangular=True)
        s[:, r0:r1] = s_rows
        c_rows = torch.bmm(A_diag, s_rows)
        c[:, r0:r1] = c_rows if h is None else c_rows + h
    return s, c, lse


def chunked_backward(grad_s, q, k, gamma, starts, s, c, lse, scale: float, chunk: int):
    """Reverse-time adjoint solve. Returns (dq, dk, df, dgamma) with the input shapes."""
    T = q.shape[1]
    future = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).triu_()
    lam = grad_s.clone()  # accumulates G + pushes from later chunks, then holds lambda
    dq, dk = torch.empty_like(q), torch.zeros_like(k)
    dgamma = torch.empty_like(gamma)
    firsts = list(zip(range(0, T, chunk), _chunk_starts(starts, T, chunk), strict=True))
    for r0, lo in reversed(firsts):
        r1 = min(r0 + chunk, T)
        q_rows = q[:, r0:r1]
        rows_start = None if starts is None else starts[:, r0:r1]
        E = _logit_strip(q_rows, k[:, lo:r1], r0, lo, scale, future, rows_start)
        A = E.sub_(lse[:, r0:r1].unsqueeze(-1)).exp_()
        g = gamma[:, r0:r1].unsqueeze(-1)
        minus_mt_diag = (A[:, :, r0 - lo :] * -g).transpose(1, 2)
        lam_rows = torch.linalg.solve_triangular(minus_mt_diag, lam[:, r0:r1], upper=True, unitriangular=True)
        lam[:, r0:r1] = lam_rows
        if r0 > lo:
            lam[:, lo:r0].baddbmm_(A[:, :, : r0 - lo].transpose(1, 2), g * lam_rows)
        dg = torch.linalg.vecdot(lam_rows, c[:, r0:r1])  # (N, C)
        dgamma[:, r0:r1] = dg
        # dlogits / (gamma * scale) = A * (lam s^T - dgamma); the row factor goes on q and dq
        P = torch.bmm(lam_rows, s[:, lo:r1].transpose(1, 2)).sub_(dg.unsqueeze(-1)).mul_(A)
        w = g * scale
        dq[:, r0:r1] = torch.bmm(P, k[:, lo:r1]).mul_(w)
        dk[:, lo:r1].baddbmm_(P.transpose(1, 2), q_rows * w)
    return dq, dk, lam, dgamma
