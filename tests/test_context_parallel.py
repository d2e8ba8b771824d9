"""Context-parallel feedback solve (gloo): one sequence split over 2 or 4 ranks against the
single-process solve, forward and every gradient; on plain gloo and under NCCL's rules
(tests/nccl_rules.py: tags ignored, one operation at a time per peer pair or per rank); and packed
documents, one of which spans ranks while a later rank's rows all start after the first rank's
keys (which it then skips)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.slow

T, B, H, DK, DV, CHUNK = 23, 2, 2, 8, 6, 4  # T: no multiple of CHUNK, blocks of unequal size


def _inputs(dtype):
    g = torch.Generator().manual_seed(7)
    q = torch.randn(B, H, T, DK, generator=g, dtype=torch.float64)
    k = torch.randn(B, H, T, DK, generator=g, dtype=torch.float64)
    f = torch.randn(B, H, T, DV, generator=g, dtype=torch.float64)
    gamma = 0.999 * torch.tanh(1.0 + 2 * torch.rand(B, H, T, generator=g, dtype=torch.float64))  # near gamma_max
    w = torch.randn(B, H, T, DV, generator=g, dtype=torch.float64)  # upstream gradient
    return [t.to(dtype) for t in (q, k, f, gamma, w)]


def _starts(docs: bool):
    """(B, T) document starts: [5, 10, 8] tokens in the first sequence (the second spans the rank
    boundaries), [12, 11] in the second; None: one document."""
    if not docs:
        return None
    lengths = ([5, 10, 8], [12, 11])
    return torch.tensor([[sum(L[:i]) for i, n in enumerate(L) for _ in range(n)] for L in lengths])


def _reference(dtype, docs: bool = False):
    from sessa_train.ops import feedback_solve

    q, k, f, gamma, w = (t.requires_grad_() if i < 4 else t for i, t in enumerate(_inputs(torch.float64)))
    s = feedback_solve(q, k, f, gamma, scale=DK**-0.5, backend="reference", key_start=_starts(docs))
    (s * w).sum().backward()
    return {"s": s.detach(), "dq": q.grad, "dk": k.grad, "df": f.grad, "dgamma": gamma.grad}


def _worker(rank: int, world: int, port: int, out, rules: str | None, docs: bool) -> None:
    torch.set_num_threads(1)  # a rank per core or less: more intra-op threads only contend (tests/trainer.py)
    import torch.distributed as dist

    if rules:
        from tests.nccl_rules import install

        install(rules)

    from sessa_train.ops import Solver
    from sessa_train.parallel.context_parallel import feedback_solve_context_parallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    sizes = tuple(len(x) for x in torch.arange(T).tensor_split(world))
    rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    for dtype in (torch.float64, torch.float32):
        q, k, f, gamma, w = (t[:, :, rows].clone() for t in _inputs(dtype))
        for t in (q, k, f, gamma):
            t.requires_grad_()
        starts = None if not docs else _starts(docs)[:, rows]
        solver = Solver("chunked", CHUNK)
        s = feedback_solve_context_parallel(q, k, f, gamma, DK**-0.5, solver, dist.group.WORLD, sizes, starts)
        (s * w).sum().backward()
        mine = {"s": s.detach(), "dq": q.grad, "dk": k.grad, "df": f.grad, "dgamma": gamma.grad}
        every: list = [None] * world
        dist.all_gather_object(every, mine)
        if rank == 0:
            out[str(dtype)] = {name: torch.cat([e[name] for e in every], dim=2) for name in mine}
    if rules:
        from tests.nccl_rules import shutdown

        shutdown()
    dist.destroy_process_group()


@pytest.mark.parametrize(
    ("rules", "docs"), [(None, False), ("pair", False), ("rank", False), (None, True), ("rank", True)]
)
@pytest.mark.parametrize("world", [2, 4])
def test_context_parallel_solve_equals_one_process_in_output_and_every_gradient(world, rules, docs):
    results = mp.Manager().dict()
    port = 29700 + os.getpid() % 150 + world + 2 * (rules is not None) + (rules == "rank") + 8 * docs
    mp.spawn(_worker, args=(world, port, results, rules, docs), nprocs=world, join=True)
    want = _reference(torch.float64, docs)
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-5)):
        got = results[str(dtype)]
        for name, ref in want.items():
            err = ((got[name].double() - ref).abs().max() / ref.abs().max()).item()
            assert err < tol, f"CP={world} {dtype}: {name} off by {err:.1e} (relative to its largest entry)"


def test_triton_kernels_continue_a_solve_like_the_chunked_solve():
    """The entry points a context-parallel rank uses on GPU (Triton interpreter on CPU): the
    forward continued from an earlier prefix, the backward with a push added to G."""
    from sessa_train.ops.feedback_chunked import chunked_backward, chunked_forward
    from sessa_train.ops.feedback_triton import triton_backward, triton_forward

    g = torch.Generator().manual_seed(3)
    N, n = 2, 21
    q, k = torch.randn(N, n, 16, generator=g), torch.randn(N, n, 16, generator=g)
    f, grad = torch.randn(N, n, 16, generator=g), torch.randn(N, n, 16, generator=g)
    gamma = 0.99 * torch.rand(N, n, generator=g)
    prefix = (torch.randn(N, n, generator=g), torch.randn(N, n, 16, generator=g))
    want = chunked_forward(
        q.double(), k.double(), f.double(), gamma.double(), None, 0.25, 16, [p.double() for p in prefix]
    )
    got = triton_forward(q, k, f, gamma, None, 0.25, 16, prefix)
    for name, a, b in zip(("s", "c", "lse"), got, want, strict=True):
        assert (a.double() - b).abs().max() <= 1e-5 * b.abs().max(), name
    s, c, lse = want
    want_grads = chunked_backward(grad.double(), q.double(), k.double(), gamma.double(), None, s, c, lse, 0.25, 16)
    got_grads = triton_backward(grad, q, k, gamma, None, s.float(), c.float(), lse.float(), 0.25, 16)
    for name, a, b in zip(("dq", "dk", "df", "dgamma"), got_grads, want_grads, strict=True):
        assert (a.double() - b).abs().max() <= 1e-5 * b.abs().max(), name
