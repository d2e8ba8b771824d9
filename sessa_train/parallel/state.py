"""Process groups for tensor x pipeline x context x data parallelism, from megatron-core's parallel_state,
and the view of them that DeepSpeed takes (``MegatronMPU``).

Rank order is megatron's default (tp fastest, then cp, dp, pp): with TP=2, PP=2, DP=2 the
tensor groups are {0,1},{2,3},..., the data groups {0,2},{1,3},{4,6},{5,7} and the pipeline
groups {0,4},{1,5},{2,6},{3,7}. Context parallelism (CP) splits each sequence over a group of
ranks (``context_parallel.py``); for gradients and ZeRO they act as data-parallel replicas.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import parallel_state as ps

from sessa_train.errors import ConfigError


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
    can only fail, so here they are pointed at the CPU. Nothing changes on a CUDA build.
    (docs/parallelism.md; used by CPU tests and CPU development runs.)
    """
    if torch.cuda.is_available():
        return
    from megatron.core.pipeline_parallel import schedules

    torch.cuda.current_device = lambda: torch.device("cpu")

    class _TorchOnCpu:
        def __getattr__(self, name: str):
            return getattr(torch, name)

        @staticmethod
        def zeros(*size, device=None, **kwargs):
            return torch.zeros(*size, device="cpu" if device == "cuda" else device, **kwargs)

    schedules.torch = _TorchOnCpu()


def init_model_parallel(tensor: int, pipeline: int, context: int, world_size: int) -> ParallelState:
    """Create megatron-core's groups (torch.distributed must be initialised)."""
    check_sizes(tensor, pipeline, context, world_size)
    megatron_on_cpu()
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(
            tensor_model_parallel_size=tensor, pipeline_model_parallel_size=pipeline, context_parallel_size=context
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
    )


class MegatronMPU:
    """megatron-core's groups in the shape DeepSpeed's ``mpu`` argument expects.

    DeepSpeed reduces gradients and partitions ZeRO state over the data-parallel group (with
    the context-parallel ranks: they hold the same weights and different tokens), sums
    gradient norms over the model-parallel group, and names its per-rank model files by
    ``get_model_parallel_rank()``. That rank is the TP x PP rank here, so every stage writes
    its own file; ``mark_norm_owners`` makes the norm count each distinct gradient once.
    """

    @staticmethod
    def get_data_parallel_rank() -> int:
        return ps.get_data_parallel_rank(with_context_parallel=True)

    @staticmethod
    def get_data_parallel_world_size() -> int:
        return ps.get_data_parallel_world_size(with_context_parallel=True)

    @staticmethod
    def get_data_parallel_group():
        return ps.get_data_parallel_group(with_context_parallel=True)

    get_tensor_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
    get_pipeline_model_parallel_rank = staticmethod(ps.get_pipeline_model_parallel_rank)
    get_pipeline_model_parallel_world_size = staticmethod(ps.get_pipeline_model_parallel_world_size)
    get_pipeline_model_parallel_group = staticmethod(ps.get_pipeline_model_parallel_group)
    get_model_parallel_group = staticmethod(ps.get_model_parallel_group)

    @staticmethod
    def get_model_parallel_rank() -> int:
        return ps.get_model_parallel_group().rank()

    @staticmethod
    def get_model_parallel_world_size() -> int:
        return ps.get_model_parallel_group().size()


def mark_norm_owners(module: torch.nn.Module, tp_split: dict[str, object], state: ParallelState) -> None:
    """DeepSpeed counts a gradient in the global norm on model-parallel rank 0, or on every
    rank when the parameter is marked model-parallel. Parameters that tensor parallelism cuts
    (``tp_split[name]`` not None) are distinct on every rank; replicated ones of a stage are
    distinct from other stages' but repeated over its TP ranks: TP rank 0 owns them."""
    for name, p in module.named_parameters():
        if state.tp_rank == 0 or tp_split[name] is not None:
            p.model_parallel = True
