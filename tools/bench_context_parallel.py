"""Per-rank peak memory and time of the context-parallel feedback solve vs CP size, at fixed T.

    python tools/bench_context_parallel.py                      # T=16384, D=256, CP 1 2 4 (gloo, CPU)
    python tools/bench_context_parallel.py --seq 32768 --cp 1 2 4 8 --json runs/bench_cp.json

Each CP size runs in fresh processes (one per rank, gloo), once for memory and once for time.
A rank holds its T/CP rows of one sequence (one feedback head of width D, float32) and runs
forward + backward of ``feedback_solve_context_parallel`` (CP = 1: the chunked solve). Peak
memory is the rise of the process's peak resident set over its resident set just before the
first forward + backward at full size (after a small warm-up, so library start-up is left out;
inputs are counted). Time is the median of ``--repeat`` runs, per rank. On one CPU machine the
ranks share its cores, so times show the chain's bubble and the communication, not a speed-up;
memory per rank is the figure that carries over to GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _rank(rank: int, world: int, port: int, args, out, timed: bool) -> None:
    import torch.distributed as dist

    from sessa_train.ops import feedback_solve, select_solver
    from sessa_train.parallel.context_parallel import feedback_solve_context_parallel

    torch.set_num_threads(max(1, args.threads // world))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    D = args.dim

    def problem(T: int):
        sizes = tuple(len(x) for x in torch.arange(T).tensor_split(world))
        g = torch.Generator().manual_seed(rank)
        q, k, f, w = (torch.randn(1, 1, sizes[rank], D, generator=g) for _ in range(4))
        gamma = 0.99 * torch.rand(1, 1, sizes[rank], generator=g)
        return sizes, [t.requires_grad_() for t in (q, k, f, gamma)], w

    def step(sizes, leaves, w) -> None:
        solver = select_solver("chunked", "cpu", args.chunk)
        if world == 1:
            s = feedback_solve(*leaves, scale=D**-0.5, solver=solver)
        else:
            s = feedback_solve_context_parallel(*leaves, D**-0.5, solver, dist.group.WORLD, sizes)
        (s * w).sum().backward()
        for t in leaves:
            t.grad = None

    step(*problem(world * args.chunk))  # warm-up on a small problem: library start-up is not counted
    sizes, leaves, w = problem(args.seq)
    dist.barrier()
    if timed:
        times = []
        for _ in range(args.repeat):
            dist.barrier()
            t0 = time.perf_counter()
            step(sizes, leaves, w)
            times.append(time.perf_counter() - t0)
        out[rank] = {"time_s": statistics.median(times)}
    else:
        before = _rss_mib()
        step(sizes, leaves, w)
        out[rank] = {"rows": sizes[rank], "peak_mib": _peak_mib() - before}
    dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=16384, help="sequence length T (fixed over CP sizes)")
    p.add_argument("--dim", type=int, default=256, help="feedback head width D")
    p.add_argument("--chunk", type=int, default=128, help="rows per block of the local solve")
    p.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads shared by the ranks")
    p.add_argument("--json", type=Path, default=Path("runs/bench_context_parallel.json"))
    args = p.parse_args()
    bad = [c for c in args.cp if c < 1 or c > args.seq]
    if bad or args.seq < 2 or args.dim < 1 or args.chunk < 1 or args.repeat < 1:
        p.error(f"need --seq >= 2, --dim/--chunk/--repeat >= 1 and 1 <= --cp <= --seq (got cp {bad or args.cp})")
    rows = []
    for world in args.cp:
        # memory pass: glibc maps every allocation above 64 KiB on its own and returns it on free,
        # so the resident set follows the live tensors (read by the rank processes at start-up);
        # timing pass: the default allocator, which that setting would slow down
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        memory = mp.Manager().dict()
        mp.spawn(_rank, args=(world, _port(), args, memory, False), nprocs=world, join=True)
        del os.environ["MALLOC_MMAP_THRESHOLD_"]
        timing = mp.Manager().dict()
        mp.spawn(_rank, args=(world, _port(), args, timing, True), nprocs=world, join=True)
        ranks = [memory[r] | timing[r] for r in range(world)]
        rows.append(
            {
                "cp": world,
                "rows_per_rank": max(r["rows"] for r in ranks),
                "peak_mib_max": max(r["peak_mib"] for r in ranks),
                "peak_mib_min": min(r["peak_mib"] for r in ranks),
                "time_s_max": max(r["time_s"] for r in ranks),
                "ranks": ranks,
            }
        )
    base = rows[0]["peak_mib_max"]
    print(f"T={args.seq}  D={args.dim}  chunk={args.chunk}  float32, forward + backward, {os.cpu_count()} CPU cores")
    print("| CP | rows/rank | peak MiB per rank (max / min) | vs first | time s (slowest rank) |")
    print("|---|---|---|---|---|")
    for r in rows:
        ratio = r["peak_mib_max"] / base if base > 0 else float("nan")
        print(
            f"| {r['cp']} | {r['rows_per_rank']} | {r['peak_mib_max']:.0f} / {r['peak_mib_min']:.0f} | "
            f"{ratio:.2f} | {r['time_s_max']:.2f} |"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"seq": args.seq, "dim": args.dim, "chunk": args.chunk, "rows": rows}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
