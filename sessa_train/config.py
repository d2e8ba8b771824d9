"""Typed configuration: one dataclass per section, validated on construction.

``load_config(files, overrides)`` composes YAML files (later ones win) and ``key=value``
overrides onto ``TrainConfig`` with omegaconf; an unknown key, a value of the wrong type or
an invalid value raises ``ConfigError`` with one line naming the key. Model defaults follow
the public reference layer (see docs/reference_compat.md).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sessa_train.errors import ConfigError

# the feedback solve's backends (records in ops/feedback.py; ``auto`` picks one per device)
FEEDBACK_BACKENDS: tuple[str, ...] = ("auto", "reference", "chunked", "triton")
# the model's architectures (records in models/registry.py)
ARCHITECTURES: tuple[str, ...] = ("sessa", "transformer", "mamba2")
RECOMPUTE = ("none", "selective", "full")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 32000
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4  # forward-branch attention heads (H)
    n_kv_heads: int | None = None  # GQA; None = n_heads
    feedback_heads: int = 1  # the reference uses one feedback head over the full width
    gamma_max: float = 0.999
    gamma_bias_init: float = 1.0
    rope: bool = True  # RoPE on the forward branch's q and k (never on the feedback branch)
    rope_theta: float = 10000.0
    ln_eps: float = 1e-5
    ffn_hidden_size: int = 0  # 0 = no MLP between Sessa layers (the reference has none)
    tie_embeddings: bool = True
    init_std: float = 0.02  # embedding (and untied LM head) init; linears keep torch's default
    arch: str = "sessa"  # one of ARCHITECTURES: the Sessa layer or a matched baseline (models/registry.py)

    def __post_init__(self) -> None:
        def positive(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"model.{name} must be a positive integer, got {value!r}")

        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "feedback_heads"):
            positive(name)
        if self.n_kv_heads is not None:
            positive("n_kv_heads")
        if self.d_model % self.n_heads:
            raise ValueError(f"model.d_model={self.d_model} must be divisible by model.n_heads={self.n_heads}")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"model.n_heads={self.n_heads} must be divisible by model.n_kv_heads={self.kv_heads}")
        if self.d_model % self.feedback_heads:
            raise ValueError(
                f"model.d_model={self.d_model} must be divisible by model.feedback_heads={self.feedback_heads}"
            )
        if self.rope and self.head_dim % 2:
            raise ValueError(
                f"RoPE needs an even head dim, got d_model/n_heads = {self.d_model}/{self.n_heads} = {self.head_dim}"
            )
        if not 0.0 < self.gamma_max < 1.0:
            raise ValueError(f"model.gamma_max must be in (0, 1), got {self.gamma_max!r}")
        if not isinstance(self.ffn_hidden_size, int) or self.ffn_hidden_size < 0:
            raise ValueError(f"model.ffn_hidden_size must be an integer >= 0, got {self.ffn_hidden_size!r}")
        for name in ("rope_theta", "ln_eps", "init_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"model.{name} must be > 0, got {getattr(self, name)!r}")
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"model.arch={self.arch!r}; valid: {', '.join(ARCHITECTURES)}")

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict) -> ModelConfig:
        """The model section of a checkpoint or export."""
        return cls(**saved)


def architecture_difference(saved: dict | ModelConfig, ours: ModelConfig) -> str | None:
    """None when ``saved`` (a model section, e.g. of a checkpoint or export) describes the same
    architecture as ``ours``; otherwise a phrase naming every differing key, for one-line errors:
    ``"d_model=64 (this run: model.d_model=32)"``."""
    theirs = ModelConfig.from_dict(saved).to_dict() if isinstance(saved, dict) else saved.to_dict()
    mine = ours.to_dict()
    differ = [f"{k}={theirs[k]!r} (this run: model.{k}={mine[k]!r})" for k in mine if theirs[k] != mine[k]]
    return ", ".join(differ) or None


@dataclass(frozen=True)
class ComputeConfig:
    """How the model is computed, not what it is: resuming or exporting never depends on it."""

    feedback_backend: str = "auto"  # auto | reference | chunked | triton (SESSA_FEEDBACK_BACKEND replaces auto)
    feedback_chunk_size: int = 0  # rows per block of the solve; 0 = the backend's default
    feedback_cuda_graphs: bool = True  # Triton on CUDA: replay each shape's chunk loop from a CUDA graph
    # activations recomputed in the backward: none | selective (the attention core) | full (each layer)
    recompute: str = "none"
    compile: bool = False  # torch.compile each layer for training (the decode path stays eager)

    def __post_init__(self) -> None:
        _choice("compute", "recompute", self.recompute, RECOMPUTE)
        if self.feedback_backend not in FEEDBACK_BACKENDS:
            raise ValueError(
                f"compute.feedback_backend={self.feedback_backend!r}; valid: {', '.join(FEEDBACK_BACKENDS)}"
            )
        if not isinstance(self.feedback_chunk_size, int) or self.feedback_chunk_size < 0:
            raise ValueError(f"compute.feedback_chunk_size must be an integer >= 0, got {self.feedback_chunk_size!r}")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _choice(section: str, name: str, value: str, valid: tuple[str, ...]) -> None:
    _check(value in valid, f"{section}.{name}={value!r}; valid: {', '.join(valid)}")


@dataclass(frozen=True)
class DataConfig:
    path: str = "data/default/shards"  # directory with index.json (sessa-write-shards)
    tokenizer: str | None = None  # checked against the index's checksum when given
    micro_batch_size: int = 8  # sequences per rank per forward/backward
    num_workers: int = 0
    seed: int = 1234
    # reader slots: the global batch is read as reader_slots streams, fixed for the run's lifetime
    # so that batches do not depend on the data-parallel size (data/README.md); 0 = chosen at the
    # first start (the most that divide the global batch, up to 64 and one per shard)
    reader_slots: int = 0
    skip_corrupt: bool = False  # skip (and count) unreadable shards instead of stopping
    max_skipped_fraction: float = 0.05  # stop once the skipped shards hold more of the split's samples
    # several shard sets, Megatron's --data-path convention: [weight, path, weight, path, ...];
    # each global batch takes a fixed share of every set (data/README.md). Replaces ``path``.
    blend: list[str] = field(default_factory=list)
    # packed documents: no attention or feedback across the EOS that joins them, RoPE positions
    # restart per document (data/README.md says why off is the default, as in Megatron-LM)
    document_masking: bool = False

    @property
    def sources(self) -> list[tuple[float, str]]:
        """(weight, path) of each shard set: the blend's, or ``path`` alone."""
        if not self.blend:
            return [(1.0, self.path)]
        return [(float(w), p) for w, p in zip(self.blend[::2], self.blend[1::2], strict=True)]

    def __post_init__(self) -> None:
        if self.blend:
            form = "data.blend is [weight, path, weight, path, ...]"
            _check(len(self.blend) % 2 == 0, f"{form}; got {len(self.blend)} items: {list(self.blend)}")
            for w in self.blend[::2]:
                try:
                    ok = math.isfinite(float(w)) and float(w) > 0
                except ValueError:
                    ok = False
                _check(ok, f"{form} with positive weights; got weight {w!r}")
        _check(self.micro_batch_size >= 1, f"data.micro_batch_size must be >= 1, got {self.micro_batch_size}")
        _check(self.seed >= 0, f"data.seed must be >= 0 (it seeds numpy's shard order), got {self.seed}")
        _check(self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers}")
        _check(self.reader_slots >= 0, f"data.reader_slots must be >= 0 (0: automatic), got {self.reader_slots}")
        _check(
            0 <= self.max_skipped_fraction < 1,
            f"data.max_skipped_fraction must be in [0, 1), got {self.max_skipped_fraction}",
        )


