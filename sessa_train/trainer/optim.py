"""AdamW with parameter groups, the learning-rate schedule, and DeepSpeed's config."""

from __future__ import annotations

import math

import torch

from sessa_train.config import ParallelConfig, TrainConfig


def lr_lambda(cfg: TrainConfig):
    """Multiplier of optimizer.lr at optimizer step s: linear warmup, then decay to min_lr."""
    sch, peak, floor = cfg.schedule, cfg.optimizer.lr, cfg.optimizer.min_lr

    def factor(step: int) -> float:
        if step < sch.warmup_steps:
            return (step + 1) / sch.warmup_steps
        progress = min(1.0, (step - sch.warmup_steps) / max(1, sch.train_steps - sch.warmup_steps))
        if sch.decay == "cosine":
            lr = floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        elif sch.decay == "linear":
            lr = peak - (peak - floor) * progress
        else:
            lr = peak
        return lr / peak

    return factor


class SkippableAdamW(torch.optim.AdamW):
    """AdamW whose next step() can be cancelled: the trainer's way to skip a step with a
    non-finite loss when DeepSpeed calls the optimizer directly (fp32 without ZeRO)."""

    skip_next = False

    def step(self, closure=None):  # type: ignore[override]
        if self.skip_next:
            self.skip_next = False
            return None
        return super().step(closure)


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: not on norms, biases, the gamma gate or embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        skip = p.dim() < 2 or "gamma" in name or name.startswith("embed.")
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module):
    """(SkippableAdamW, LambdaLR) of the config for ``model``'s parameters on this rank."""
    opt = cfg.optimizer
    optimizer = SkippableAdamW(
        parameter_groups(model, opt.weight_decay), lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps
    )
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))


def base_optimizer(ds) -> torch.optim.Optimizer:
    """The torch AdamW under DeepSpeed's ZeRO / bf16 wrapper (or the optimizer itself)."""
    return getattr(ds.optimizer, "optimizer", ds.optimizer)


def init_optimizer_state(ds) -> None:
    """Create AdamW's state (zeros, step 0) for every parameter the base optimizer steps, as its
    first step would, and let DeepSpeed link its ZeRO / bf16 fragments to it: the moments of a
    checkpoint can then be set before the first step. Changes nothing a step computes."""
    base = base_optimizer(ds)
    params = [p for group in base.param_groups for p in group["params"]]
    params += getattr(ds.optimizer, "fp32_partitioned_groups_flat", [])  # ZeRO-3 lends these only inside step()
    for p in params:
        if not base.state.get(p):
            base.state[p] = {
                "step": torch.tensor(0.0),
                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
            }
    link = getattr(ds.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:  # ZeRO 1/2 and the bf16 optimizer link their fragments at the first step
        link()


def precision(cfg: TrainConfig, device: torch.device) -> str:
    """The run's precision, "bf16" or "fp32" ("auto": bf16 on CUDA)."""
    auto = "bf16" if device.type == "cuda" else "fp32"
    return auto if cfg.parallel.precision == "auto" else cfg.parallel.precision


def zero_config(par: ParallelConfig) -> dict:
    """DeepSpeed's ``zero_optimization``; its reduction overlaps the backward where
    ``ParallelConfig.overlaps_reduction`` says it can."""
    bucket = par.bucket_size
    return {
        "stage": par.zero_stage,
        "overlap_comm": par.overlaps_reduction,
        "contiguous_gradients": True,
        "reduce_bucket_size": bucket,
        "allgather_bucket_size": bucket,
        "stage3_prefetch_bucket_size": bucket,
    }


def deepspeed_config(cfg: TrainConfig, gas: int, device: torch.device) -> dict:
    """DeepSpeed's config. The runners drive the ``gas`` micro-batches of a step themselves (the
    accumulation boundary set by hand, or megatron-core's schedule) and scale their losses, so
    DeepSpeed sees one micro-batch of ``gas`` x size per step."""
    bf16 = precision(cfg, device) == "bf16"
    config = {
        # DeepSpeed counts context-parallel ranks as data-parallel replicas (they average gradients)
        "train_batch_size": cfg.schedule.global_batch_size * cfg.parallel.context,
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch_size * gas,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero_config(cfg.parallel),
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bf16},
        "steps_per_print": 2**31 - 1,
    }
    if cfg.optimizer.grad_clip > 0:
        config["gradient_clipping"] = cfg.optimizer.grad_clip
    return config
