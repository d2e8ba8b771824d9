"""``sessa-plan`` (``cli.plan_main``): per-rank memory and a throughput model of a config under a parallel layout.

    sessa-plan --config configs/1.3b.yaml --seq-len 2048 --gpu H100 --nodes 2 --gpus-per-node 8 \\
        parallel.tensor=2 compute.recompute=selective

Memory of the busiest rank (the first pipeline stage), in bytes:
    weights        P x (2 bf16 | 4 fp32)                       / DP under ZeRO-3
    gradients      P x (2 bf16 | 4 fp32)                       / DP under ZeRO-2/3
    optimizer      P x (8 AdamW moments + 4 fp32 master under bf16 or ZeRO) / DP under ZeRO-1/2/3
    checkpoint     host memory, not the GPU's: a save gathers this rank's share of whole fp32
                   weights and moments on the host before writing: P x 12 / (DP x CP)
    activations    what autograd keeps for the backward per micro-batch (measured off the one model
                   definition: saved tensors of a forward at small T, scaled linearly in T), x the
                   micro-batches in flight (1, or PP under 1F1B), / (TP x CP); full recomputation
                   keeps each layer's input
    backward       the larger transient of the backward: the fp32 gradient of the logits twice,
                   or one layer's activation gradients (twice its activations when recomputed)
    solve strips   the feedback solve's largest transient during one layer's backward, from the
                   backend's record (``ops.feedback.BACKENDS``: O(block x T) strips, or T x T)
    buffers        DeepSpeed's ZeRO-1/2 reduce and all-gather buckets, ZeRO-3 prefetch
P counts the parameters of the largest pipeline stage held by one tensor-parallel rank, read off
the model built on the meta device. Not modelled: allocator fragmentation and caching, the CUDA
context and NCCL's own buffers (``--runtime-gib``, 1 GiB by default on a GPU), TP's replicated
activations (the layer input and norms are divided by TP here as if sequence-parallel), and
temporary copies inside DeepSpeed's step.

Time per step: model FLOPs (``flops.py``; + one forward under full recomputation) at
``--efficiency`` of the GPU's peak, the 1F1B bubble (PP - 1) / (micro-batches + PP - 1), and the
data-parallel gradient all-reduce and TP's per-layer all-reduces at NVLink / network bandwidth
assumed not overlapped with compute (an upper bound on their cost).
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

import torch

from sessa_train.config import ComputeConfig, ModelConfig, TrainConfig
from sessa_train.errors import SessaError
from sessa_train.flops import forward_flops_per_token
from sessa_train.hardware import GPU, GPUS, GiB
from sessa_train.models import ModelPlan, SessaLM, SessaMixer
from sessa_train.ops.feedback import resolve_backend
from sessa_train.parallel.layout import stage_splits

NVLINK = 450e9  # bytes/s per GPU within a node (H100 SXM NVLink, one direction)
NETWORK = 50e9  # bytes/s per GPU between nodes (400 Gb/s InfiniBand per GPU)
ZERO_BUCKET = 5e8  # elements: DeepSpeed's default reduce / all-gather bucket (ZeRO-1/2)
ZERO3_PREFETCH = 5e7  # elements: DeepSpeed's default ZeRO-3 prefetch bucket


@dataclass(frozen=True)
class Job:
    model: ModelConfig
    compute: ComputeConfig
    seq_len: int
    micro_batch: int
    global_batch: int
    tensor: int = 1
    pipeline: int = 1
    context: int = 1
    data: int = 1
    zero: int = 0
    bf16: bool = True

    @classmethod
    def of(cls, cfg: TrainConfig, seq_len: int, world: int, bf16: bool) -> Job:
        par = cfg.parallel
        model_parallel = par.tensor * par.pipeline * par.context
        if world % model_parallel:
            raise SessaError(f"{world} GPUs do not split into tensor x pipeline x context = {model_parallel}")
        return cls(
            cfg.model, cfg.compute, seq_len, cfg.data.micro_batch_size, cfg.schedule.global_batch_size,
            par.tensor, par.pipeline, par.context, world // model_parallel, par.zero_stage, bf16,
        )  # fmt: skip

    @property
    def micro_batches(self) -> int:
        return self.global_batch // (self.micro_batch * self.data)


def stage_parameters(cfg: ModelConfig, tensor: int, pipeline: int) -> int:
    """Parameters one tensor-parallel rank of the largest pipeline stage holds."""
    return max(
        sum(math.prod(shape) // (tensor if split is not None else 1) for shape, split in _stage(cfg, pipeline, s))
        for s in range(pipeline)
    )


def _stage(cfg: ModelConfig, stages: int, stage: int) -> list[tuple[tuple[int, ...], object]]:
    splits = stage_splits(cfg, stages, stage)
    with torch.device("meta"):
        model = SessaLM(cfg, ModelPlan(stages=stages, stage=stage))
    return [(tuple(p.shape), splits[name]) for name, p in model.named_parameters()]


@functools.lru_cache(maxsize=32)
def saved_bytes(cfg: ModelConfig, seq_len: int, dtype: torch.dtype, recompute: str) -> int:
    """Bytes autograd keeps for the backward after a forward of one sequence (batch 1) of
    ``seq_len`` tokens through the whole model with the loss, each storage counted once."""
    with torch.device("meta"):  # shapes only: no initialisation (the values play no part in the count)
        model = SessaLM(cfg, ModelPlan(ComputeConfig(recompute=recompute)))
    model = model.to(dtype).to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.01)  # finite values for the forward
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, cfg.vocab_size, (1, seq_len + 1))
    quiet = logging.getLogger("transformers")  # a baseline's kernels on this CPU are not the job's: no warnings
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(ids[:, :-1], targets=ids[:, 1:]).mean()
    finally:
        quiet.setLevel(level)
    del loss
    return sum(kept.values())


@functools.lru_cache(maxsize=32)
def _solves(cfg: ModelConfig) -> bool:
    """Whether the model's layers solve the feedback system (the baselines do not)."""
    with torch.device("meta"):
        return any(isinstance(m, SessaMixer) for m in SessaLM(replace_layers(cfg, 1)).modules())


