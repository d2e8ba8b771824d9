"""Where a rank sits in the job: tensor x pipeline x context x data parallelism (``ParallelState``),
from megatron-core's parallel_state when any model-parallel size is > 1, and the view of those
groups that DeepSpeed takes (``MegatronMPU``).

A plain run (every rank holds the whole model) is the state of sizes 1 with data parallelism over
the world: the trainer, checkpoints and the gradient norm read one kind of state either way, and
megatron-core is imported only when a model-parallel size is > 1.

Rank order is megatron's default (tp fastest, then cp, dp, pp): with TP=2, PP=2, DP=2 the
tensor groups are {0,1},{2,3},..., the data groups {0,2},{1,3},{4,6},{5,7} and the pipeline
groups {0,4},{1,5},{2,6},{3,7}. Context parallelism (CP) splits each sequence over a group of
ranks (``context_parallel.py``); for gradients and ZeRO they act as data-parallel replicas.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sessa_train.errors import ConfigError
from sessa_train.models.plan import Split

# megatron-core releases whose CUDA-only pieces ``megatron_on_cpu`` was written for
MEGATRON_ON_CPU = ("0.16",)


@dataclass(frozen=True)
class ParallelState:
    tp: int
    pp: int
    dp: int  # replicas that read different data (CP ranks of a group read the same sequences)
    tp_rank: int
    pp_rank: int
    dp_rank: int
    cp: int = 1
    cp_rank: int = 0
    sequence_parallel: bool = False  # TP > 1 and parallel.sequence_parallel: the residual stream split over TP
    vp: int = 1  # model chunks per pipeline stage (interleaved stages)

    @classmethod
    def plain(cls, world_size: int, rank: int) -> ParallelState:
        """Every rank holds the whole model: data parallelism only."""
        return cls(tp=1, pp=1, dp=world_size, tp_rank=0, pp_rank=0, dp_rank=rank)

    @property
    def model_parallel(self) -> int:
        """Ranks that hold parts of one model (TP x PP x CP)."""
        return self.tp * self.pp * self.cp

    @property
    def data_rank_of_record(self) -> bool:
        """The first rank of its TP x PP x CP group: it speaks for the data that group reads."""
        return (self.tp_rank, self.pp_rank, self.cp_rank) == (0, 0, 0)

    def owns(self, split: Split | None) -> bool:
        """Whether this rank counts a parameter cut as ``split`` (None: replicated over the tensor
        ranks) once in a sum over the model-parallel group: cut ones on every tensor rank, replicated
        ones on tensor rank 0 (gradient norm, checkpoint writers)."""
        return split is not None or self.tp_rank == 0

    def replica_group(self):
        """The ranks that hold the same parameters (data x context-parallel replicas); None: the world."""
        if self.model_parallel == 1:
            return None
        from megatron.core import parallel_state as ps

        return ps.get_data_parallel_group(with_context_parallel=True)

    def step_weight(self, micro_batches: list[dict]) -> float:
        """What this rank multiplies its micro-batches' loss sums by so that averaging gradients
        over the replicas (DP x CP) gives the gradient of the step's mean loss over every scored
        token of the global batch, whatever the layout: DP x CP / G, G the step's scored tokens
        over the job. Without a loss mask every rank holds the same count and G needs no
        collective; with one, a sum over the replica group (each sequence counted by its CP ranks)."""
        from sessa_train import distributed as comm

        masks = [b.get("loss_mask") for b in micro_batches]
        local = sum(
            b["tokens"][:, 1:].numel() if m is None else int(m.sum()) for b, m in zip(micro_batches, masks, strict=True)
        )
        replicas = self.dp * self.cp
        if all(m is None for m in masks) or replicas == 1:
            total = local * replicas / self.cp
        else:
            total = comm.sum_values([local], self.replica_group()).item() / self.cp
        return replicas / max(total, 1.0)

    def model_parallel_group(self):
        """The ranks that hold the parts of one model (None for a plain run: this rank alone)."""
        if self.model_parallel == 1:
            return None
        from megatron.core import parallel_state as ps

        return ps.get_model_parallel_group()


def check_sizes(tensor: int, pipeline: int, context: int, world_size: int) -> None:
    """One-line errors for parallel sizes that cannot tile ``world_size`` ranks."""
    if world_size % (tensor * pipeline * context):
        raise ConfigError(
            f"parallel.tensor={tensor} x parallel.pipeline={pipeline} x parallel.context={context} "
            f"does not divide the {world_size} ranks of this job"
        )


def megatron_on_cpu() -> None:
    """Let megatron-core's pipeline schedule and TP mappings run on a CPU build of torch.

    megatron-core 0.16 hard-codes CUDA in the pieces we use: p2p receive buffers and the
    last-dim gather allocate on ``torch.cuda.current_device()``, and the schedules keep a
    token counter ``torch.zeros([], device="cuda")``. On a build without CUDA those calls
    can only fail, so here they are pointed at the CPU. Nothing changes on a CUDA build, and the
    patches are applied only to the releases they were written for (``MEGATRON_ON_CPU``).
    (docs/parallelism.md; used by CPU tests and CPU development runs.)
    """
    if torch.cuda.is_available():
        return
    import megatron.core
    from megatron.core.pipeline_parallel import schedules

    version = megatron.core.__version__
    if not version.startswith(MEGATRON_ON_CPU):
        raise ConfigError(
            f"tensor/pipeline/context parallelism on CPU patches megatron-core {', '.join(MEGATRON_ON_CPU)}.x, "
            f"found {version}: install megatron-core=={MEGATRON_ON_CPU[-1]}.* or run on GPUs"
        )
    torch.cuda.current_device = lambda: torch.device("cpu")

    class _TorchOnCpu:
        def __getattr__(self, name: str):
            return getattr(torch, name)

        @staticmethod
        def zeros(*size, device=None, **kwargs):
            return torch.zeros(*size, device="cpu" if device == "cuda" else device, **kwargs)

    schedules.torch = _TorchOnCpu()


def init_parallel(
    tensor: int,
    pipeline: int,
    context: int,
    world_size: int,
    rank: int,
    sequence_parallel: bool = False,
    virtual_stages: int = 1,
) -> ParallelState:
    """This rank's state (torch.distributed must be initialised); megatron-core's groups are
    created when any model-parallel size is > 1. ``sequence_parallel`` applies only when tensor > 1;
    ``virtual_stages`` model chunks per pipeline stage."""
    check_sizes(tensor, pipeline, context, world_size)
    if tensor * pipeline * context == 1:
        return ParallelState.plain(world_size, rank)
    from megatron.core import parallel_state as ps

    megatron_on_cpu()
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(
            tensor_model_parallel_size=tensor,
            pipeline_model_parallel_size=pipeline,
            context_parallel_size=context,
            virtual_pipeline_model_parallel_size=virtual_stages if virtual_stages > 1 else None,
        )
    return ParallelState(
        tp=tensor,
        pp=pipeline,
        dp=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        cp=context,
        cp_rank=ps.get_context_parallel_rank(),
        sequence_parallel=sequence_parallel and tensor > 1,
        vp=virtual_stages,
    )


class MegatronMPU:
    """megatron-core's groups in the shape DeepSpeed's ``mpu`` argument expects.

    DeepSpeed reduces gradients and partitions ZeRO state over the data-parallel group (with
    the context-parallel ranks: they hold the same weights and different tokens), sums
    gradient norms over the model-parallel group, and names its per-rank model files by
    ``get_model_parallel_rank()``. That rank is the TP x PP rank here, so every stage writes
    its own file; ``mark_norm_owners`` makes the norm count each distinct gradient once.
    """

    def __init__(self) -> None:
        from megatron.core import parallel_state as ps

        self.ps = ps

    def get_data_parallel_rank(self) -> int:
        return self.ps.get_data_parallel_rank(with_context_parallel=True)

    def get_data_parallel_world_size(self) -> int:
        return self.ps.get_data_parallel_world_size(with_context_parallel=True)

    def get_data_parallel_group(self):
        return self.ps.get_data_parallel_group(with_context_parallel=True)

    def __getattr__(self, name: str):
        """get_{tensor,pipeline}_model_parallel_{rank,world_size,group}, get_model_parallel_group:
        megatron-core's own."""
        if name.startswith(("get_tensor_model_parallel_", "get_pipeline_model_parallel_")) or name == (
            "get_model_parallel_group"
        ):
            return getattr(self.ps, name)
        raise AttributeError(name)

    def get_model_parallel_rank(self) -> int:
        return self.ps.get_model_parallel_group().rank()

    def get_model_parallel_world_size(self) -> int:
        return self.ps.get_model_parallel_group().size()


def mark_norm_owners(module: torch.nn.Module, splits: dict[str, Split | None], state: ParallelState) -> None:
    """DeepSpeed counts a gradient in the global norm on model-parallel rank 0, or on every rank
    when the parameter is marked model-parallel: mark the ones this rank ``owns``."""
    for name, p in module.named_parameters():
        if state.owns(splits[name]):
            p.model_parallel = True
