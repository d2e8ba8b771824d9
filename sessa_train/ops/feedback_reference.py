"""Reference feedback solve: materialised T x T system + ``torch.linalg.solve_triangular``.

This is the oracle every fast path is tested against. It costs O(T^2 D) time and keeps
several (B, H, T, T) tensors alive for autograd, so it is only usable at moderate T.
"""

from __future__ import annotations

import torch


def feedback_attention_matrix(
    q: torch.Tensor, k: torch.Tensor, scale: float, key_start: torch.Tensor | None = None
) -> torch.Tensor:
    """Strictly-causal softmax attention A, shape (B, H, T, T); row 0 is all zeros.

    A[t, j] = softmax_{j < t}(scale * q_t . k_j), over key_start[b, t] <= j only when packed
    documents give each row's start (B, T). Masked entries are filled with the dtype's most
    negative finite value (not -inf) so that an empty row (a document's first) gives a finite
    softmax that the mask then zeroes: no NaN appears in the forward or the backward.
    """
    T = q.shape[-2]
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale
    keep = torch.ones(T, T, dtype=torch.bool, device=q.device).tril(-1)
    if key_start is not None:
        keep = keep & (torch.arange(T, device=q.device)[None, None, :] >= key_start[:, :, None])
        keep = keep.unsqueeze(1)  # every head of a sequence alike
    logits = logits.masked_fill(~keep, torch.finfo(logits.dtype).min)
    return torch.softmax(logits, dim=-1) * keep


def feedback_solve_reference(
    q: torch.Tensor, k: torch.Tensor, f: torch.Tensor, gamma: torch.Tensor, scale: float, key_start=None
) -> torch.Tensor:
    """Solve (I - diag(gamma) A) s = f by a dense triangular solve.

    Shapes: q, k (B, H, T, Dk); f (B, H, T, Dv); gamma (B, H, T); key_start (B, T) or None.
    Returns s (B, H, T, Dv). Half-precision inputs are solved in float32 (``solve_triangular`` has
    no bf16 kernel).
    """
    compute = torch.float32 if f.dtype in (torch.float16, torch.bfloat16) else f.dtype
    A = feedback_attention_matrix(q.to(compute), k.to(compute), scale, key_start)
    minus_m = -gamma.to(compute).unsqueeze(-1) * A  # (B,H,T,T); the unit diagonal is implicit
    s = torch.linalg.solve_triangular(minus_m, f.to(compute), upper=False, unitriangular=True)
    return s.to(f.dtype)