def activation_bytes(job: Job) -> tuple[float, float, float]:
    """Per micro-batch and rank: (kept by a stage's layers, kept by the embedding and the head
    with the loss, one layer's activations)."""
    cfg, dtype = job.model, torch.bfloat16 if job.bf16 else torch.float32
    small = replace_layers(cfg, 1), replace_layers(cfg, 2)
    t0 = 256  # linear in T (no T x T tensor is kept): per token from T = 256 and 512 (whole SSD chunks)
    per_token = [(saved_bytes(c, 2 * t0, dtype, "none") - saved_bytes(c, t0, dtype, "none")) / t0 for c in small]
    layer, rest = per_token[1] - per_token[0], 2 * per_token[0] - per_token[1]  # per layer; embedding + head
    tokens = job.micro_batch * job.seq_len / job.context
    layers = math.ceil(cfg.n_layers / job.pipeline)
    elt = dtype.itemsize
    if job.compute.recompute == "full":
        kept = layers * tokens * cfg.d_model * elt  # each layer's input
    else:
        kept = layers * layer * tokens
        if job.compute.recompute == "selective":  # the attention core keeps its output and log-sum-exp
            kept -= layers * tokens * cfg.d_model * elt
    return kept / job.tensor, rest * tokens / job.tensor, layer * tokens / job.tensor


def replace_layers(cfg: ModelConfig, n: int) -> ModelConfig:
    return ModelConfig.from_dict(cfg.to_dict() | {"n_layers": n})


def state_bytes(job: Job) -> dict[str, float]:
    """Bytes per rank of the training state alone (weights, gradients, AdamW): what a model
    needs before any activation, read off the model built on the meta device (nothing allocated)."""
    P = stage_parameters(job.model, job.tensor, job.pipeline)
    low = 2 if job.bf16 else 4
    dp = job.data * job.context  # ZeRO partitions over the data x context-parallel replicas
    return {
        "weights": P * low / (dp if job.zero == 3 else 1),
        "gradients": P * low / (dp if job.zero >= 2 else 1),
        # DeepSpeed's ZeRO optimizer keeps an fp32 copy of its partition even when training in fp32
        "optimizer": P * (8 + 4 * (job.bf16 or job.zero >= 1)) / (dp if job.zero >= 1 else 1),
    }


