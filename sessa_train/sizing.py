"""``sessa-plan`` (``cli.plan_main``): per-rank memory and a throughput model of a config under a parallel layout.

    sessa-plan --config configs/1.3b.yaml --seq-len 2048 --gpu H100 --nodes 2 --gpus-per-node 8 \\
        parallel.tensor=2 compute.recompute=selective

Memory of the busiest rank (the first pipeline stage), in bytes:
    weights        P x (2 bf16 | 4 fp32)                       / DP under ZeRO-3
    gradients      P x (2 bf16 | 4 fp32)                       / DP under ZeRO-2/3
    optimizer      P x (8 AdamW moments + 4 fp32 master under bf16 or ZeRO) / DP under ZeRO-1/2/3
    checkpoint     host memory, not the GPU's: a save gathers this rank's share of whole fp32
                   weights and moments on the host before writing: P x 12 / (DP x CP)
    activations    what autograd keeps for the backward per micro-batch on one tensor-parallel
                   rank (measured off the one model definition built with that rank's shapes,
                   ``rank_pass``: saved tensors of a forward at small T, scaled linearly in T), x
                   the micro-batches in flight (1, or PP under 1F1B, PP + (PP - 1) / v
                   interleaved over v virtual stages), / CP; full recomputation
                   keeps each layer's input (T / TP rows of it under sequence parallelism)
    backward       the larger transient of the backward: the fp32 gradient of the logits twice,
                   or one layer's activation gradients (twice its activations when recomputed)
    solve strips   the feedback solve's largest transient during one layer's backward, from the
                   backend's record (``ops.feedback.BACKENDS``: O(block x T) strips, or T x T)
    buffers        DeepSpeed's ZeRO-1/2 reduce and all-gather buckets (4.5 x a bucket with
                   overlap_comm), ZeRO-3 prefetch and reduce buckets (``parallel.bucket_size``)
P counts the parameters of the largest pipeline stage held by one tensor-parallel rank, read off
the model built on the meta device. Not modelled: allocator fragmentation and caching, the CUDA
context and NCCL's own buffers (``--runtime-gib``, 1 GiB by default on a GPU), and temporary
copies inside DeepSpeed's step.

Time per step: model FLOPs (``flops.py``; + one forward under full recomputation) at
``--efficiency`` of the GPU's peak, the 1F1B bubble (PP - 1) / (micro-batches + PP - 1) (with
v interleaved virtual stages (PP - 1) / v in place of PP - 1), and the
data-parallel gradient reduction (with ``parallel.overlap_comm`` under data parallelism alone,
only what the last micro-batch's backward cannot hide) and the tensor-parallel collectives (all-reduce, all-gather,
reduce-scatter, counted by ``rank_pass`` where megatron-core runs them) at NVLink / network
bandwidth assumed not overlapped with compute (an upper bound on their cost).
"""

from __future__ import annotations

import functools
import logging
import math
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sessa_train.config import ComputeConfig, ModelConfig, TrainConfig
from sessa_train.errors import SessaError
from sessa_train.flops import forward_flops_per_token
from sessa_train.hardware import GPU, GPUS, GiB
from sessa_train.models import ModelPlan, Positions, SessaLM, SessaMixer
from sessa_train.ops.feedback import resolve_backend
from sessa_train.parallel.layout import stage_splits

