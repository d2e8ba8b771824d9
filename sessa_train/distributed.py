"""Process-group set-up: the same code runs as one process, under torchrun, or under the
DeepSpeed launcher. CPU runs use gloo, GPU runs nccl."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> DistInfo:
    """Initialise torch.distributed through DeepSpeed; single-process runs need no launcher."""
    if "RANK" not in os.environ:  # plain `python -m sessa_train.train`
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"})
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is imported
    import deepspeed
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    backend = "nccl" if cuda else "gloo"
    if not dist.is_initialized() and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # under torchrun the ranks meet in the agent's store, which outlives a restart of the worker
        # group: a restarted rank could read a dead peer's address from the attempt before (and
        # hang). Each attempt meets under its own prefix.
        from datetime import timedelta

        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
        agent = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, False,
                              timeout=timedelta(minutes=30))  # fmt: skip
        store = dist.PrefixStore(f"sessa-train/attempt-{attempt}", agent)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timedelta(minutes=30))
    import contextlib
    import io

    said = io.StringIO()  # DeepSpeed prints that its CPU communication op was built, at every start
    with contextlib.redirect_stdout(said):
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)  # on our group if there is one
    for line in said.getvalue().splitlines():
        if line.strip() and "built successfully" not in line:
            print(line)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def shutdown() -> None:
    """Leave the process group (if any): the ranks' communication threads end before the
    interpreter does, so a process that stops on an error exits with its own status."""
    import sys

    if "torch.distributed" not in sys.modules:
        return
    import gc

    import torch.distributed as dist

    if "megatron.core.parallel_state" in sys.modules:  # its globals hold every group it made
        sys.modules["megatron.core.parallel_state"].destroy_model_parallel()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    # the groups' C++ objects (their worker threads) go now, while the interpreter is whole, not
    # in its teardown, where a thread still holding a tensor can abort the process
    gc.collect()


def side_group():
    """Collective: a new gloo group of all ranks, for a thread's own collectives beside the
    training's (a background checkpoint save): its tensors live on the CPU whatever the run's
    device, and its order of operations is that thread's alone."""
    import torch.distributed as dist

    return dist.new_group(backend="gloo")


# -- the one rule for collectives ----------------------------------------------------------
# Every tensor handed to a collective or point-to-point call lives on its group's communication
# device: the current CUDA device for NCCL, the CPU for gloo. NCCL refuses CPU tensors ("No
# backend type associated with device type cpu"), so the package calls torch.distributed only
# through the functions below: those that reduce values create their tensors on that device,
# those that take tensors check them. Point-to-point calls do not rely on tags (NCCL ignores
# them) and are posted as batches that progress together (``exchange``).


def _labelled():
    """The profiler's label of every collective and point-to-point call (trainer/profiling.py)."""
    return torch.profiler.record_function("sessa.communication")


def comm_device(group=None) -> torch.device:
    """The device collectives on ``group`` take their tensors on."""
    import torch.distributed as dist

    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _check(tensors, group) -> None:
    device = comm_device(group)
    for t in tensors:
        if t.device != device:
            raise RuntimeError(f"a collective on a {device.type} group was handed a tensor on {t.device}")


def all_reduce(tensor: torch.Tensor, group=None, op=None) -> torch.Tensor:
    """In place over ``group`` (sum unless ``op``); ``tensor`` must be on ``comm_device(group)``."""
    import torch.distributed as dist

    _check([tensor], group)
    with _labelled():
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM, group=group)
    return tensor


def sum_values(values, group=None) -> torch.Tensor:
    """Sum of a sequence of numbers (or a float64 tensor, on any device) over ``group``, as a
    float64 tensor on ``comm_device(group)``."""
    t = torch.as_tensor(values, dtype=torch.float64).to(comm_device(group))
    return all_reduce(t, group)


def broadcast(tensor: torch.Tensor, src: int, group=None) -> torch.Tensor:
    """In place from global rank ``src``; ``tensor`` must be on ``comm_device(group)``."""
    import torch.distributed as dist

    _check([tensor], group)
    with _labelled():
        dist.broadcast(tensor, src=src, group=group)
    return tensor


def size(group=None) -> int:
    """The number of ranks in ``group`` (None: the world)."""
    import torch.distributed as dist

    return dist.get_world_size(group)


def rank() -> int:
    """This process's global rank."""
    import torch.distributed as dist

    return dist.get_rank()


def global_rank(group, rank: int) -> int:
    """The global rank of ``group``'s rank ``rank`` (None: the world)."""
    import torch.distributed as dist

    return rank if group is None else dist.get_global_rank(group, rank)


def reduce(tensor: torch.Tensor, dst: int, group=None) -> torch.Tensor:
    """In place, the sum over ``group`` arriving at global rank ``dst`` only (the others' ``tensor``
    is left undefined); ``tensor`` must be on ``comm_device(group)``."""
    import torch.distributed as dist

    _check([tensor], group)
    with _labelled():
        dist.reduce(tensor, dst=dst, op=dist.ReduceOp.SUM, group=group)
    return tensor


def gather(tensor: torch.Tensor, dst: int, group=None) -> list[torch.Tensor] | None:
    """Every rank's ``tensor`` (same shape) in group-rank order at global rank ``dst``; None elsewhere."""
    import torch.distributed as dist

    _check([tensor], group)
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))] if rank() == dst else None
    with _labelled():
        dist.gather(tensor.contiguous(), parts, dst=dst, group=group)
    return parts


def all_gather(tensor: torch.Tensor, group=None) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (same shape), in group-rank order."""
    import torch.distributed as dist

    _check([tensor], group)
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    with _labelled():
        dist.all_gather(parts, tensor.contiguous(), group=group)
    return parts


def all_gather_objects(obj, group=None) -> list:
    """Every rank's picklable ``obj`` (torch stages it on the group's device itself)."""
    import torch.distributed as dist

    out: list = [None] * dist.get_world_size(group)
    with _labelled():
        dist.all_gather_object(out, obj, group=group)
    return out


def first_problem(problem: str | None, group=None) -> str | None:
    """Collective: the first (in rank order) of the ranks' problems, None if no rank has one. The
    pattern for errors every rank must raise alike: rank 0 (or any) finds it, all raise it."""
    return next((p for p in all_gather_objects(problem, group) if p), None)


def raise_first(problem: str | None, error: type[Exception], group=None) -> None:
    """Collective: ``error`` of the first of the ranks' problems, raised alike on every rank; nothing
    if no rank has one (``first_problem``)."""
    if problem := first_problem(problem, group):
        raise error(problem)


def barrier(group=None) -> None:
    import torch.distributed as dist

    with _labelled():
        dist.barrier(group=group)


def exchange(ops: list[tuple[str, torch.Tensor, int]], group) -> None:
    """One batch of point-to-point operations, ("send" | "recv", tensor, peer's rank in
    ``group``), that progress together (NCCL: one group call), then waits for all of them. Peers
    must post their matching operations in the same batch order; tags are not used."""
    import torch.distributed as dist

    _check([t for _, t, _ in ops], group)
    p2p = [
        dist.P2POp(dist.isend if kind == "send" else dist.irecv, t.contiguous() if kind == "send" else t,
                   dist.get_global_rank(group, peer), group)
        for kind, t, peer in ops
    ]  # fmt: skip
    with _labelled():
        for work in dist.batch_isend_irecv(p2p):
            work.wait()