def memory(job: Job) -> dict[str, float]:
    """Bytes per rank, by item (the busiest rank: the first pipeline stage)."""
    P = stage_parameters(job.model, job.tensor, job.pipeline)
    low = 2 if job.bf16 else 4
    dp = job.data * job.context  # ZeRO partitions over the data x context-parallel replicas
    in_flight = min(job.pipeline, job.micro_batches)  # 1F1B: the first stage holds PP micro-batches
    layers, ends, layer = activation_bytes(job)
    logits = job.micro_batch * job.seq_len / job.context * job.model.vocab_size * 4 / job.tensor
    solve = resolve_backend(job.compute.feedback_backend, "cuda")  # the backend a GPU job runs
    heads, width = job.model.feedback_heads, job.model.d_model // job.model.feedback_heads
    block = job.compute.feedback_chunk_size or (solve.default_block(job.seq_len, width) if solve.blockwise else 0)
    strips = (
        solve.strip_bytes(job.micro_batch * heads, job.seq_len, block, 2 if job.bf16 else 4)
        if _solves(job.model)
        else 0
    )
    buffers = {0: 0, 1: 2 * min(ZERO_BUCKET, P) * low, 2: 2 * min(ZERO_BUCKET, P) * low, 3: ZERO3_PREFETCH * low}
    return {
        **state_bytes(job),
        # the first stage's layers and the last stage's logits taken together: exact without
        # pipeline parallelism, an upper bound with it
        "activations": layers * in_flight + ends,
        # the backward's transient: the loss's fp32 gradient of the logits (and the log-softmax's),
        # or one layer's activation gradients (and, recomputed, its activations)
        "backward working set": max(2 * logits, layer * (2 if job.compute.recompute == "full" else 1)),
        "solve strips": strips,
        "buffers": buffers[job.zero],
        "checkpoint staging": P * 12 / dp,
    }


def step_time(job: Job, gpu, gpus_per_node: int, efficiency: float) -> dict[str, float]:
    """Seconds per optimizer step by part, and tokens/s and MFU."""
    tokens = job.global_batch * job.seq_len
    model_flops = 3 * forward_flops_per_token(job.model, job.seq_len) * tokens
    extra = {"full": 1 / 3, "selective": 0.0, "none": 0.0}[job.compute.recompute]
    gpus = job.tensor * job.pipeline * job.context * job.data
    peak = gpu.peak("bf16" if job.bf16 else "fp32")
    compute = model_flops * (1 + extra) / (gpus * peak * efficiency)
    m = job.micro_batches
    bubble = compute * (job.pipeline - 1) / (m + job.pipeline - 1) if job.pipeline > 1 else 0.0
    P = stage_parameters(job.model, job.tensor, job.pipeline)
    dp = job.data * job.context
    across_nodes = job.tensor * job.pipeline * job.context * job.data > gpus_per_node
    bw = NETWORK if across_nodes else NVLINK
    grad_sync = 2 * (dp - 1) / dp * P * (2 if job.bf16 else 4) / bw if dp > 1 else 0.0
    layers = math.ceil(job.model.n_layers / job.pipeline)
    tp_bytes = 4 * layers * m * job.micro_batch * job.seq_len / job.context * job.model.d_model * 2
    tp = 2 * (job.tensor - 1) / job.tensor * tp_bytes / NVLINK if job.tensor > 1 else 0.0
    total = compute + bubble + grad_sync + tp
    return {
        "compute": compute,
        "pipeline bubble": bubble,
        "gradient all-reduce": grad_sync,
        "tensor all-reduces": tp,
        "total": total,
        "tokens/s": tokens / total,
        "mfu": model_flops / (total * gpus * peak),
    }


@dataclass(frozen=True)
class Plan:
    """What ``sessa-plan`` reports of a job on a GPU: per-rank ``memory`` items and the host bytes
    a rank stages while saving (bytes), ``step`` time items (s, with ``tokens/s`` and ``mfu``)."""

    job: Job
    gpu: GPU
    memory: dict[str, float]
    host_bytes: float
    step: dict[str, float]

    @property
    def total(self) -> float:
        return sum(self.memory.values())

    def problem(self) -> str | None:
        """Why the job does not fit on its GPU, or None."""
        if self.total <= self.gpu.memory:
            return None
        largest = max(self.memory, key=self.memory.get)
        return (
            f"does not fit: {self.total / GiB:.1f} GiB per rank > {self.gpu.memory / GiB:.1f} GiB on {self.gpu.name}; "
            f"the largest item is {largest} ({self.memory[largest] / GiB:.1f} GiB)"
        )


def plan(
    cfg: TrainConfig, seq_len: int, *, gpu: str = "H100", nodes: int = 1, gpus_per_node: int = 8,
    efficiency: float = 0.5, runtime_gib: float = 1.0, bf16: bool = True,
) -> Plan:  # fmt: skip
    """The plan of ``cfg`` at ``seq_len`` tokens on ``nodes`` x ``gpus_per_node`` GPUs of kind
    ``gpu`` whose matmuls reach ``efficiency`` of peak, ``runtime_gib`` per rank for the CUDA
    context, NCCL and allocator slack (``cli.plan_main`` prints it)."""
    job = Job.of(cfg, seq_len, nodes * gpus_per_node, bf16)
    mem = memory(job) | {"runtime (not modelled)": runtime_gib * GiB}
    host = mem.pop("checkpoint staging")
    return Plan(job, GPUS[gpu], mem, host, step_time(job, GPUS[gpu], gpus_per_node, efficiency))
