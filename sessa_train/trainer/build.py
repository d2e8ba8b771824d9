"""Everything a run is made of, built once: where this rank sits in the job (``parallel_state``),
its training data (``build_loader``) and its part of the model under DeepSpeed with the runner
that steps it (``build_engine``). Tests build through the same functions.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sessa_train.config import TrainConfig, architecture_difference
from sessa_train.data import BlendedLoader, PackedTokenLoader
from sessa_train.distributed import DistInfo
from sessa_train.errors import CheckpointError, DataError, TrainError
from sessa_train.models import SessaLM
from sessa_train.parallel.plan import build_model, check_layout, micro_batches
from sessa_train.parallel.state import ParallelState, init_parallel
from sessa_train.trainer.engine import Engine
from sessa_train.trainer.optim import deepspeed_config, init_optimizer_state, make_optimizer
from sessa_train.trainer.runner import EngineRunner


def parallel_state(cfg: TrainConfig, info: DistInfo) -> ParallelState:
    """Check the layout and, when any model-parallel size is > 1, create megatron-core's groups."""
    check_layout(cfg, info.world_size)
    par = cfg.parallel
    return init_parallel(
        par.tensor, par.pipeline, par.context, info.world_size, info.rank, par.sequence_parallel, par.virtual_stages
    )


def check_memory(cfg: TrainConfig, state: ParallelState, seq_len: int, device: torch.device) -> None:
    """A one-line error, before anything is allocated, for a model whose weights, gradients and
    AdamW state alone (``sizing.state_bytes``) exceed this rank's memory (the GPU's, or the
    host's available memory shared by the ranks of this node)."""
    import os

    from sessa_train.sizing import Job, state_bytes
    from sessa_train.trainer.optim import precision

    job = Job.of(cfg, seq_len, state.model_parallel * state.dp, precision(cfg, device) == "bf16")
    need = sum(state_bytes(job).values())
    if device.type == "cuda":
        have, where = torch.cuda.get_device_properties(device).total_memory, f"GPU {device}"
    else:
        with open("/proc/meminfo") as fh:
            free = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("MemAvailable:"))
        have, where = free / int(os.environ.get("LOCAL_WORLD_SIZE", "1")), "this rank's share of the host's memory"
    if need > have:
        params = sum(p.numel() for p in _meta_model(cfg).parameters())
        raise TrainError(
            f"the model ({params / 1e9:.3g}B parameters: model.d_model={cfg.model.d_model}, model.n_layers="
            f"{cfg.model.n_layers}, model.vocab_size={cfg.model.vocab_size}) needs {need / 2**30:.1f} GiB per rank for "
            f"weights, gradients and AdamW state alone, more than the {have / 2**30:.1f} GiB of {where}; "
            "see sessa-plan for a layout that fits"
        )


def _meta_model(cfg: TrainConfig) -> SessaLM:
    with torch.device("meta"):
        return SessaLM(cfg.model)


def micro_batches_per_step(cfg: TrainConfig, layout: ParallelState) -> int:
    return micro_batches(cfg, layout.dp)


def loader_args(cfg: TrainConfig, layout: ParallelState) -> dict:
    """What every loader of this rank (train and validation) shares."""
    return {
        "micro_batch_size": cfg.data.micro_batch_size,
        "rank": layout.dp_rank,
        "world_size": layout.dp,
        "seed": cfg.data.seed,
        "tokenizer_path": cfg.data.tokenizer,
        "document_masking": cfg.data.document_masking,
    }


def build_loader(cfg: TrainConfig, layout: ParallelState, slots=None, stop=lambda: False):
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
    par = cfg.parallel
    if index["seq_len"] % par.context:
        raise TrainError(
            f"sequence length {index['seq_len']} of {data.sources[0][1]} is not divisible by "
            f"parallel.context={par.context}"
        )
    if par.splits_sequence and index["seq_len"] % (par.context * par.tensor):
        raise TrainError(
            f"sequence length {index['seq_len']} of {data.sources[0][1]} is not divisible by parallel.context="
            f"{par.context} x parallel.tensor={par.tensor}, as parallel.sequence_parallel=true needs; "
            "set parallel.sequence_parallel=false or write the data with another sequence length"
        )
    return loader


def initial_weights(cfg: TrainConfig, tokenizer_sha256: str | None) -> dict[str, torch.Tensor]:
    """The plain weights of the export ``checkpoint.init_from``; its model must be this run's, and
    its tokenizer the one this run's data was written with (``tokenizer_sha256``, None: unknown),
    or its token ids would mean other tokens here."""
    from sessa_train.export import load_pretrained
    from sessa_train.files import file_sha256

    source = Path(cfg.checkpoint.init_from)
    try:
        export = load_pretrained(source, dtype=torch.float32)
    except CheckpointError as e:
        raise TrainError(f"checkpoint.init_from: {e}") from None
    if differ := architecture_difference(export.cfg, cfg.model):
        raise TrainError(f"checkpoint.init_from={source} holds a model with {differ}")
    files = [source / name for name in ("tokenizer.model", "tokenizer.json") if (source / name).is_file()]
    if tokenizer_sha256 and files and (theirs := file_sha256(files[0])) != tokenizer_sha256:
        raise TrainError(
            f"checkpoint.init_from={source} was trained with tokenizer {files[0].name} (sha256 {theirs[:12]}...), "
            f"this run's data was written with another (sha256 {tokenizer_sha256[:12]}...): its token ids would "
            "mean other tokens; write the data with the export's tokenizer"
        )
    return export.state_dict()


def build_engine(
    cfg: TrainConfig, info: DistInfo, state: ParallelState, seq_len: int, weights: dict | None = None
) -> Engine:
    """This rank's part of the model, starting from the plain model of ``cfg.seed`` (or
    ``weights``) whatever the layout, under DeepSpeed with its optimizer, schedule and runner."""
    import deepspeed

    gas = micro_batches_per_step(cfg, state)
    check_memory(cfg, state, seq_len, info.device)
    n_params = _meta_model(cfg).num_parameters()
    # the same initial weights under every layout (models/lm.py); this rank's part only
    model = build_model(cfg.model, cfg.compute, state, cfg.seed, info.device, weights)
    model.plan.solver(info.device)  # the solve's backend, chosen once; one that cannot run here fails now
    mpu = None
    if state.model_parallel > 1:
        from sessa_train.parallel.state import MegatronMPU

        mpu = MegatronMPU()
    optimizer, scheduler = make_optimizer(cfg, model)
    ds, _, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg, gas, info.device),
        mpu=mpu,
    )
    init_optimizer_state(ds)  # so that a checkpoint's moments can be set before the first step
    if state.model_parallel == 1:  # DeepSpeed's engine steps the whole model (ZeRO 0-3)
        runner = EngineRunner(ds, info.device, state)
    else:  # megatron-core's schedule drives the stages
        from sessa_train.parallel.pipeline import PipelineRunner

        runner = PipelineRunner(model, ds, seq_len, cfg.data.micro_batch_size, info.device)
    return Engine(cfg, state, info.device, model, ds, optimizer, scheduler, runner, gas, n_params)