@dataclass(frozen=True)
class OptimizerConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1  # not applied to norms, biases, gamma and embeddings
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping

    def __post_init__(self) -> None:
        _check(self.lr > 0, f"optimizer.lr must be > 0, got {self.lr}")
        _check(0 <= self.min_lr <= self.lr, f"optimizer.min_lr must be in [0, lr={self.lr}], got {self.min_lr}")
        _check(self.weight_decay >= 0, f"optimizer.weight_decay must be >= 0, got {self.weight_decay}")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            _check(0 <= value < 1, f"optimizer.{name} must be in [0, 1), got {value}")
        _check(self.eps > 0, f"optimizer.eps must be > 0, got {self.eps}")
        _check(self.grad_clip >= 0, f"optimizer.grad_clip must be >= 0, got {self.grad_clip}")


DECAYS = ("cosine", "linear", "constant")


@dataclass(frozen=True)
class ScheduleConfig:
    train_steps: int = 1000  # optimizer steps
    warmup_steps: int = 100
    decay: str = "cosine"
    global_batch_size: int = 8  # sequences per optimizer step, over all data-parallel ranks
    stop_after_steps: int = 0  # end this job after that many steps, with a checkpoint (0: off);
    # the LR schedule still spans train_steps, so a later --resume auto continues it exactly

    def __post_init__(self) -> None:
        _check(self.train_steps >= 1, f"schedule.train_steps must be >= 1, got {self.train_steps}")
        _check(self.stop_after_steps >= 0, f"schedule.stop_after_steps must be >= 0, got {self.stop_after_steps}")
        bound = f"[0, train_steps={self.train_steps}]"
        _check(
            0 <= self.warmup_steps <= self.train_steps,
            f"schedule.warmup_steps must be in {bound}, got {self.warmup_steps}",
        )
        _choice("schedule", "decay", self.decay, DECAYS)
        _check(self.global_batch_size >= 1, f"schedule.global_batch_size must be >= 1, got {self.global_batch_size}")


PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1
    context: int = 1  # context parallelism: every sequence split over this many ranks (docs/parallelism.md)
    # with tensor > 1: the residual stream, LayerNorms and the loss's inputs are split along the
    # sequence over the tensor-parallel ranks (Megatron's --sequence-parallel; docs/parallelism.md)
    sequence_parallel: bool = True
    # model chunks per pipeline stage: megatron-core's interleaved 1F1B schedule (its virtual
    # pipeline); the bubble shrinks by this factor (docs/parallelism.md)
    virtual_stages: int = 1
    zero_stage: int = 0
    # DeepSpeed's gradient reduction under data parallelism alone (ZeRO 1-3): each bucket is
    # reduced while the backward goes on (overlap_comm); elements per reduce / all-gather /
    # ZeRO-3 prefetch bucket (docs/parallelism.md, "Overlapped communication")
    overlap_comm: bool = True
    bucket_size: int = 50_000_000
    precision: str = "auto"  # auto: fp32 on CPU, bf16 on GPU

    def __post_init__(self) -> None:
        for name in ("tensor", "pipeline", "context", "virtual_stages"):
            value = getattr(self, name)
            _check(value >= 1, f"parallel.{name} must be >= 1, got {value}")
        _check(self.zero_stage in (0, 1, 2, 3), f"parallel.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        _check(self.bucket_size >= 1, f"parallel.bucket_size must be >= 1 (elements), got {self.bucket_size}")
        _choice("parallel", "precision", self.precision, PRECISIONS)

    @property
    def splits_sequence(self) -> bool:
        """Sequence parallelism acts: it is on and there are tensor-parallel ranks to split over."""
        return self.sequence_parallel and self.tensor > 1

    @property
    def overlaps_reduction(self) -> bool:
        """DeepSpeed's gradient reduction overlaps the backward: ZeRO 1-3 under data parallelism
        alone, where its engine drives the backward (megatron-core's schedule drives the others)."""
        return self.overlap_comm and self.zero_stage > 0 and self.tensor * self.pipeline * self.context == 1


@dataclass(frozen=True)
class CheckpointConfig:
    dir: str = "runs/default/checkpoints"
    every_steps: int = 200  # 0: only at the end and on SIGTERM/SIGINT
    keep_last: int = 3
    # the step after a save runs while its files are written from host copies (one save in
    # flight); ``latest`` moves only once the whole checkpoint is on disk
    async_save: bool = True
    resume: str = "none"  # none | auto (newest checkpoint that verifies) | a checkpoint folder
    resume_older: bool = False  # allow a folder older than the newest (the newer ones are moved aside)
    # an export folder (sessa-export): its weights start the run, under any parallel layout, with
    # a fresh optimizer and data order; ignored once the run has a checkpoint to resume from
    init_from: str | None = None

    def __post_init__(self) -> None:
        _check(self.every_steps >= 0, f"checkpoint.every_steps must be >= 0, got {self.every_steps}")
        _check(self.keep_last >= 1, f"checkpoint.keep_last must be >= 1, got {self.keep_last}")


WANDB_MODES = ("online", "offline", "disabled")


@dataclass(frozen=True)
class LmEvalConfig:
    """lm-evaluation-harness during training: every ``every_steps`` (0: off) rank 0 exports the
    step's checkpoint and runs ``tasks`` (lm-eval names or local task YAML files) on it."""

    every_steps: int = 0
    tasks: list[str] = field(default_factory=list)
    batch_size: int = 4
    limit: int = 0  # documents per task (0: all)

    def __post_init__(self) -> None:
        _check(self.every_steps >= 0, f"logging.lm_eval.every_steps must be >= 0, got {self.every_steps}")
        _check(self.batch_size >= 1, f"logging.lm_eval.batch_size must be >= 1, got {self.batch_size}")
        _check(self.limit >= 0, f"logging.lm_eval.limit must be >= 0, got {self.limit}")
        _check(not self.every_steps or bool(self.tasks), "logging.lm_eval.every_steps needs logging.lm_eval.tasks")


@dataclass(frozen=True)
class WandbConfig:
    project: str = ""  # "" = no wandb
    entity: str = ""
    mode: str = "online"  # online | offline (the run folder only; `wandb sync` later) | disabled

    def __post_init__(self) -> None:
        _choice("logging.wandb", "mode", self.mode, WANDB_MODES)


@dataclass(frozen=True)
class LoggingConfig:
    dir: str = "runs/default/tensorboard"
    every_steps: int = 10  # console lines; metrics.jsonl, tensorboard and wandb get every step
    eval_every_steps: int = 100  # 0 disables validation
    eval_batches: int = 20
    max_bad_steps: int = 5  # consecutive NaN/Inf losses before the run aborts
    peak_tflops: float = 0.0  # per-device peak for MFU; 0: the GPU's from hardware.py (none on CPU: no MFU)
    sample_ids: bool = False  # metrics.jsonl rows list each step's samples (one gather per step)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    # [start, end]: a torch.profiler trace of those steps (and a CUDA memory snapshot) in <dir>/profile
    profile_steps: list[int] = field(default_factory=list)
    lm_eval: LmEvalConfig = field(default_factory=lambda: LmEvalConfig())

    def __post_init__(self) -> None:
        ps = list(self.profile_steps)
        _check(
            not ps or (len(ps) == 2 and 1 <= ps[0] <= ps[1]),
            f"logging.profile_steps must be [] or [start, end] with 1 <= start <= end, got {ps}",
        )
        for name in ("every_steps", "eval_batches", "max_bad_steps"):
            value = getattr(self, name)
            _check(value >= 1, f"logging.{name} must be >= 1, got {value}")
        _check(self.eval_every_steps >= 0, f"logging.eval_every_steps must be >= 0, got {self.eval_every_steps}")
        _check(
            self.peak_tflops >= 0 and self.peak_tflops != float("inf"),
            f"logging.peak_tflops must be a peak in TFLOP/s (> 0) or 0 (the GPU's own), got {self.peak_tflops}",
        )


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.seed >= 0, f"seed must be >= 0, got {self.seed}")
        ps = self.logging.profile_steps
        _check(
            not ps or ps[1] <= self.schedule.train_steps,
            f"logging.profile_steps={list(ps)} ends after schedule.train_steps={self.schedule.train_steps}: "
            f"choose steps within 1..{self.schedule.train_steps}",
        )
        _check(
            not (self.data.document_masking and self.model.arch == "mamba2"),
            "data.document_masking=true is not supported by model.arch=mamba2 (its scan has no per-document "
            "reset); set data.document_masking=false",
        )
        for section, values in self.to_dict().items():
            for key, value in values.items() if isinstance(values, dict) else ():
                if isinstance(value, float) and not math.isfinite(value):
                    raise ValueError(f"{section}.{key} must be a finite number, got {value}")

    def to_dict(self) -> dict:
        return asdict(self)


