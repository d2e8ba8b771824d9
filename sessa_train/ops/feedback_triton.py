"""Triton feedback solve: the blocked algorithm of ``feedback_chunked`` as fused kernels.

Per sequence n (N = B * H feedback heads), rows and keys are cut into blocks of C = BLOCK
tokens (C in {16, 32, 64}); chunk c holds rows R = [cC, cC + C). Inputs are contiguous
q, k (N, T, Dk), f (N, T, Dv), gamma (N, T); internal state s, c = A s, lambda (N, T, Dv),
lse (N, T) is float32.

Forward
    _lse_kernel        grid (N, T/C)        per-row log-sum-exp of the strictly causal logits
                                            (online max/sum over key blocks; fully parallel)
    for each chunk c in order:
      _strip_kernel    grid (N, c+1)        W[:, j-block] = A[R, j-block] for j <= c from lse
                                            (the row strip, C x (c+1)C; never T x T)
      _solve_fwd_kernel grid (N, Dv/BD)     h = W[:, <cC] @ s[<cC]; s_R = (I - g A_RR)^-1 (f_R + g h);
                                            c_R = h + A_RR s_R
Backward (lambda = (I - M)^-T G, reverse chunk order; df = lambda)
    for each chunk c from the last:
      _strip_kernel    grid (N, T/C - c)    Wc[t-block, :] = A[t-block, R] for t-blocks >= c (column strip)
      _solve_bwd_kernel grid (N, Dv/BD)     acc = sum_{t >= (c+1)C} A[t, R]^T g_t lam_t  (pull, not push);
                                            lam_R = (I - g A_RR)^-T (G_R + acc)
    dgamma = rowsum(lam * c)                (O(T * D) elementwise, in torch)
    for each chunk c:                       (independent of each other)
      _strip_kernel    grid (N, c+1)        W = dlogits[R, <(c+1)C] = scale g A (lam_R s^T - dgamma_R)
      _dq_kernel       grid (N, Dk/BK)      dq_R = W @ k[<(c+1)C]
      _dk_kernel       grid (N, c+1, Dk/BK) dk[j-block] += W[:, j-block]^T @ q_R

The C x C unit-triangular solves run inside the kernels as a product of Neumann factors:
with N = g A_RR strictly lower (N^C = 0), (I - N)^-1 = (I + N)(I + N^2)(I + N^4)...(I + N^(C/2)),
log2(C) rounds of two tl.dot each, and the same with N^T for the adjoint. Rows of N sum to at
most gamma_max < 1, so the factors are well conditioned. Accumulators are float32; on a GPU
the large GEMM operands are cast to the input dtype (bf16/fp16 tensor cores) while the
triangular solve stays in float32 ("ieee" for float32 inputs, tf32 otherwise).

Under ``TRITON_INTERPRET=1`` (CPU) the kernels run in numpy; the interpreter computes bf16
wrongly, so tiles are upcast to float32 right after every load and, when interpreting,
bf16 GEMM operands stay float32.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

# The autotune set on a GPU (keyed on the block and feature widths); the first is the default
# launch (the interpreter runs it): 8 warps, at which no bf16/fp16 kernel spills registers
# (tools/compile_kernels.py checks it). Feature tiles are chosen on the host (``_tile``).
NUM_WARPS = (8, 4)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _tuned(key: list[str], restore: tuple[str, ...] = ()):
    """triton.autotune over NUM_WARPS on a GPU; the kernel as is under the interpreter.
    ``restore`` names outputs that a kernel updates in place (autotuning reruns it)."""

    def wrap(kernel):
        if interpreting():
            return kernel
        configs = [triton.Config({}, num_warps=w, num_stages=2) for w in NUM_WARPS]
        return triton.autotune(configs=configs, key=key, restore_value=list(restore))(kernel)

    return wrap


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
def _neumann_solve(Nm, x, LOG2_BLOCK: tl.constexpr, TRANSPOSE: tl.constexpr, PREC: tl.constexpr):
    """(I - Nm)^-1 x, or (I - Nm^T)^-1 x, for strictly lower (BLOCK, BLOCK) Nm; x (BLOCK, BD)."""
    P = tl.trans(Nm) if TRANSPOSE else Nm
    for _ in range(LOG2_BLOCK):
        x = x + tl.dot(P, x, input_precision=PREC)
        P = tl.dot(P, P, input_precision=PREC)
    return x


# ---------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------


@_tuned(key=["DK", "BLOCK"])
@triton.jit
def _lse_kernel(q, k, lse, T, DK, scale, BLOCK: tl.constexpr, BK: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    n = tl.program_id(0)
    rb = tl.program_id(1)
    ar = tl.arange(0, BLOCK)
    rows = rb * BLOCK + ar
    m = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    z = tl.zeros((BLOCK,), dtype=tl.float32)
    for kb in range(0, rb + 1):
        cols = kb * BLOCK + ar
        S = _rows_dot_rows(q + n * T * DK, k + n * T * DK, rows, cols, T, DK, BLOCK, BK, DOT, PREC) * scale
        S = tl.where(cols[None, :] < rows[:, None], S, float("-inf"))
        m_new = tl.maximum(m, tl.max(S, axis=1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet stay at z = 0
        z = z * tl.exp(m - shift) + tl.sum(tl.exp(S - shift[:, None]), axis=1)
        m = m_new
    out = tl.where(z > 0, m + tl.log(tl.where(z > 0, z, 1.0)), 0.0)
    tl.store(lse + n * T + rows, out, mask=rows < T)


@_tuned(key=["DK", "DV", "BLOCK", "MODE"])
@triton.jit
def _strip_kernel(
    q,
    k,
    lse,
    gamma,
    lam,
    s,
    dgamma,
    out,
    T,
    Tp,
    DK,
    DV,
    scale,
    chunk,
    MODE: tl.constexpr,
    COLUMN: tl.constexpr,
    BLOCK: tl.constexpr,
    BK: tl.constexpr,
    BD: tl.constexpr,
    DOT: tl.constexpr,
    PREC: tl.constexpr,
):
    """One (BLOCK, BLOCK) tile of a strip.

    MODE 0: A[t, j] = exp(scale q_t . k_j - lse_t) for j < t, else 0.
    MODE 1: dlogits[t, j] = scale g_t A[t, j] (lam_t . s_j - dgamma_t).
    Row strip (COLUMN=False): rows = chunk's block, keys = block p; out (N, BLOCK, Tp).
    Column strip (COLUMN=True): rows = block chunk + p, keys = chunk's block; out (N, Tp, BLOCK).
    """
    n = tl.program_id(0)
    p = tl.program_id(1)
    if COLUMN:
        rb = chunk + p
        kb = chunk
    else:
        rb = chunk
        kb = p
    ar = tl.arange(0, BLOCK)
    rows = rb * BLOCK + ar
    cols = kb * BLOCK + ar
    rmask = rows < T
    S = _rows_dot_rows(q + n * T * DK, k + n * T * DK, rows, cols, T, DK, BLOCK, BK, DOT, PREC) * scale
    row_lse = tl.load(lse + n * T + rows, mask=rmask, other=0.0)
    valid = (cols[None, :] < rows[:, None]) & rmask[:, None]
    P = tl.exp(tl.where(valid, S - row_lse[:, None], float("-inf")))
    if MODE == 1:
        dP = _rows_dot_rows(lam + n * T * DV, s + n * T * DV, rows, cols, T, DV, BLOCK, BD, DOT, PREC)
        g = tl.load(gamma + n * T + rows, mask=rmask, other=0.0).to(tl.float32)
        dg = tl.load(dgamma + n * T + rows, mask=rmask, other=0.0)
        P = P * (dP - dg[:, None]) * (g * scale)[:, None]
    if COLUMN:
        ptrs = out + n * Tp * BLOCK + rows[:, None] * BLOCK + ar[None, :]
    else:
        ptrs = out + n * BLOCK * Tp + ar[:, None] * Tp + cols[None, :]
    tl.store(ptrs, P)


@_tuned(key=["DV", "BLOCK"])
@triton.jit
def _solve_fwd_kernel(
    W,
    s,
    c,
    f,
    gamma,
    T,
    Tp,
    DV,
    chunk,
    BLOCK: tl.constexpr,
    BD: tl.constexpr,
    LOG2_BLOCK: tl.constexpr,
    DOT: tl.constexpr,
    PREC: tl.constexpr,
    SOLVE_PREC: tl.constexpr,
):
    n = tl.program_id(0)
    dt = tl.program_id(1)
    ar = tl.arange(0, BLOCK)
    d = dt * BD + tl.arange(0, BD)
    dmask = d[None, :] < DV
    rows = chunk * BLOCK + ar
    rmask = rows[:, None] < T
    Wn = W + n * BLOCK * Tp
    sn = s + n * T * DV
    h = tl.zeros((BLOCK, BD), dtype=tl.float32)
    for kb in range(0, chunk):  # earlier chunks: every row is < T
        a = tl.load(Wn + ar[:, None] * Tp + (kb * BLOCK + ar)[None, :]).to(DOT)
        sb = tl.load(sn + (kb * BLOCK + ar)[:, None] * DV + d[None, :], mask=dmask, other=0.0).to(DOT)
        h += tl.dot(a, sb, input_precision=PREC)
    A_rr = tl.load(Wn + ar[:, None] * Tp + (chunk * BLOCK + ar)[None, :])
    g = tl.load(gamma + n * T + rows, mask=rows < T, other=0.0).to(tl.float32)
    rhs = tl.load(f + n * T * DV + rows[:, None] * DV + d[None, :], mask=rmask & dmask, other=0.0).to(tl.float32)
    x = _neumann_solve(g[:, None] * A_rr, rhs + g[:, None] * h, LOG2_BLOCK, False, SOLVE_PREC)
    tl.store(sn + rows[:, None] * DV + d[None, :], x, mask=rmask & dmask)
    cx = h + tl.dot(A_rr, x, input_precision=SOLVE_PREC)
    tl.store(c + n * T * DV + rows[:, None] * DV + d[None, :], cx, mask=rmask & dmask)


@_tuned(key=["DV", "BLOCK"])
@triton.jit
def _solve_bwd_kernel(
    Wc,
    lam,
    G,
    gamma,
    T,
    Tp,
    DV,
    chunk,
    n_blocks,
    BLOCK: tl.constexpr,
    BD: tl.constexpr,
    LOG2_BLOCK: tl.constexpr,
    DOT: tl.constexpr,
    PREC: tl.constexpr,
    SOLVE_PREC: tl.constexpr,
):
    n = tl.program_id(0)
    dt = tl.program_id(1)
    ar = tl.arange(0, BLOCK)
    d = dt * BD + tl.arange(0, BD)
    dmask = d[None, :] < DV
    rows = chunk * BLOCK + ar
    rmask = rows[:, None] < T
    Wn = Wc + n * Tp * BLOCK
    ln = lam + n * T * DV
    acc = tl.zeros((BLOCK, BD), dtype=tl.float32)
    for rb in range(chunk + 1, n_blocks):  # later chunks: lambda is final there
        t = rb * BLOCK + ar
        a = tl.load(Wn + t[:, None] * BLOCK + ar[None, :]).to(DOT)
        g_t = tl.load(gamma + n * T + t, mask=t < T, other=0.0).to(tl.float32)
        lt = tl.load(ln + t[:, None] * DV + d[None, :], mask=(t[:, None] < T) & dmask, other=0.0)
        acc += tl.dot(tl.trans(a), (g_t[:, None] * lt).to(DOT), input_precision=PREC)
    A_rr = tl.load(Wn + rows[:, None] * BLOCK + ar[None, :])
    g = tl.load(gamma + n * T + rows, mask=rows < T, other=0.0).to(tl.float32)
    rhs = tl.load(G + n * T * DV + rows[:, None] * DV + d[None, :], mask=rmask & dmask, other=0.0).to(tl.float32)
    x = _neumann_solve(g[:, None] * A_rr, rhs + acc, LOG2_BLOCK, True, SOLVE_PREC)
    tl.store(ln + rows[:, None] * DV + d[None, :], x, mask=rmask & dmask)


@_tuned(key=["DK", "BLOCK"])
@triton.jit
def _dq_kernel(
    W, k, dq, T, Tp, DK, chunk, BLOCK: tl.constexpr, BK: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr
):
    n = tl.program_id(0)
    kt = tl.program_id(1)
    ar = tl.arange(0, BLOCK)
    e = kt * BK + tl.arange(0, BK)
    emask = e[None, :] < DK
    acc = tl.zeros((BLOCK, BK), dtype=tl.float32)
    for kb in range(0, chunk + 1):
        cols = kb * BLOCK + ar
        a = tl.load(W + n * BLOCK * Tp + ar[:, None] * Tp + cols[None, :]).to(DOT)
        kk = tl.load(k + n * T * DK + cols[:, None] * DK + e[None, :], mask=(cols[:, None] < T) & emask, other=0.0)
        acc += tl.dot(a, kk.to(tl.float32).to(DOT), input_precision=PREC)
    rows = chunk * BLOCK + ar
    tl.store(dq + n * T * DK + rows[:, None] * DK + e[None, :], acc, mask=(rows[:, None] < T) & emask)


@_tuned(key=["DK", "BLOCK"], restore=("dk",))
@triton.jit
def _dk_kernel(
    W, q, dk, T, Tp, DK, chunk, BLOCK: tl.constexpr, BK: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr
):
    n = tl.program_id(0)
    kb = tl.program_id(1)
    kt = tl.program_id(2)
    ar = tl.arange(0, BLOCK)
    e = kt * BK + tl.arange(0, BK)
    emask = e[None, :] < DK
    rows = chunk * BLOCK + ar
    cols = kb * BLOCK + ar
    a = tl.load(W + n * BLOCK * Tp + ar[:, None] * Tp + cols[None, :]).to(DOT)
    qq = tl.load(q + n * T * DK + rows[:, None] * DK + e[None, :], mask=(rows[:, None] < T) & emask, other=0.0)
    update = tl.dot(tl.trans(a), qq.to(tl.float32).to(DOT), input_precision=PREC)
    ptrs = dk + n * T * DK + cols[:, None] * DK + e[None, :]
    mask = (cols[:, None] < T) & emask
    tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + update, mask=mask)


# ---------------------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------------------


def _tile(width: int) -> int:
    """Feature-dimension tile: a power of two in [16, 64] (tl.dot needs >= 16)."""
    return max(16, min(64, triton.next_power_of_2(width)))


def _precisions(dtype: torch.dtype) -> dict:
    """GEMM operand dtype and tl.dot precisions for an input dtype."""
    if dtype == torch.float32:
        return {"DOT": tl.float32, "PREC": "tf32x3"}
    if dtype == torch.float16:
        return {"DOT": tl.float16, "PREC": "tf32"}
    return {"DOT": tl.float32 if interpreting() else tl.bfloat16, "PREC": "tf32"}


class _Launch:
    """The sizes, tiles and precisions every launch of one solve shares."""

    def __init__(self, q: torch.Tensor, dv: int, scale: float, block: int) -> None:
        self.N, self.T, self.DK = q.shape
        self.DV, self.scale, self.block, self.device = dv, scale, block, q.device
        self.nb = triton.cdiv(self.T, block)
        self.Tp = self.nb * block
        self.BK, self.BD = _tile(self.DK), _tile(dv)
        self.prec = _precisions(q.dtype)
        self.solve = {
            "LOG2_BLOCK": int(math.log2(block)),
            "SOLVE_PREC": "tf32x3" if q.dtype == torch.float32 else "tf32",
        }

    def empty(self, *shape: int, zero: bool = False) -> torch.Tensor:
        return (torch.zeros if zero else torch.empty)(*shape, dtype=torch.float32, device=self.device)

    def strip(self, grid, chunk, q, k, lse, gamma, lam, s, dgamma, out, mode: int, column: bool) -> None:
        """One row strip (or, with ``column``, column strip) of A (mode 0) or of dlogits (mode 1)."""
        _strip_kernel[grid](
            q, k, lse, gamma, lam, s, dgamma, out, self.T, self.Tp, self.DK, self.DV, self.scale, chunk,
            MODE=mode, COLUMN=column, BLOCK=self.block, BK=self.BK, BD=self.BD, **self.prec,
        )  # fmt: skip


def triton_forward(q, k, f, gamma, scale: float, block: int, prefix=None):
    """q, k (N, T, Dk); f (N, T, Dv); gamma (N, T), contiguous. Returns float32 s, c (N, T, Dv), lse (N, T).

    ``prefix`` = (lse_p, h_p) continues a solve whose earlier rows live elsewhere, as in
    ``feedback_chunked.chunked_forward``: the row log-sum-exp joins the earlier keys' lse_p, and
    their normalised contribution gamma * h_p enters the right-hand side (float32 inputs).
    """
    L = _Launch(q, f.shape[-1], scale, block)
    N, T = L.N, L.T
    lse, s, c, W = L.empty(N, T), L.empty(N, T, L.DV), L.empty(N, T, L.DV), L.empty(N, block, L.Tp)
    _lse_kernel[(N, L.nb)](q, k, lse, T, L.DK, scale, BLOCK=block, BK=L.BK, **L.prec)
    earlier = None
    if prefix is not None:
        own = lse.clone()
        own[:, 0] = float("-inf")  # the kernel writes 0 for the one row without an own earlier key
        lse = torch.logaddexp(own, prefix[0].float()).contiguous()  # every row has earlier keys
        earlier = prefix[1].float() * (prefix[0].float() - lse).exp().unsqueeze(-1)
        f = torch.addcmul(f.float(), gamma.float().unsqueeze(-1), earlier).contiguous()
    for ch in range(L.nb):
        L.strip((N, ch + 1), ch, q, k, lse, gamma, s, s, lse, W, mode=0, column=False)
        _solve_fwd_kernel[(N, triton.cdiv(L.DV, L.BD))](
            W, s, c, f, gamma, T, L.Tp, L.DV, ch, BLOCK=block, BD=L.BD, **L.solve, **L.prec
        )
    if earlier is not None:
        c += earlier
    return s, c, lse


def triton_backward(grad_s, q, k, gamma, s, c, lse, scale: float, block: int):
    """Adjoint of ``triton_forward``. Returns float32 dq, dk (N, T, Dk), df (N, T, Dv), dgamma (N, T)."""
    L = _Launch(q, s.shape[-1], scale, block)
    N, T, nb = L.N, L.T, L.nb
    lam, Wc = L.empty(N, T, L.DV), L.empty(N, L.Tp, block)
    for ch in range(nb - 1, -1, -1):
        L.strip((N, nb - ch), ch, q, k, lse, gamma, s, s, lse, Wc, mode=0, column=True)
        _solve_bwd_kernel[(N, triton.cdiv(L.DV, L.BD))](
            Wc, lam, grad_s, gamma, T, L.Tp, L.DV, ch, nb, BLOCK=block, BD=L.BD, **L.solve, **L.prec
        )
    del Wc
    dgamma = torch.linalg.vecdot(lam, c)
    dq, dk, W = L.empty(N, T, L.DK), L.empty(N, T, L.DK, zero=True), L.empty(N, block, L.Tp)
    for ch in range(nb):
        L.strip((N, ch + 1), ch, q, k, lse, gamma, lam, s, dgamma, W, mode=1, column=False)
        _dq_kernel[(N, triton.cdiv(L.DK, L.BK))](W, k, dq, T, L.Tp, L.DK, ch, BLOCK=block, BK=L.BK, **L.prec)
        _dk_kernel[(N, ch + 1, triton.cdiv(L.DK, L.BK))](W, q, dk, T, L.Tp, L.DK, ch, BLOCK=block, BK=L.BK, **L.prec)
    return dq, dk, lam, dgamma


def kernel_variants(block: int, dtype: torch.dtype, tile: int = 64) -> list[tuple[str, object, dict, dict]]:
    """Every (name, kernel, signature, constexprs) the host side launches for one BLOCK and input
    dtype, with feature tiles of ``tile``: what an ahead-of-time compile must cover."""
    io = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}[dtype]
    f32 = "*fp32"
    prec = {"DOT": {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]}
    prec["PREC"] = "tf32x3" if dtype == torch.float32 else "tf32"
    solve = {"LOG2_BLOCK": int(math.log2(block)), "SOLVE_PREC": prec["PREC"]}
    ints = {"T": "i32", "Tp": "i32", "DK": "i32", "DV": "i32", "chunk": "i32", "n_blocks": "i32"}
    strip = {"q": io, "k": io, "lse": f32, "gamma": io, "lam": f32, "s": f32, "dgamma": f32, "out": f32}
    strip |= {"T": "i32", "Tp": "i32", "DK": "i32", "DV": "i32", "scale": "fp32", "chunk": "i32"}

    def sig(kernel, types: dict) -> dict:
        return {name: types.get(name, ints.get(name, "constexpr")) for name in kernel.arg_names}

    jitted = {
        k: getattr(k, "fn", k)
        for k in (_lse_kernel, _strip_kernel, _solve_fwd_kernel, _solve_bwd_kernel, _dq_kernel, _dk_kernel)
    }

    tiles = {"BLOCK": block, "BK": tile, "BD": tile}
    out = [("lse", _lse_kernel, sig(_lse_kernel, {"q": io, "k": io, "lse": f32, "scale": "fp32"}), {})]
    for mode, column in ((0, False), (0, True), (1, False)):
        out.append(
            (
                f"strip_mode{mode}{'_column' if column else ''}",
                _strip_kernel,
                sig(_strip_kernel, strip),
                {"MODE": mode, "COLUMN": column},
            )
        )
    out.append(
        (
            "solve_fwd",
            _solve_fwd_kernel,
            sig(_solve_fwd_kernel, {"W": f32, "s": f32, "c": f32, "f": io, "gamma": io}),
            solve,
        )
    )
    out.append(
        ("solve_bwd", _solve_bwd_kernel, sig(_solve_bwd_kernel, {"Wc": f32, "lam": f32, "G": io, "gamma": io}), solve)
    )
    out.append(("dq", _dq_kernel, sig(_dq_kernel, {"W": f32, "k": io, "dq": f32}), {}))
    out.append(("dk", _dk_kernel, sig(_dk_kernel, {"W": f32, "q": io, "dk": f32}), {}))
    result = []
    for name, kernel, signature, extra in out:
        consts = {key: val for key, val in {**tiles, **prec, **extra}.items() if key in kernel.arg_names}
        result.append((name, jitted[kernel], signature, consts))
    return result
