"""What one tensor-parallel rank keeps for the backward and what it sends, with and without
sequence parallelism, measured on megatron-core's layers and set beside ``sessa-plan``'s model.

    python tools/bench_sequence_parallel.py                                  # 125m, seq 2048, TP 2
    python tools/bench_sequence_parallel.py --config configs/tiny.yaml --seq 256 --tensor 4 --json runs/sp.json

``--tensor`` processes (gloo, CPU, fp32) build their part of the preset's model exactly as the
trainer does (``parallel.plan.build_model``: ``MegatronPlan`` on megatron-core's
Column/RowParallelLinear and VocabParallelEmbedding) and run one forward with the loss and its
backward on batch 1 of ``--seq`` random tokens, for ``parallel.sequence_parallel`` false and true.
Per rank it counts the bytes autograd keeps (saved-tensor hooks, each storage once, weights
excluded: the planner's "activations" item at batch 1) and the elements of every tensor-parallel
collective megatron-core runs (all-reduce, all-gather, reduce-scatter; forward and backward).
Beside them: ``sessa_train.sizing`` for the same job: its per-rank activations (extrapolated
from 1- and 2-layer models at 256 and 512 tokens) and the collectives its one-process simulation
of the rank counts (``rank_pass``). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _count_collectives(counts: Counter, phase: list[str]) -> None:
    """Count the elements of megatron-core's tensor-parallel collectives by (phase, kind)."""
    import torch.distributed as dist
    from megatron.core.tensor_parallel import layers, mappings

    def counted(kind: str, real, size):
        def call(*args, **kwargs):
            counts[(phase[0], kind)] += size(*args)
            return real(*args, **kwargs)

        return call

    all_reduce = dist.all_reduce
    dist.all_reduce = counted("all-reduce", all_reduce, lambda t, *a: t.numel())
    for module in (mappings, layers):
        module.dist_all_gather_func = counted("all-gather", module.dist_all_gather_func, lambda out, *a: out.numel())
        module.dist_reduce_scatter_func = counted(
            "reduce-scatter", module.dist_reduce_scatter_func, lambda out, inp, *a: inp.numel()
        )


def _worker(rank: int, world: int, port: int, config: str, seq: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from sessa_train.config import ComputeConfig, load_config
    from sessa_train.parallel.plan import build_model
    from sessa_train.parallel.state import init_parallel

    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = load_config([config]).model
    counts: Counter = Counter()
    phase = ["forward"]
    _count_collectives(counts, phase)
    ids = torch.randint(0, cfg.vocab_size, (1, seq + 1), generator=torch.Generator().manual_seed(1))
    results = {}
    for sequence_parallel in (False, True):
        state = init_parallel(world, 1, 1, world, rank, sequence_parallel)
        model = build_model(cfg, ComputeConfig(feedback_backend="chunked"), state, 0, torch.device("cpu"))
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        kept: dict[int, int] = {}

        def pack(t: torch.Tensor, params: set = params, kept: dict = kept) -> torch.Tensor:
            if (ptr := t.untyped_storage().data_ptr()) not in params:
                kept[ptr] = t.untyped_storage().nbytes()
            return t

        counts.clear()
        phase[0] = "forward"
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(ids[:, :-1], targets=ids[:, 1:]).mean()
        phase[0] = "backward"
        loss.backward()
        results[str(sequence_parallel)] = {
            "saved_bytes": sum(kept.values()),
            "traffic": {f"{d} {k}": n for (d, k), n in sorted(counts.items())},
        }
        ps.destroy_model_parallel()
    every: list = [None] * world
    dist.all_gather_object(every, results)
    if rank == 0:
        out.update({str(r): every[r] for r in range(world)})
    dist.destroy_process_group()


def measure(config: Path, seq: int, tensor: int) -> dict:
    """Per rank and setting of sequence parallelism ("False", "True"): saved bytes and traffic."""
    import torch.multiprocessing as mp

    from sessa_train.parallel.state import megatron_on_cpu

    megatron_on_cpu()
    results = mp.Manager().dict()
    port = 29600 + os.getpid() % 300
    mp.spawn(_worker, args=(tensor, port, str(config), seq, results), nprocs=tensor, join=True)
    return dict(results)


def planned(config: Path, seq: int, tensor: int, sequence_parallel: bool) -> dict:
    """What sessa_train.sizing says of the same rank and pass (fp32, batch 1)."""
    import torch

    from sessa_train.config import ComputeConfig, load_config
    from sessa_train.sizing import Job, activation_bytes, rank_pass

    cfg = load_config([config]).model
    job = Job(cfg, ComputeConfig(), seq, 1, 1, tensor=tensor, bf16=False, sequence_parallel=sequence_parallel)
    layers, ends, _ = activation_bytes(job)
    traffic = rank_pass(cfg, seq, torch.float32, tensor, sequence_parallel)[1]
    return {"activations": layers + ends, "traffic": {f"{d} {k}": n for (d, k), n in sorted(traffic.items())}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=REPO / "configs" / "125m.yaml")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--tensor", type=int, default=2)
    p.add_argument("--json", type=Path, default=Path("runs/bench_sequence_parallel.json"))
    args = p.parse_args()
    measured = measure(args.config, args.seq, args.tensor)
    plans = {str(sp): planned(args.config, args.seq, args.tensor, sp) for sp in (False, True)}
    print(f"{args.config.name}, seq {args.seq}, batch 1, TP {args.tensor}, fp32, CPU (gloo)")
    print("| SP | rank | kept MiB | sessa-plan MiB | plan / measured | collectives, M elements | plan's |")
    print("|---|---|---|---|---|---|---|")
    for sp in ("False", "True"):
        for rank, r in measured.items():
            got, plan = r[sp]["saved_bytes"], plans[sp]["activations"]
            moved, plan_moved = sum(r[sp]["traffic"].values()), sum(plans[sp]["traffic"].values())
            print(f"| {sp.lower()} | {rank} | {got / 2**20:.2f} | {plan / 2**20:.2f} | {plan / got:.3f} | "
                  f"{moved / 1e6:.2f} | {plan_moved / 1e6:.2f} |")  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    about = {"config": str(args.config), "seq": args.seq, "tensor": args.tensor}
    args.json.write_text(json.dumps(about | {"measured": measured, "planned": plans}, indent=1))


if __name__ == "__main__":
    main()