def load_config(files: list[str | Path] = (), overrides: list[str] = ()) -> TrainConfig:  # type: ignore[assignment]
    """Compose YAML ``files`` (in order) and ``key=value`` ``overrides`` onto the defaults."""
    import yaml
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    merged = OmegaConf.structured(TrainConfig)
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. schedule.train_steps=500)")
    source = "defaults"
    try:
        for path in map(Path, files):
            source = str(path)
            if not path.is_file():
                raise ConfigError(f"config file not found: {path}")
            try:
                loaded = OmegaConf.load(path)
            except yaml.YAMLError as e:
                mark = getattr(e, "problem_mark", None)
                where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
                raise ConfigError(f"{path} is not valid YAML ({getattr(e, 'problem', None) or e}{where})") from None
            if not isinstance(loaded, DictConfig):
                raise ConfigError(f"{path} must be a mapping of sections (model:, data:, schedule:, ...), got a list")
            merged = OmegaConf.merge(merged, loaded)
        source = "command-line overrides"
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        source = "the composed config"
        return OmegaConf.to_object(merged)  # builds the dataclasses: their checks run here
    except OmegaConfBaseException as e:
        reason = str(e).strip().splitlines()[0]
        raise ConfigError(f"config key {getattr(e, 'full_key', None) or '?'} ({source}): {reason}") from None
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from None
