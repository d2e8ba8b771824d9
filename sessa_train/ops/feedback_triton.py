"""Triton feedback solve: the blocked algorithm of ``feedback_chunked`` as fused kernels.

Per sequence n (N = B * H feedback heads), rows and keys are cut into blocks of C = BLOCK
tokens (C in {16, 32, 64, 128}); chunk c holds rows R = [cC, cC + C). Inputs are contiguous
q, k (N, T, Dk), f (N, T, Dv), gamma (N, T); the state s, c = A s, lambda (N, T, Dv) and
lse (N, T) is float32. A[t, j] = exp(scale q_t . k_j - lse_t) for j < t.

Forward (2 launches per chunk step)
    _lse_kernel          grid (N, T/C)          once: per-row log-sum-exp (online over key blocks), then
                                                each row block's diagonal block A_RR in float32 (Dg)
    for each chunk c in order:
      _strip_kernel      grid (N, c)            W[:, j-block] = A[R, j-block], j < c: the prefix strip
                                                (C x cC, in the GEMM operand dtype; never T x T)
      _fwd_step_kernel   grid (N, S, Dv/BD)     split-K: h_part = W[:, split's blocks] @ s[those blocks];
                                                the last program of a Dv tile (atomic ticket) sums the S
                                                parts and, with A_RR from Dg, solves
                                                s_R = (I - g A_RR)^-1 (f_R + g h);  c_R = h + A_RR s_R
Backward (3 launches per chunk step; lambda = (I - M)^-T G, reverse chunk order; df = lambda)
    _diag_kernel         grid (N, T/C)          once: every diagonal block A_RR (Dg) from the final lse
    for each chunk c from the last:
      _bwd_step_kernel   grid (N, S, Dv/BD)     split-K pull over later row blocks:
                                                acc = sum_{t >= (c+1)C} A[t, R]^T g_t lam_t (from the
                                                column strip); last program: lam_R = (I - g A_RR)^-T (G_R + acc)
                                                and its Dv tile's part of dgamma_R = lam_R . c_R
      _bwd_strips_kernel grid (N, c + 1 + c')   two roles: the dlogits strip of row block R,
                                                L[R, j] = scale g A (lam_R s_j^T - dgamma_R) for j <= c, with
                                                dk[j-block] += L[R, j]^T q_R (each key block one program);
                                                and the column strip Wc[t, :] = A[t, R'] of the next chunk
                                                R' = c - 1 for its later rows t (c' = its count)
      _dq_kernel         grid (N, S, Dk/BK)     split-K dq_R = L[R, <=R] @ k[<=R], last program sums the parts

The C x C unit-triangular solves run inside the kernels as a product of Neumann factors:
with N = g A_RR strictly lower (N^C = 0), (I - N)^-1 = (I + N)(I + N^2)(I + N^4)...(I + N^(C/2)),
log2(C) rounds of two tl.dot each, and the same with N^T for the adjoint. Rows of N sum to at
most gamma_max < 1, so the factors are well conditioned. A_RR is computed once per pass in
float32 (the values a float32 strip held before). Accumulators are float32; on a GPU the large
GEMM operands are in the input dtype (bf16/fp16 tensor cores) while the triangular solve stays
in float32 (tf32x3 for float32 inputs, tf32 otherwise).

Split-K: S programs share one product's reduction (key blocks) so that a batch of one fills the
GPU from the first few chunks on (``_splits``). Each writes its partial tile, then takes a
ticket from a per-(chunk, sequence, tile) counter; the program that draws the last ticket sums
the partials and finishes. Every buffer is allocated before the chunk loop, which has no host
synchronisation, so on CUDA the whole forward or backward can be captured in a CUDA graph and
replayed (``ops/cuda_graphs.py``). All launches go through ``launch``.

Under ``TRITON_INTERPRET=1`` (CPU) the kernels run in numpy, one program after the other; the
interpreter computes bf16 wrongly, so tiles are upcast to float32 right after every load and,
when interpreting, bf16 GEMM operands (and strips) stay float32.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

# The autotune set on a GPU (keyed on the block and feature widths); the first is the default
# launch (the interpreter runs it), at which no bf16/fp16 kernel spills registers
# (tools/compile_kernels.py checks it). Feature tiles are chosen on the host (``_tile``).
NUM_WARPS = (8, 4)


def num_warps(block: int) -> tuple[int, ...]:
    """The autotune set for a block size: 128-row tiles take 16 warps first."""
    return (16, 8) if block == 128 else NUM_WARPS


TRITON_VERSION = tuple(int(part) for part in triton.__version__.split(".")[:2])


def block_fits(block: int, dtype: torch.dtype, capability: int) -> bool:
    """Whether compiled kernels of ``block`` rows fit a GPU of compute ``capability`` (e.g. 90):
    128-row blocks need 16-bit inputs (float32 tiles exceed shared memory), sm_90 (sm_80 spills
    registers) and Triton 3.6 or later (3.4 spills; 3.6 and 3.9 checked). tools/compile_kernels.py
    checks every variant this allows."""
    return block < 128 or (dtype != torch.float32 and capability >= 90 and TRITON_VERSION >= (3, 6))


def check_block(block: int, dtype: torch.dtype, device: torch.device) -> None:
    """A one-line error for a block this GPU cannot run (``block_fits``)."""
    from sessa_train.errors import ConfigError

    major, minor = torch.cuda.get_device_capability(device)
    if not block_fits(block, dtype, 10 * major + minor):
        raise ConfigError(
            f"feedback_solve: the triton backend's {block}-row blocks need bf16/fp16 inputs on sm_90 or "
            f"later and Triton >= 3.6; got {dtype} on sm_{major}{minor}: use compute.feedback_chunk_size=64"
        )


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _tuned(key: list[str], restore: tuple[str, ...] = ()):
    """triton.autotune over the warps of ``num_warps(BLOCK)`` on a GPU; the kernel as is under
    the interpreter. ``restore`` names buffers a kernel updates in place (autotuning reruns it)."""

    def wrap(kernel):
        if interpreting():
            return kernel
        configs = [triton.Config({}, num_warps=w, num_stages=2, pre_hook=None) for w in sorted(set(NUM_WARPS) | {16})]
        return triton.autotune(
            configs=configs, key=key, restore_value=list(restore), prune_configs_by={"early_config_prune": _prune}
        )(kernel)

    return wrap


def _prune(configs, named_args, **kwargs):
    """Keep the warps that ``num_warps`` names for this block, in its order."""
    wanted = num_warps(named_args.get("BLOCK", kwargs.get("BLOCK", 64)))
    return sorted((c for c in configs if c.num_warps in wanted), key=lambda c: wanted.index(c.num_warps))


# ---------------------------------------------------------------------------------------
# building blocks (inlined into the kernels)
# ---------------------------------------------------------------------------------------


@triton.jit
def _rows_dot_rows(
    a_ptr, b_ptr, rows, cols, T, D, BLOCK: tl.constexpr, BD: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr
):
    """(BLOCK, BLOCK) tile of a[rows] @ b[cols]^T for row-major (T, D) a and b, over D in BD steps."""
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for d0 in range(0, D, BD):
        d = d0 + tl.arange(0, BD)
        dmask = d[None, :] < D
        a = tl.load(a_ptr + rows[:, None] * D + d[None, :], mask=(rows[:, None] < T) & dmask, other=0.0)
        b = tl.load(b_ptr + cols[:, None] * D + d[None, :], mask=(cols[:, None] < T) & dmask, other=0.0)
        a = a.to(tl.float32).to(DOT)
        b = b.to(tl.float32).to(DOT)
        acc += tl.dot(a, tl.trans(b), input_precision=PREC)
    return acc


@triton.jit
def _keys(starts, n, rows, cols, T, DOCS: tl.constexpr):
    """(BLOCK, BLOCK): which keys ``cols`` rows ``rows`` (< T) read: earlier ones, of their own
    document (``starts``: each row's first key) when DOCS."""
    valid = (cols[None, :] < rows[:, None]) & (rows[:, None] < T)
    if DOCS:
        first = tl.load(starts + n * T + rows, mask=rows < T, other=0)
        valid = valid & (cols[None, :] >= first[:, None])
    return valid


@triton.jit
def _probs(
    q, k, lse, starts, n, rows, cols, T, DK, scale,
    BLOCK: tl.constexpr, BK: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, DOCS: tl.constexpr,
):  # fmt: skip
    """A[rows, cols] = exp(scale q k^T - lse) where a row reads the key (``_keys``), else 0;
    (BLOCK, BLOCK) float32."""
    S = _rows_dot_rows(q + n * T * DK, k + n * T * DK, rows, cols, T, DK, BLOCK, BK, DOT, PREC) * scale
    row_lse = tl.load(lse + n * T + rows, mask=rows < T, other=0.0)
    return tl.exp(tl.where(_keys(starts, n, rows, cols, T, DOCS), S - row_lse[:, None], float("-inf")))


@triton.jit
def _neumann_solve(Nm, x, LOG2_BLOCK: tl.constexpr, TRANSPOSE: tl.constexpr, PREC: tl.constexpr):
    """(I - Nm)^-1 x, or (I - Nm^T)^-1 x, for strictly lower (BLOCK, BLOCK) Nm; x (BLOCK, BD)."""
    P = tl.trans(Nm) if TRANSPOSE else Nm
    for _ in range(LOG2_BLOCK):
        x = x + tl.dot(P, x, input_precision=PREC)
        P = tl.dot(P, P, input_precision=PREC)
    return x


@triton.jit
def _split_range(blocks, sp, nsplit):
    """Split ``sp`` of ``nsplit``: its share [lo, hi) of ``blocks`` key (or row) blocks."""
    return blocks * sp // nsplit, blocks * (sp + 1) // nsplit


@triton.jit
def _reduce_parts(part, counts, acc, n, sp, tile, chunk, nsplit, width, BLOCK: tl.constexpr, BW: tl.constexpr):
    """Store this split's partial (BLOCK, BW) tile ``acc`` of columns ``tile`` (of ``width``), take a
    ticket, and, for the program that draws the last one, return (True, the sum over the splits).
    part (N, nsplit, BLOCK, width) float32; counts one int32 per (chunk, n, tile), zeroed."""
    ar = tl.arange(0, BLOCK)
    d = tile * BW + tl.arange(0, BW)
    dmask = d[None, :] < width
    base = part + (n * nsplit) * BLOCK * width
    tl.store(base + (sp * BLOCK + ar[:, None]) * width + d[None, :], acc, mask=dmask)
    tl.debug_barrier()  # every thread's partial is written before the ticket (release)
    counter = counts + (chunk * tl.num_programs(0) + n) * tl.cdiv(width, BW) + tile
    last = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == nsplit - 1
    total = tl.zeros((BLOCK, BW), dtype=tl.float32)
    if last:
        for j in range(0, nsplit):
            total += tl.load(
                base + (j * BLOCK + ar[:, None]) * width + d[None, :], mask=dmask, other=0.0, cache_modifier=".cg"
            )
    return last, total


# ---------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------


@triton.jit
def _store_diag(
    q, k, lse, starts, Dg, n, rb, T, DK, scale,
    BLOCK: tl.constexpr, BK: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, DOCS: tl.constexpr,
):  # fmt: skip
    """The diagonal block A[R, R] of row block rb in float32: Dg (N, T/C, BLOCK, BLOCK)."""
    ar = tl.arange(0, BLOCK)
    rows = rb * BLOCK + ar
    A = _probs(q, k, lse, starts, n, rows, rows, T, DK, scale, BLOCK, BK, DOT, PREC, DOCS)
    tl.store(Dg + ((n * tl.num_programs(1) + rb) * BLOCK + ar[:, None]) * BLOCK + ar[None, :], A)


@_tuned(key=["DK", "BLOCK", "DOCS"])
@triton.jit
def _lse_kernel(
    q, k, lse, starts, first_key, Dg, T, DK, scale,
    BLOCK: tl.constexpr, BK: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, DOCS: tl.constexpr,
):  # fmt: skip
    """Per-row log-sum-exp over every earlier key of the row's document (key blocks before the
    documents of the block's rows are skipped), then the row block's diagonal block of A."""
    n = tl.program_id(0)
    rb = tl.program_id(1)
    ar = tl.arange(0, BLOCK)
    rows = rb * BLOCK + ar
    m = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    z = tl.zeros((BLOCK,), dtype=tl.float32)
    kb0 = 0
    if DOCS:
        kb0 = tl.load(first_key + n * tl.num_programs(1) + rb)
    for kb in range(kb0, rb + 1):
        cols = kb * BLOCK + ar
        S = _rows_dot_rows(q + n * T * DK, k + n * T * DK, rows, cols, T, DK, BLOCK, BK, DOT, PREC) * scale
        S = tl.where(_keys(starts, n, rows, cols, T, DOCS), S, float("-inf"))
        m_new = tl.maximum(m, tl.max(S, axis=1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet stay at z = 0
        z = z * tl.exp(m - shift) + tl.sum(tl.exp(S - shift[:, None]), axis=1)
        m = m_new
    out = tl.where(z > 0, m + tl.log(tl.where(z > 0, z, 1.0)), 0.0)
    tl.store(lse + n * T + rows, out, mask=rows < T)
    tl.debug_barrier()
    _store_diag(q, k, lse, starts, Dg, n, rb, T, DK, scale, BLOCK, BK, DOT, PREC, DOCS)


@_tuned(key=["DK", "BLOCK", "DOCS"])
@triton.jit
def _diag_kernel(
    q, k, lse, starts, Dg, T, DK, scale,
    BLOCK: tl.constexpr, BK: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, DOCS: tl.constexpr,
):  # fmt: skip
    """Every row block's diagonal block of A (the backward's; lse is final)."""
    _store_diag(q, k, lse, starts, Dg, tl.program_id(0), tl.program_id(1), T, DK, scale, BLOCK, BK, DOT, PREC, DOCS)


@triton.jit
def _store_strip(
    q, k, lse, starts, out, n, rb, kb, T, Tp, DK, scale,
    COLUMN: tl.constexpr, BLOCK: tl.constexpr, BK: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
    DOCS: tl.constexpr,
):  # fmt: skip
    """A[row block rb, key block kb] into a row strip out (N, BLOCK, Tp) at column kb, or a column
    strip out (N, Tp, BLOCK) at row rb, in the strip's dtype."""
    ar = tl.arange(0, BLOCK)
    P = _probs(q, k, lse, starts, n, rb * BLOCK + ar, kb * BLOCK + ar, T, DK, scale, BLOCK, BK, DOT, PREC, DOCS)
    if COLUMN:
        ptrs = out + n * Tp * BLOCK + (rb * BLOCK + ar)[:, None] * BLOCK + ar[None, :]
    else:
        ptrs = out + n * BLOCK * Tp + ar[:, None] * Tp + (kb * BLOCK + ar)[None, :]
    tl.store(ptrs, P.to(out.dtype.element_ty))


@_tuned(key=["DK", "BLOCK", "DOCS"])
@triton.jit
def _strip_kernel(
    q, k, lse, starts, first_key, W, T, Tp, DK, scale, chunk,
    BLOCK: tl.constexpr, BK: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, DOCS: tl.constexpr,
):  # fmt: skip
    """The forward's prefix strip W[:, kb-block] = A[R, kb-block] for key blocks kb < chunk (from
    the first key block the chunk's rows read: the step kernel reads no earlier one)."""
    n = tl.program_id(0)
    kb = tl.program_id(1)
    kb0 = 0
    if DOCS:
        kb0 = tl.load(first_key + n * (Tp // BLOCK) + chunk)
    if kb >= kb0:
        _store_strip(q, k, lse, starts, W, n, chunk, kb, T, Tp, DK, scale, False, BLOCK, BK, DOT, PREC, DOCS)


@_tuned(key=["DV", "BLOCK", "DOCS"], restore=("counts",))
@triton.jit
def _fwd_step_kernel(
    W, s, c, f, Dg, gamma, first_key, part, counts, T, Tp, DV, chunk, nsplit,
    BLOCK: tl.constexpr, BD: tl.constexpr, LOG2_BLOCK: tl.constexpr, DOT: tl.constexpr,
    PREC: tl.constexpr, SOLVE_PREC: tl.constexpr, DOCS: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0)
    sp = tl.program_id(1)
    dt = tl.program_id(2)
    ar = tl.arange(0, BLOCK)
    d = dt * BD + tl.arange(0, BD)
    dmask = d[None, :] < DV
    Wn = W + n * BLOCK * Tp
    sn = s + n * T * DV
    kb0 = 0
    if DOCS:
        kb0 = tl.load(first_key + n * (Tp // BLOCK) + chunk)
    lo, hi = _split_range(chunk - kb0, sp, nsplit)
    h = tl.zeros((BLOCK, BD), dtype=tl.float32)
    for kb in range(kb0 + lo, kb0 + hi):  # this split's earlier key blocks: every row is < T
        a = tl.load(Wn + ar[:, None] * Tp + (kb * BLOCK + ar)[None, :]).to(tl.float32).to(DOT)
        sb = tl.load(sn + (kb * BLOCK + ar)[:, None] * DV + d[None, :], mask=dmask, other=0.0).to(DOT)
        h += tl.dot(a, sb, input_precision=PREC)
    last, h = _reduce_parts(part, counts, h, n, sp, dt, chunk, nsplit, DV, BLOCK, BD)
    if last:
        rows = chunk * BLOCK + ar
        rmask = rows[:, None] < T
        A_rr = tl.load(Dg + ((n * (Tp // BLOCK) + chunk) * BLOCK + ar[:, None]) * BLOCK + ar[None, :])
        g = tl.load(gamma + n * T + rows, mask=rows < T, other=0.0).to(tl.float32)
        rhs = tl.load(f + n * T * DV + rows[:, None] * DV + d[None, :], mask=rmask & dmask, other=0.0).to(tl.float32)
        x = _neumann_solve(g[:, None] * A_rr, rhs + g[:, None] * h, LOG2_BLOCK, False, SOLVE_PREC)
        tl.store(sn + rows[:, None] * DV + d[None, :], x, mask=rmask & dmask)
        cx = h + tl.dot(A_rr, x, input_precision=SOLVE_PREC)
        tl.store(c + n * T * DV + rows[:, None] * DV + d[None, :], cx, mask=rmask & dmask)


@_tuned(key=["DV", "BLOCK", "DOCS"], restore=("counts",))
@triton.jit
def _bwd_step_kernel(
    Wc, lam, G, c, Dg, gamma, last_row, part, counts, dgp, T, Tp, DV, chunk, n_blocks, nsplit,
    BLOCK: tl.constexpr, BD: tl.constexpr, LOG2_BLOCK: tl.constexpr, DOT: tl.constexpr,
    PREC: tl.constexpr, SOLVE_PREC: tl.constexpr, DOCS: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0)
    sp = tl.program_id(1)
    dt = tl.program_id(2)
    ar = tl.arange(0, BLOCK)
    d = dt * BD + tl.arange(0, BD)
    dmask = d[None, :] < DV
    Wn = Wc + n * Tp * BLOCK
    ln = lam + n * T * DV
    rb_end = n_blocks  # the row blocks after which no row reads this chunk's keys
    if DOCS:
        rb_end = tl.load(last_row + n * n_blocks + chunk)
    lo, hi = _split_range(tl.maximum(rb_end - chunk - 1, 0), sp, nsplit)
    acc = tl.zeros((BLOCK, BD), dtype=tl.float32)
    for rb in range(chunk + 1 + lo, chunk + 1 + hi):  # this split's later row blocks: lambda is final there
        t = rb * BLOCK + ar
        a = tl.load(Wn + t[:, None] * BLOCK + ar[None, :]).to(tl.float32).to(DOT)
        g_t = tl.load(gamma + n * T + t, mask=t < T, other=0.0).to(tl.float32)
        lt = tl.load(ln + t[:, None] * DV + d[None, :], mask=(t[:, None] < T) & dmask, other=0.0)
        acc += tl.dot(tl.trans(a), (g_t[:, None] * lt).to(DOT), input_precision=PREC)
    last, acc = _reduce_parts(part, counts, acc, n, sp, dt, chunk, nsplit, DV, BLOCK, BD)
    if last:
        rows = chunk * BLOCK + ar
        rmask = rows[:, None] < T
        A_rr = tl.load(Dg + ((n * n_blocks + chunk) * BLOCK + ar[:, None]) * BLOCK + ar[None, :])
        g = tl.load(gamma + n * T + rows, mask=rows < T, other=0.0).to(tl.float32)
        rhs = tl.load(G + n * T * DV + rows[:, None] * DV + d[None, :], mask=rmask & dmask, other=0.0).to(tl.float32)
        x = _neumann_solve(g[:, None] * A_rr, rhs + acc, LOG2_BLOCK, True, SOLVE_PREC)
        tl.store(ln + rows[:, None] * DV + d[None, :], x, mask=rmask & dmask)
        cr = tl.load(c + n * T * DV + rows[:, None] * DV + d[None, :], mask=rmask & dmask, other=0.0)
        tl.store(dgp + (n * tl.num_programs(2) + dt) * Tp + rows, tl.sum(x * cr, axis=1))  # this tile's dgamma part


@_tuned(key=["DK", "DV", "BLOCK", "DOCS"], restore=("dk",))
@triton.jit
def _bwd_strips_kernel(
    q, k, lse, starts, first_key, last_row, gamma, lam, s, dgp, dgamma, L, dk, Wc, T, Tp, DK, DV, scale, chunk,
    n_dtiles, BLOCK: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
    DOCS: tl.constexpr,
):  # fmt: skip
    """Programs 0..chunk: dlogits L[R, j] for key block j and dk[j] += L^T q_R (key blocks before
    the rows' documents skipped). Programs after them: the column strip Wc of chunk - 1 for its
    later row blocks (none for chunk 0; none past the rows that read its keys)."""
    n = tl.program_id(0)
    p = tl.program_id(1)
    ar = tl.arange(0, BLOCK)
    nb = Tp // BLOCK
    if p > chunk:  # column strip of the next chunk (chunk - 1): later row block chunk + (p - chunk - 1)
        rb_end = nb
        if DOCS:
            rb_end = tl.load(last_row + n * nb + chunk - 1)
        if p - 1 < rb_end:
            _store_strip(q, k, lse, starts, Wc, n, p - 1, chunk - 1, T, Tp, DK, scale, True, BLOCK, BK, DOT, PREC, DOCS)
    else:
        rows = chunk * BLOCK + ar
        cols = p * BLOCK + ar
        rmask = rows < T
        kb0 = 0
        if DOCS:
            kb0 = tl.load(first_key + n * nb + chunk)
        dg = tl.zeros((BLOCK,), dtype=tl.float32)
        for t in range(0, n_dtiles):
            dg += tl.load(dgp + (n * n_dtiles + t) * Tp + rows)
        if p == chunk:  # the diagonal block: computed whatever the documents
            tl.store(dgamma + n * T + rows, dg, mask=rmask)
        if p >= kb0:
            A = _probs(q, k, lse, starts, n, rows, cols, T, DK, scale, BLOCK, BK, DOT, PREC, DOCS)
            dP = _rows_dot_rows(lam + n * T * DV, s + n * T * DV, rows, cols, T, DV, BLOCK, BD, DOT, PREC)
            g = tl.load(gamma + n * T + rows, mask=rmask, other=0.0).to(tl.float32)
            dL = A * (dP - dg[:, None]) * (g * scale)[:, None]
            tl.store(L + n * BLOCK * Tp + ar[:, None] * Tp + cols[None, :], dL.to(L.dtype.element_ty))
            dLt = tl.trans(dL.to(tl.float32).to(DOT))
            for e0 in range(0, DK, BK):  # dk of this key block: this program alone writes it
                e = e0 + tl.arange(0, BK)
                emask = e[None, :] < DK
                qq = tl.load(q + n * T * DK + rows[:, None] * DK + e[None, :], mask=rmask[:, None] & emask, other=0.0)
                ptrs = dk + n * T * DK + cols[:, None] * DK + e[None, :]
                mask = (cols[:, None] < T) & emask
                update = tl.dot(dLt, qq.to(tl.float32).to(DOT), input_precision=PREC)
                tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + update, mask=mask)


@_tuned(key=["DK", "BLOCK", "DOCS"], restore=("counts",))
@triton.jit
def _dq_kernel(
    L, k, first_key, dq, part, counts, T, Tp, DK, chunk, nsplit,
    BLOCK: tl.constexpr, BK: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, DOCS: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0)
    sp = tl.program_id(1)
    et = tl.program_id(2)
    ar = tl.arange(0, BLOCK)
    e = et * BK + tl.arange(0, BK)
    emask = e[None, :] < DK
    kb0 = 0
    if DOCS:
        kb0 = tl.load(first_key + n * (Tp // BLOCK) + chunk)
    lo, hi = _split_range(chunk + 1 - kb0, sp, nsplit)
    acc = tl.zeros((BLOCK, BK), dtype=tl.float32)
    for kb in range(kb0 + lo, kb0 + hi):
        cols = kb * BLOCK + ar
        a = tl.load(L + n * BLOCK * Tp + ar[:, None] * Tp + cols[None, :]).to(tl.float32).to(DOT)
        kk = tl.load(k + n * T * DK + cols[:, None] * DK + e[None, :], mask=(cols[:, None] < T) & emask, other=0.0)
        acc += tl.dot(a, kk.to(tl.float32).to(DOT), input_precision=PREC)
    last, acc = _reduce_parts(part, counts, acc, n, sp, et, chunk, nsplit, DK, BLOCK, BK)
    if last:
        rows = chunk * BLOCK + ar
        tl.store(dq + n * T * DK + rows[:, None] * DK + e[None, :], acc, mask=(rows[:, None] < T) & emask)


# ---------------------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------------------


def launch(kernel, grid: tuple[int, ...], *args, **kwargs) -> None:
    """Every kernel launch of the solve (tests count them here)."""
    kernel[grid](*args, **kwargs)


def _tile(width: int, block: int) -> int:
    """Feature-dimension tile: a power of two in [16, 64] (tl.dot needs >= 16); 16 with 128-row
    blocks, whose 128 x 128 float32 tiles leave no registers for wider ones."""
    return 16 if block == 128 else max(16, min(64, triton.next_power_of_2(width)))


def _precisions(dtype: torch.dtype) -> dict:
    """GEMM operand dtype and tl.dot precisions for an input dtype."""
    if dtype == torch.float32:
        return {"DOT": tl.float32, "PREC": "tf32x3"}
    if dtype == torch.float16:
        return {"DOT": tl.float16, "PREC": "tf32"}
    return {"DOT": tl.float32 if interpreting() else tl.bfloat16, "PREC": "tf32"}


STRIP_DTYPE = {tl.float32: torch.float32, tl.float16: torch.float16, tl.bfloat16: torch.bfloat16}
# split-K aims at this many programs per product; on CUDA twice the multiprocessors (``_splits``)
SPLIT_TARGET: int | None = None


def _splits(device: torch.device, programs: int) -> int:
    """Splits of a reduction so that ``programs`` (per split) times the splits fill the GPU."""
    target = SPLIT_TARGET
    if target is None:
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, -(-target // programs))


class _Launch:
    """The sizes, tiles, precisions and buffers every launch of one solve shares."""

    def __init__(self, q: torch.Tensor, dv: int, scale: float, block: int) -> None:
        self.N, self.T, self.DK = q.shape
        self.DV, self.scale, self.block, self.device = dv, scale, block, q.device
        self.nb = triton.cdiv(self.T, block)
        self.Tp = self.nb * block
        self.BK, self.BD = _tile(self.DK, block), _tile(dv, block)
        self.prec = _precisions(q.dtype)
        self.strip_dtype = STRIP_DTYPE[self.prec["DOT"]]
        self.solve = {
            "LOG2_BLOCK": int(math.log2(block)),
            "SOLVE_PREC": "tf32x3" if q.dtype == torch.float32 else "tf32",
        }
        self.dv_tiles, self.dk_tiles = triton.cdiv(dv, self.BD), triton.cdiv(self.DK, self.BK)
        self.split_v = _splits(q.device, self.N * self.dv_tiles)  # at most; per chunk: the blocks there are
        self.split_k = _splits(q.device, self.N * self.dk_tiles)

    def empty(self, *shape: int, zero: bool = False, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (torch.zeros if zero else torch.empty)(*shape, dtype=dtype, device=self.device)

    def counters(self, tiles: int) -> torch.Tensor:
        return self.empty(self.nb, self.N, tiles, zero=True, dtype=torch.int32)

    def parts(self, splits: int, width: int) -> torch.Tensor:
        return self.empty(self.N, splits, self.block, width)


class _Documents(NamedTuple):
    """Packed documents as the kernels read them: each row's first key ``starts`` (N, T) int32,
    per row block the first key block its rows read ``first_key`` (N, T/C), and per key block the
    row blocks that can read it ``last_row`` (N, T/C: rows of later blocks start after it); DOCS."""

    starts: torch.Tensor
    first_key: torch.Tensor
    last_row: torch.Tensor
    DOCS: bool


def _documents(starts: torch.Tensor | None, L: _Launch) -> _Documents:
    if starts is None:  # one document: the kernels read none of these
        unused = L.empty(1, dtype=torch.int32)
        return _Documents(unused, unused, unused, False)
    first_key = (starts[:, :: L.block] // L.block).to(torch.int32).contiguous()
    ends = (torch.arange(1, L.nb + 1, device=starts.device) * L.block).expand(L.N, L.nb).contiguous()
    readers = torch.searchsorted(starts.contiguous(), ends)  # rows whose document starts before a block's end
    last_row = ((readers + L.block - 1) // L.block).to(torch.int32).contiguous()
    return _Documents(starts.to(torch.int32).contiguous(), first_key, last_row, True)


def triton_forward(q, k, f, gamma, starts, scale: float, block: int, prefix=None):
    """q, k (N, T, Dk); f (N, T, Dv); gamma (N, T), contiguous; ``starts`` (N, T) each row's first
    key (packed documents) or None. Returns float32 s, c (N, T, Dv), lse (N, T).

    ``prefix`` = (lse_p, h_p) continues a solve whose earlier rows live elsewhere, as in
    ``feedback_chunked.chunked_forward``: the row log-sum-exp joins the earlier keys' lse_p, and
    their normalised contribution gamma * h_p enters the right-hand side (float32 inputs).
    """
    L = _Launch(q, f.shape[-1], scale, block)
    N, T, nb = L.N, L.T, L.nb
    docs = _documents(starts, L)
    lse, s, c = L.empty(N, T), L.empty(N, T, L.DV), L.empty(N, T, L.DV)
    W, Dg = L.empty(N, block, L.Tp, dtype=L.strip_dtype), L.empty(N, nb, block, block)
    part, counts = L.parts(L.split_v, L.DV), L.counters(L.dv_tiles)
    consts = {"BLOCK": block, "BK": L.BK, "DOCS": docs.DOCS, **L.prec}
    launch(_lse_kernel, (N, nb), q, k, lse, docs.starts, docs.first_key, Dg, T, L.DK, scale, **consts)
    earlier = None
    if prefix is not None:
        rows = torch.arange(T, device=q.device)
        alone = rows == (0 if starts is None else starts)  # rows without an own earlier key (the kernel wrote 0)
        total = torch.logaddexp(torch.where(alone, float("-inf"), lse), prefix[0].float())
        keys = ~torch.isneginf(total)
        lse = torch.where(keys, total, 0.0).contiguous()
        launch(_diag_kernel, (N, nb), q, k, lse, docs.starts, Dg, T, L.DK, scale, **consts)
        weight = torch.where(keys, (prefix[0].float() - total).exp(), 0.0)
        earlier = prefix[1].float() * weight.unsqueeze(-1)
        f = torch.addcmul(f.float(), gamma.float().unsqueeze(-1), earlier).contiguous()
    for ch in range(nb):
        if ch:
            launch(
                _strip_kernel, (N, ch), q, k, lse, docs.starts, docs.first_key, W, T, L.Tp, L.DK, scale, ch, **consts
            )
        splits = max(1, min(L.split_v, ch))
        launch(
            _fwd_step_kernel, (N, splits, L.dv_tiles),
            W, s, c, f, Dg, gamma, docs.first_key, part, counts, T, L.Tp, L.DV, ch, splits,
            BLOCK=block, BD=L.BD, DOCS=docs.DOCS, **L.solve, **L.prec,
        )  # fmt: skip
    if earlier is not None:
        c += earlier
    return s, c, lse


def triton_backward(grad_s, q, k, gamma, starts, s, c, lse, scale: float, block: int):
    """Adjoint of ``triton_forward``. Returns float32 dq, dk (N, T, Dk), df (N, T, Dv), dgamma (N, T)."""
    L = _Launch(q, s.shape[-1], scale, block)
    N, T, nb = L.N, L.T, L.nb
    docs = _documents(starts, L)
    lam, dgamma = L.empty(N, T, L.DV), L.empty(N, T)
    dq, dk = L.empty(N, T, L.DK), L.empty(N, T, L.DK, zero=True)
    Wc, dL = L.empty(N, L.Tp, block, dtype=L.strip_dtype), L.empty(N, block, L.Tp, dtype=L.strip_dtype)
    dgp, Dg = L.empty(N, L.dv_tiles, L.Tp), L.empty(N, nb, block, block)
    part_v, counts_v = L.parts(L.split_v, L.DV), L.counters(L.dv_tiles)
    part_k, counts_k = L.parts(L.split_k, L.DK), L.counters(L.dk_tiles)
    consts = {"BLOCK": block, "BK": L.BK, "DOCS": docs.DOCS, **L.prec}
    launch(_diag_kernel, (N, nb), q, k, lse, docs.starts, Dg, T, L.DK, scale, **consts)
    for ch in range(nb - 1, -1, -1):
        splits = max(1, min(L.split_v, nb - ch - 1))
        launch(
            _bwd_step_kernel, (N, splits, L.dv_tiles),
            Wc, lam, grad_s, c, Dg, gamma, docs.last_row, part_v, counts_v, dgp, T, L.Tp, L.DV, ch, nb, splits,
            BLOCK=block, BD=L.BD, DOCS=docs.DOCS, **L.solve, **L.prec,
        )  # fmt: skip
        column = nb - ch if ch else 0  # the next chunk's later row blocks
        launch(
            _bwd_strips_kernel, (N, ch + 1 + column),
            q, k, lse, docs.starts, docs.first_key, docs.last_row, gamma, lam, s, dgp, dgamma, dL, dk, Wc,
            T, L.Tp, L.DK, L.DV, scale, ch, L.dv_tiles, BD=L.BD, **consts,
        )  # fmt: skip
        splits = max(1, min(L.split_k, ch + 1))
        launch(
            _dq_kernel, (N, splits, L.dk_tiles),
            dL, k, docs.first_key, dq, part_k, counts_k, T, L.Tp, L.DK, ch, splits, **consts,
        )  # fmt: skip
    return dq, dk, lam, dgamma


def kernel_variants(
    block: int, dtype: torch.dtype, width: int = 1024, docs: bool = False
) -> list[tuple[str, object, dict, dict]]:
    """Every (name, kernel, signature, constexprs) the host side launches for one BLOCK and input
    dtype, with the feature tiles it takes for heads ``width`` wide, for one document or packed
    ones (``docs``): what an AOT compile must cover."""
    tile = _tile(width, block)
    io = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}[dtype]
    dot = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]
    strip = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}[dtype]
    prec = {"DOT": dot, "PREC": "tf32x3" if dtype == torch.float32 else "tf32"}
    solve = {"LOG2_BLOCK": int(math.log2(block)), "SOLVE_PREC": prec["PREC"]}
    f32, i32 = "*fp32", "*i32"
    types = {"q": io, "k": io, "f": io, "gamma": io, "G": io, "lse": f32, "s": f32, "c": f32, "lam": f32}
    types |= {"W": strip, "Wc": strip, "L": strip, "part": f32, "counts": i32, "dgp": f32, "dgamma": f32}
    types |= {"dq": f32, "dk": f32, "Dg": f32, "scale": "fp32", "starts": i32, "first_key": i32, "last_row": i32}
    tiles = {"BLOCK": block, "BK": tile, "BD": tile, "DOCS": docs}

    def variant(name: str, kernel, extra: dict) -> tuple[str, object, dict, dict]:
        names = kernel.arg_names  # an autotuner, a JIT function or (interpreting) its stand-in all have them
        signature = {a: types.get(a, "i32") if a not in (tiles | prec | solve) else "constexpr" for a in names}
        consts = {key: val for key, val in (tiles | prec | extra).items() if key in names}
        return name + ("+docs" if docs else ""), getattr(kernel, "fn", kernel), signature, consts

    return [
        variant("lse", _lse_kernel, {}),
        variant("diag", _diag_kernel, {}),
        variant("strip", _strip_kernel, {}),
        variant("fwd_step", _fwd_step_kernel, solve),
        variant("bwd_step", _bwd_step_kernel, solve),
        variant("bwd_strips", _bwd_strips_kernel, {}),
        variant("dq", _dq_kernel, {}),
    ]
