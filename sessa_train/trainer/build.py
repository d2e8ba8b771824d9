"""Everything a run is made of, built once: where this rank sits in the job (``rank_layout``),
its training data (``build_loader``) and its part of the model under DeepSpeed with the runner
that steps it (``build_engine``). Tests build through the same functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sessa_train import distributed as comm
from sessa_train.config import TrainConfig, architecture_difference
from sessa_train.data import BlendedLoader, PackedTokenLoader
from sessa_train.distributed import DistInfo
from sessa_train.errors import CheckpointError, DataError, TrainError
from sessa_train.models import ModelPlan, SessaLM
from sessa_train.parallel.layout import stage_splits
from sessa_train.trainer.optim import deepspeed_config, init_optimizer_state, make_optimizer
from sessa_train.trainer.runner import EngineRunner, Runner


@dataclass(frozen=True)
class RankLayout:
    """This rank's place in the job: its data-parallel replica (``dp_rank`` of ``dp``: ranks
    that read different data) and, under tensor/pipeline/context parallelism, megatron-core's
    groups (``model_parallel``; None when every rank holds the whole model)."""

    dp: int
    dp_rank: int
    model_parallel: object | None = None  # parallel.state.ParallelState


def rank_layout(cfg: TrainConfig, info: DistInfo) -> RankLayout:
    """Check the parallel sizes and, when any is > 1, create megatron-core's process groups."""
    par = cfg.parallel
    if par.tensor * par.pipeline * par.context == 1:
        return RankLayout(info.world_size, info.rank)
    if par.zero_stage > 1:
        raise TrainError(
            f"parallel.zero_stage={par.zero_stage} with tensor/pipeline/context parallelism; valid: 0 or 1 "
            "(ZeRO-2/3 partition gradients during a backward that megatron-core's schedule drives)"
        )
    from sessa_train.parallel.plan import check_parallel_model
    from sessa_train.parallel.state import init_model_parallel

    check_parallel_model(cfg.model, par.tensor, par.pipeline)
    state = init_model_parallel(par.tensor, par.pipeline, par.context, info.world_size)
    return RankLayout(state.dp, state.dp_rank, state)


def micro_batches_per_step(cfg: TrainConfig, layout: RankLayout) -> int:
    per_step = cfg.data.micro_batch_size * layout.dp
    if cfg.schedule.global_batch_size % per_step:
        raise TrainError(
            f"schedule.global_batch_size={cfg.schedule.global_batch_size} is not divisible by "
            f"data.micro_batch_size={cfg.data.micro_batch_size} x {layout.dp} data-parallel ranks"
        )
    return cfg.schedule.global_batch_size // per_step


def loader_args(cfg: TrainConfig, layout: RankLayout) -> dict:
    """What every loader of this rank (train and validation) shares."""
    return {
        "micro_batch_size": cfg.data.micro_batch_size,
        "rank": layout.dp_rank,
        "world_size": layout.dp,
        "seed": cfg.data.seed,
        "tokenizer_path": cfg.data.tokenizer,
    }


def build_loader(cfg: TrainConfig, layout: RankLayout, slots=None, stop=lambda: False):
    """This rank's training loader (``slots``: a resumed run's reader slots; a list for a blend),
    checked against the model and the parallel layout; ``stop()`` true ends its stream
    (``StopRequestedError``)."""
    micro_batches_per_step(cfg, layout)  # the batch sizes' own error before the reader slots'
    data = cfg.data
    common = {
        "global_batch_size": cfg.schedule.global_batch_size,
        "num_workers": data.num_workers,
        "skip_corrupt": data.skip_corrupt,
        "max_skipped_fraction": data.max_skipped_fraction,
        "stop": stop,
        **loader_args(cfg, layout),
    }
    if data.blend:
        if data.reader_slots:
            raise DataError("data.reader_slots applies to one data.path; a blend chooses the slots of each shard set")
        loader = BlendedLoader(data.sources, slots=slots, **common)
    else:
        loader = PackedTokenLoader(data.path, "train", slots=slots or data.reader_slots or None, **common)
    index = loader.index
    if index["vocab_size"] > cfg.model.vocab_size:
        raise TrainError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's vocabulary "
            f"({index['vocab_size']}) of {data.sources[0][1]}"
        )
    if index["seq_len"] % cfg.parallel.context:
        raise TrainError(
            f"sequence length {index['seq_len']} of {data.sources[0][1]} is not divisible by "
            f"parallel.context={cfg.parallel.context}"
        )
    return loader