NVLINK = 450e9  # bytes/s per GPU within a node (H100 SXM NVLink, one direction)
NETWORK = 50e9  # bytes/s per GPU between nodes (400 Gb/s InfiniBand per GPU)


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
    sequence_parallel: bool = False  # only with tensor > 1
    bucket: int = 50_000_000  # elements per DeepSpeed reduce / all-gather / prefetch bucket
    overlap: bool = False  # DeepSpeed reduces gradient buckets during the backward (data parallelism alone)
    virtual: int = 1  # model chunks per pipeline stage (interleaved 1F1B)

    @classmethod
    def of(cls, cfg: TrainConfig, seq_len: int, world: int, bf16: bool) -> Job:
        par = cfg.parallel
        model_parallel = par.tensor * par.pipeline * par.context
        if world % model_parallel:
            raise SessaError(f"{world} GPUs do not split into tensor x pipeline x context = {model_parallel}")
        return cls(
            cfg.model, cfg.compute, seq_len, cfg.data.micro_batch_size, cfg.schedule.global_batch_size,
            par.tensor, par.pipeline, par.context, world // model_parallel, par.zero_stage, bf16,
            par.splits_sequence, par.bucket_size, par.overlaps_reduction, par.virtual_stages,
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


class _RankShapes(ModelPlan):
    """One rank of ``tensor`` tensor-parallel ranks (with or without sequence parallelism) in one
    process, for counting only: every tensor has the shape it has on that rank (not its values),
    so what autograd keeps here is what the rank keeps, and each collective that ``MegatronPlan``
    (megatron-core's layers) runs is counted where it runs: ``traffic[(pass, kind)]`` adds the
    elements of the whole (gathered, or reduced) tensor of each all-reduce, all-gather and
    reduce-scatter of the forward and the backward pass."""

    def __init__(self, compute: ComputeConfig, tensor: int, sequence_parallel: bool) -> None:
        super().__init__(compute)
        self.tp, self.sp = tensor, sequence_parallel and tensor > 1
        self.traffic: Counter = Counter()

    def count(self, direction: str, kind: str, elements: int) -> None:
        if self.tp > 1:
            self.traffic[(direction, kind)] += elements

    def column(self, n_in: int, n_out: int, *, bias: bool = True, parts: int = 1, residual: bool = False) -> nn.Module:
        return _Column(self, n_in, n_out, bias, residual, gather_rows=self.sp and residual)

    def row(self, n_in: int, n_out: int, *, bias: bool = True, residual: bool = False) -> nn.Module:
        return _Row(self, n_in, n_out, bias, scatter_rows=self.sp and residual)

    def embedding(self, vocab_size: int, dim: int) -> nn.Module:
        return _Embedding(self, vocab_size, dim)

    def part(self, value: torch.Tensor, split) -> torch.Tensor:
        return value if split is None else value.chunk(self.tp, split.dim)[0].clone()

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        self.count("forward", "all-gather", x.numel() * self.tp)
        return torch.cat([x] * self.tp, dim=-1)

    def scatter(self, x: torch.Tensor) -> torch.Tensor:
        self.count("backward", "all-gather", x.numel())
        return x[..., : x.shape[-1] // self.tp]

    def shared(self, x: torch.Tensor) -> torch.Tensor:
        self.count("backward", "all-reduce", x.numel())
        return x

    def positions(self, length: int, position_ids: torch.Tensor | None = None) -> Positions:
        return super().positions(length * self.tp if self.sp else length, position_ids)

    def token_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.count("forward", "all-reduce", 3 * targets.numel())  # vocab-parallel: max, target logit, sum
        return super().token_loss(logits, targets % logits.shape[-1])


class _Column(nn.Linear):
    """Column-parallel: this rank's output features. Reading the residual stream under sequence
    parallelism it gathers the rows (and again in the backward, for the weight's gradient) and
    keeps this rank's rows only; reading it otherwise, its input gradient is all-reduced; reading
    a ``shared`` tensor, nothing (the mark sums the gradient)."""

    def __init__(self, plan: _RankShapes, n_in: int, n_out: int, bias: bool, residual: bool, gather_rows: bool):
        super().__init__(n_in, n_out // plan.tp, bias=bias)
        self.__dict__["plan"], self.residual, self.gather_rows = plan, residual, gather_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self.plan
        if not self.gather_rows:
            if self.residual:
                plan.count("backward", "all-reduce", x.numel())
            return super().forward(x)
        whole = x.numel() * plan.tp
        plan.count("forward", "all-gather", whole)
        plan.count("backward", "all-gather", whole)
        plan.count("backward", "reduce-scatter", whole)
        return _GatheredLinear.apply(x, self.weight, self.bias, plan.tp)


class _GatheredLinear(torch.autograd.Function):
    """linear(the rows of ``tp`` ranks, weight, bias), keeping this rank's rows (counting only)."""

    @staticmethod
    def forward(ctx, x, weight, bias, tp):  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        return F.linear(torch.cat([x] * tp, dim=1), weight, bias)


class _Row(nn.Linear):
    """Row-parallel: this rank's input features; the output summed over the ranks (all-reduce),
    or, adding to the residual stream under sequence parallelism, this rank's rows of the sum."""

    def __init__(self, plan: _RankShapes, n_in: int, n_out: int, bias: bool, scatter_rows: bool) -> None:
        super().__init__(n_in // plan.tp, n_out, bias=bias)
        self.__dict__["plan"], self.scatter_rows = plan, scatter_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan, y = self.plan, F.linear(x, self.weight)
        if self.scatter_rows:
            plan.count("forward", "reduce-scatter", y.numel())
            plan.count("backward", "all-gather", y.numel())
            y = y[:, : y.shape[1] // plan.tp]
        else:
            plan.count("forward", "all-reduce", y.numel())
        return y if self.bias is None else y + self.bias


class _Embedding(nn.Embedding):
    """This rank's vocabulary rows; the lookup summed over the ranks (all-reduce), or under
    sequence parallelism this rank's rows of the sum."""

    def __init__(self, plan: _RankShapes, vocab_size: int, dim: int) -> None:
        super().__init__(vocab_size // plan.tp, dim)
        self.__dict__["plan"] = plan

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        plan, out = self.plan, super().forward(ids % self.num_embeddings)
        if plan.sp:
            plan.count("forward", "reduce-scatter", out.numel())
            plan.count("backward", "all-gather", out.numel())
            return out[:, : out.shape[1] // plan.tp]
        plan.count("forward", "all-reduce", out.numel())
        return out


@functools.lru_cache(maxsize=64)
def rank_pass(
    cfg: ModelConfig, seq_len: int, dtype: torch.dtype, tensor: int = 1, sequence_parallel: bool = False
) -> tuple[int, dict[tuple[str, str], int]]:
    """One tensor-parallel rank's forward of one sequence (batch 1) of ``seq_len`` tokens through
    the whole model with the loss: (bytes autograd keeps for the backward, each storage counted
    once; elements of each collective by (pass, kind), ``_RankShapes``)."""
    plan = _RankShapes(ComputeConfig(), tensor, sequence_parallel)
    with torch.device("meta"):  # shapes only: no initialisation (the values play no part in the count)
        model = SessaLM(cfg, plan)
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
    return sum(kept.values()), dict(plan.traffic)


def saved_bytes(
    cfg: ModelConfig, seq_len: int, dtype: torch.dtype, tensor: int = 1, sequence_parallel: bool = False
) -> int:
    """Bytes autograd keeps on one tensor-parallel rank after a forward of one sequence of
    ``seq_len`` tokens through the whole model with the loss (``rank_pass``)."""
    return rank_pass(cfg, seq_len, dtype, tensor, sequence_parallel)[0]


@functools.lru_cache(maxsize=32)
def _solves(cfg: ModelConfig) -> bool:
    """Whether the model's layers solve the feedback system (the baselines do not)."""
    with torch.device("meta"):
        return any(isinstance(m, SessaMixer) for m in SessaLM(replace_layers(cfg, 1)).modules())


def _sample_len(job: Job) -> int:
    """Tokens of the counting passes: 256 and twice that (whole SSD chunks), a multiple of TP."""
    return 256 * job.tensor // math.gcd(256, job.tensor)


def _per_token(job: Job, measure) -> tuple[float, float]:
    """(per layer, embedding + head with the loss) per token of ``measure(cfg, seq_len)``, which is
    linear in the tokens (no T x T tensor is kept), from 1- and 2-layer models at two lengths."""
    t0 = _sample_len(job)
    small = replace_layers(job.model, 1), replace_layers(job.model, 2)
    one, two = ((measure(c, 2 * t0) - measure(c, t0)) / t0 for c in small)
    return two - one, 2 * one - two


def activation_bytes(job: Job) -> tuple[float, float, float]:
    """Per micro-batch and rank: (kept by a stage's layers, kept by the embedding and the head
    with the loss, one layer's activations), counted on one tensor-parallel rank (``rank_pass``):
    without sequence parallelism the residual stream and the LayerNorms are whole on every rank."""
    cfg, dtype = job.model, torch.bfloat16 if job.bf16 else torch.float32
    layer, rest = _per_token(job, lambda c, t: saved_bytes(c, t, dtype, job.tensor, job.sequence_parallel))
    tokens = job.micro_batch * job.seq_len / job.context
    layers = math.ceil(cfg.n_layers / job.pipeline)
    elt = dtype.itemsize
    if job.compute.recompute == "full":  # each layer's input: this rank's rows under sequence parallelism
        kept = layers * tokens * cfg.d_model * elt / (job.tensor if job.sequence_parallel else 1)
    else:
        kept = layers * layer * tokens
        if job.compute.recompute == "selective":  # the attention core keeps its output (this rank's heads)
            kept -= layers * tokens * cfg.d_model * elt / job.tensor
    return kept, rest * tokens, layer * tokens


def tensor_parallel_seconds(job: Job) -> float:
    """Seconds per step of the tensor-parallel collectives a rank runs (counted by ``rank_pass``:
    forward and backward, the forward's again under full recomputation) at NVLink bandwidth: ring
    algorithms move 2 (P - 1) / P of a tensor per all-reduce, (P - 1) / P per all-gather or
    reduce-scatter. Not overlapped with compute: an upper bound."""
    P = job.tensor
    if P == 1:
        return 0.0
    dtype = torch.bfloat16 if job.bf16 else torch.float32
    share = {"all-reduce": 2 * (P - 1) / P, "all-gather": (P - 1) / P, "reduce-scatter": (P - 1) / P}
    again = 2 if job.compute.recompute == "full" else 1

    def moved(cfg: ModelConfig, seq_len: int) -> float:
        traffic = rank_pass(cfg, seq_len, dtype, P, job.sequence_parallel)[1]
        return sum(
            n * share[kind] * (again if direction == "forward" else 1) for (direction, kind), n in traffic.items()
        )

    layer, rest = _per_token(job, moved)
    tokens = job.micro_batches * job.micro_batch * job.seq_len / job.context
    layers = math.ceil(job.model.n_layers / job.pipeline)
    return (layers * layer + rest) * tokens * dtype.itemsize / NVLINK


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
    # 1F1B: the first stage holds PP micro-batches; interleaved, PP + (PP - 1) / v (its warm-up runs
    # 2 (PP - 1) + (v - 1) PP chunk forwards before the first backward, a chunk being 1 / v of it)
    in_flight = min(job.pipeline + (job.pipeline - 1) / job.virtual if job.virtual > 1 else job.pipeline,
                    job.micro_batches)  # fmt: skip
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
    bucket = min(job.bucket, P) * low
    # ZeRO-1/2: a reduce and an all-gather bucket, 4.5 x a bucket with overlap_comm (DeepSpeed's
    # documented cost); ZeRO-3: the prefetch bucket and the reduce bucket (two with overlap_comm)
    buffers = {0: 0, 1: (4.5 if job.overlap else 2) * bucket, 2: (4.5 if job.overlap else 2) * bucket}
    buffers[3] = job.bucket * low + (2 if job.overlap else 1) * bucket
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
    idle = (job.pipeline - 1) / job.virtual  # the 1F1B bubble in micro-batch times, / v interleaved
    bubble = compute * idle / (m + idle) if job.pipeline > 1 else 0.0
    P = stage_parameters(job.model, job.tensor, job.pipeline)
    dp = job.data * job.context
    across_nodes = job.tensor * job.pipeline * job.context * job.data > gpus_per_node
    bw = NETWORK if across_nodes else NVLINK
    grad_sync = 2 * (dp - 1) / dp * P * (2 if job.bf16 else 4) / bw if dp > 1 else 0.0
    if job.overlap:  # all but the last bucket hide behind the last micro-batch's backward (2/3 of its compute)
        grad_sync = max(grad_sync * min(1.0, job.bucket / P), grad_sync - 2 / 3 * compute / m)
    tp = tensor_parallel_seconds(job)
    total = compute + bubble + grad_sync + tp
    return {
        "compute": compute,
        "pipeline bubble": bubble,
        "gradient reduction": grad_sync,
        "tensor-parallel collectives": tp,
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