def initial_weights(cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """The plain weights of the export ``checkpoint.init_from``; its model must be this run's."""
    from sessa_train.export import load_pretrained

    try:
        export = load_pretrained(cfg.checkpoint.init_from, dtype=torch.float32)
    except CheckpointError as e:
        raise TrainError(f"checkpoint.init_from: {e}") from None
    if differ := architecture_difference(export.cfg, cfg.model):
        raise TrainError(f"checkpoint.init_from={cfg.checkpoint.init_from} holds a model with {differ}")
    return export.state_dict()


@dataclass
class Engine:
    """This rank's part of the model under DeepSpeed (``ds``), and how a step runs through it."""

    cfg: TrainConfig
    layout: RankLayout
    device: torch.device
    model: SessaLM  # DeepSpeed's module: the whole model, or this rank's stage / shard
    ds: object  # deepspeed.DeepSpeedEngine
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    runner: Runner
    gas: int  # micro-batches per optimizer step on this rank
    n_params: int  # of the whole model

    def global_mean(self, total: torch.Tensor) -> float:
        """Mean token loss over the job from every rank's (loss sum, token count)."""
        total = comm.sum_values(total)
        return (total[0] / total[1]).item()

    def forward_backward(self, batches) -> float:
        """Forward and backward of one step's ``gas`` micro-batches; leaves the gradients reduced
        over the data-parallel ranks. Returns the step's mean token loss over the job."""
        return self.global_mean(self.runner.run(batches, self.gas))

    def grad_norm(self) -> float:
        """The L2 norm of the step's whole gradient before clipping, from the gradients left on
        the parameters (fp32 without ZeRO, where DeepSpeed records no norm): each tensor x pipeline
        rank's sum of squares, parameters that tensor parallelism does not cut counted on tensor
        rank 0 only, summed over the model-parallel group."""
        state = self.layout.model_parallel
        splits = stage_splits(self.cfg.model, state.pp if state else 1, state.pp_rank if state else 0)
        squares = torch.zeros((), dtype=torch.float64, device=self.device)
        for name, p in self.ds.module.named_parameters():
            if p.grad is not None and (state is None or state.tp_rank == 0 or splits[name] is not None):
                squares += p.grad.detach().double().square().sum()
        if state is not None:
            from megatron.core import parallel_state as ps

            squares = comm.sum_values(squares, ps.get_model_parallel_group())
        return squares.sqrt().item()

    def update(self, loss: float) -> tuple[bool, float]:
        """The optimizer step: (whether it changed the weights, the gradient norm before
        clipping). A step whose loss is not finite on any rank changes no weight and no optimizer
        state: DeepSpeed's ZeRO 1/2 and bf16 optimizers skip a step whose gradient norm is not
        finite themselves (tested with and without clipping); otherwise DeepSpeed calls our
        SkippableAdamW, told here to skip. The norm is DeepSpeed's where its optimizer wrapper
        (ZeRO 1-3, bf16) computes one, else ``grad_norm()``."""
        skipped_before = self.ds.skipped_steps
        own = self.ds.optimizer is self.optimizer  # fp32 without ZeRO: no wrapper, no recorded norm
        norm = self.grad_norm() if own else math.nan
        if not math.isfinite(loss) and not hasattr(self.ds.optimizer, "overflow"):
            self.optimizer.skip_next = True
        self.ds.step()
        if not own:
            norm = float(self.ds.get_global_grad_norm())
        return math.isfinite(loss) and self.ds.skipped_steps == skipped_before, norm

    def train_step(self, batches) -> tuple[float, bool, float]:
        """One optimizer step: (mean loss over the job, update applied, gradient norm)."""
        loss = self.forward_backward(batches)
        return loss, *self.update(loss)

    @torch.no_grad()
    def evaluate(self, batches: list[dict]) -> float:
        """Mean token loss over every rank's ``batches`` (forward only)."""
        self.ds.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        if batches:
            total = self.runner.run(iter(batches), len(batches), forward_only=True)
        self.ds.train()
        return self.global_mean(total)


def build_engine(
    cfg: TrainConfig, info: DistInfo, layout: RankLayout, seq_len: int, weights: dict | None = None
) -> Engine:
    """This rank's part of the model, starting from the plain model of ``cfg.seed`` (or
    ``weights``) whatever the layout, under DeepSpeed with its optimizer, schedule and runner."""
    import deepspeed

    gas = micro_batches_per_step(cfg, layout)
    mpu, state = None, layout.model_parallel
    with torch.device("meta"):
        n_params = SessaLM(cfg.model).num_parameters()
    torch.manual_seed(cfg.seed)  # the same initial weights under every layout (models/lm.py)
    if state is None:
        model = SessaLM(cfg.model, ModelPlan(cfg.compute))
        if weights is not None:
            model.load_state_dict(weights)
    else:  # this rank's part only, never the whole model
        from sessa_train.parallel.plan import build_parallel_model
        from sessa_train.parallel.state import MegatronMPU

        initial = cfg.seed if weights is None else weights
        model = build_parallel_model(cfg.model, cfg.compute, state, initial, info.device)
        mpu = MegatronMPU()
    model.plan.solver(info.device)  # a solve that cannot run here fails now, not in the first step
    optimizer, scheduler = make_optimizer(cfg, model)
    ds, _, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg, gas, info.device),
        mpu=mpu,
    )
    init_optimizer_state(ds)  # so that a checkpoint's moments can be set before the first step
    if state is None:
        runner: Runner = EngineRunner(ds, info.device)
    else:
        from sessa_train.parallel.pipeline import PipelineRunner

        runner = PipelineRunner(model, ds, seq_len, cfg.data.micro_batch_size, info.device)
    return Engine(cfg, layout, info.device, model, ds, optimizer, scheduler, runner, gas, n_params)
