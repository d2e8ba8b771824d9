"""The pretraining entry point: config -> data loader -> Sessa LM -> DeepSpeed engine -> loop.

    python -m sessa_train.train --config configs/tiny.yaml [key=value ...] [--resume auto]
    torchrun --nproc-per-node 2 -m sessa_train.train --config configs/tiny.yaml parallel.zero_stage=2

Bad configuration or data ends with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from sessa_train.checkpoint import CheckpointManager
from sessa_train.config import ConfigError, TrainConfig, load_config
from sessa_train.data import PackedTokenLoader, merge_states
from sessa_train.distributed import DistInfo, init_distributed
from sessa_train.flops import train_flops_per_token
from sessa_train.models import SessaLM
from sessa_train.ops.feedback import resolve_backend


class TrainError(ValueError):
    """A run that cannot start or go on; one line for the user."""


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


def deepspeed_config(cfg: TrainConfig, gas: int, device: torch.device, accumulate: bool = True) -> dict:
    """DeepSpeed's config. With ``accumulate=False`` (megatron-core's schedule runs the ``gas``
    micro-batches and scales their losses) DeepSpeed sees one micro-batch of ``gas`` x size."""
    bf16 = cfg.parallel.precision == "bf16" or (cfg.parallel.precision == "auto" and device.type == "cuda")
    micro = cfg.data.micro_batch_size * (1 if accumulate else gas)
    config = {
        # DeepSpeed counts context-parallel ranks as data-parallel replicas (they average gradients)
        "train_batch_size": cfg.schedule.global_batch_size * cfg.parallel.context,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas if accumulate else 1,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bf16},
        "steps_per_print": 2**31 - 1,
    }
    if cfg.optimizer.grad_clip > 0:
        config["gradient_clipping"] = cfg.optimizer.grad_clip
    return config


def initial_weights(cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """The plain weights of the export ``checkpoint.init_from``; its model must be this run's."""
    from sessa_train.export import ExportError, load_pretrained

    try:
        export = load_pretrained(cfg.checkpoint.init_from, dtype=torch.float32)
    except ExportError as e:
        raise TrainError(f"checkpoint.init_from: {e}") from None
    saved, ours = export.cfg.to_dict(), cfg.model.to_dict()
    kernel = ("feedback_backend", "feedback_chunk_size")  # how to compute, not what
    differ = [k for k in ours if k not in kernel and saved.get(k) != ours[k]]
    if differ:
        k = differ[0]
        raise TrainError(
            f"checkpoint.init_from={cfg.checkpoint.init_from} holds a model with {k}={saved.get(k)!r}, "
            f"this run has model.{k}={ours[k]!r}"
        )
    return export.state_dict()


class Trainer:
    def __init__(self, cfg: TrainConfig, dist_info: DistInfo) -> None:
        import deepspeed

        self.cfg, self.dist = cfg, dist_info
        world = dist_info.world_size
        par = cfg.parallel
        # a feedback backend that cannot run on this device fails here, not in the first step
        resolve_backend(cfg.model.feedback_backend, dist_info.device, cfg.model.feedback_chunk_size or None)
        self.pstate = None  # megatron-core's TP x PP x DP layout when parallel.tensor/pipeline > 1
        dp, dp_rank = world, dist_info.rank
        if par.tensor * par.pipeline * par.context > 1:
            if par.zero_stage > 1:
                raise TrainError(
                    f"parallel.zero_stage={par.zero_stage} with tensor/pipeline/context parallelism; valid: 0 or 1 "
                    "(ZeRO-2/3 partition gradients during a backward that megatron-core's schedule drives)"
                )
            from sessa_train.parallel.model import check_parallel_model
            from sessa_train.parallel.state import check_sizes, init_model_parallel

            check_sizes(par.tensor, par.pipeline, par.context, world)
            check_parallel_model(cfg.model, par.tensor, par.pipeline)
            self.pstate = init_model_parallel(par.tensor, par.pipeline, par.context, world)
            dp, dp_rank = self.pstate.dp, self.pstate.dp_rank
        per_step = cfg.data.micro_batch_size * dp
        if cfg.schedule.global_batch_size % per_step:
            raise TrainError(
                f"schedule.global_batch_size={cfg.schedule.global_batch_size} is not divisible by "
                f"data.micro_batch_size={cfg.data.micro_batch_size} x {dp} data-parallel ranks"
            )
        self.gas = cfg.schedule.global_batch_size // per_step
        torch.manual_seed(cfg.seed)
        loader_args = {
            "micro_batch_size": cfg.data.micro_batch_size,
            "rank": dp_rank,
            "world_size": dp,
            "seed": cfg.data.seed,
            "tokenizer_path": cfg.data.tokenizer,
        }
        self.train_loader = PackedTokenLoader(
            cfg.data.path, "train", num_workers=cfg.data.num_workers, skip_corrupt=cfg.data.skip_corrupt, **loader_args
        )
        index = self.train_loader.index
        if index["vocab_size"] > cfg.model.vocab_size:
            raise TrainError(
                f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's vocabulary "
                f"({index['vocab_size']}) of {cfg.data.path}"
            )
        self.seq_len = index["seq_len"]
        if self.seq_len % par.context:
            raise TrainError(
                f"sequence length {self.seq_len} of {cfg.data.path} is not divisible by parallel.context={par.context}"
            )
        self.has_val = cfg.logging.eval_every_steps > 0 and index["splits"].get("val", {}).get("samples", 0) > 0
        self.loader_args = loader_args
        model = SessaLM(cfg.model)  # the same initial weights under every layout
        if cfg.checkpoint.init_from:
            model.load_state_dict(initial_weights(cfg))
        self.n_params = model.num_parameters()
        mpu, self.runner = None, None
        if self.pstate is not None:
            from sessa_train.parallel.model import build_stage
            from sessa_train.parallel.pipeline import PipelineRunner
            from sessa_train.parallel.state import MegatronMPU

            model, mpu = build_stage(cfg.model, self.pstate, model.state_dict(), dist_info.device), MegatronMPU()
            self.runner = PipelineRunner(model, self.seq_len, cfg.data.micro_batch_size, dist_info.device)
        opt = cfg.optimizer
        groups = parameter_groups(model, opt.weight_decay)
        optimizer = SkippableAdamW(groups, lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
        self.optimizer = optimizer
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=deepspeed_config(cfg, self.gas, dist_info.device, accumulate=self.runner is None),
            mpu=mpu,
        )
        self.flops_per_token = train_flops_per_token(cfg.model, self.seq_len)
        layout = {"ranks": world, "tensor": par.tensor, "pipeline": par.pipeline, "context": par.context}
        self.checkpoints = CheckpointManager(cfg.checkpoint.dir, cfg.checkpoint.keep_last, dist_info.rank, layout)
        self.step, self.tokens, self.first_step = 0, 0, 0
        self.stop_signal: int | None = None
        self.writer = None
        if dist_info.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(cfg.logging.dir)
            self.metrics = open(Path(cfg.logging.dir) / "metrics.jsonl", "a")  # noqa: SIM115 (closed in fit)

    # -- state -------------------------------------------------------------------------
    def resume(self) -> None:
        self.checkpoints.clear_partial()
        dist.barrier()
        path = self.checkpoints.resolve(self.cfg.checkpoint.resume)
        if path is None:
            if self.cfg.checkpoint.resume == "auto":
                self.log(f"no complete checkpoint in {self.cfg.checkpoint.dir}: starting from scratch")
            return
        client = self.checkpoints.load(self.engine, path)
        if client["config"]["model"] != self.cfg.to_dict()["model"]:
            raise TrainError(f"{path} holds a model with another configuration than model.* of this run")
        self.step, self.tokens = client["step"], client["tokens"]
        self.train_loader.load_state_dict(client["loader"])
        self.log(f"resumed from {path} at step {self.step}")

    def save(self) -> None:
        states: list[dict | None] = [None] * self.dist.world_size
        dist.all_gather_object(states, self.train_loader.state_dict())
        client = {
            "step": self.step,
            "tokens": self.tokens,
            "loader": merge_states(states),  # type: ignore[arg-type]
            "config": self.cfg.to_dict(),
        }
        path = self.checkpoints.save(self.engine, self.step, client)
        self.log(f"saved {path}")

    # -- loop ----------------------------------------------------------------------------
    def log(self, message: str) -> None:
        if self.dist.is_main:
            print(message, flush=True)

    def _mean(self, value: float) -> float:
        """Mean over data- and context-parallel ranks of a value the last pipeline stage holds
        (repeated over its TP ranks); other stages pass anything."""
        holders = self.dist.world_size
        if self.pstate is not None:
            holders = self.pstate.dp * self.pstate.tp * self.pstate.cp
            value = value if self.pstate.last_stage else 0.0
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return t.item() / holders

    def train_step(self, batches) -> tuple[float, bool]:
        """One optimizer step over ``gas`` micro-batches: (mean loss over ranks, update applied).

        A step whose loss is not finite on any rank changes no weight and no optimizer state:
        its gradients are dropped before the update (see ``_drop_gradients``).
        """
        skipped_before = self.engine.skipped_steps
        if self.runner is not None:  # megatron-core's schedule runs forward and backward
            stats = self.runner.run(batches, self.gas)
            mean = self._mean(sum(s["loss"].item() for s in stats) / self.gas if stats else 0.0)
            if not math.isfinite(mean):
                self._drop_gradients()
            self.engine.allreduce_gradients()  # over megatron's data-parallel group (the mpu's)
            self.engine.step()
            return mean, math.isfinite(mean) and self.engine.skipped_steps == skipped_before
        losses = []
        for i in range(self.gas):
            tokens = next(batches)["tokens"].to(self.dist.device)
            logits = self.engine(tokens[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
            self.engine.backward(loss)
            losses.append(loss.detach())
            if i == self.gas - 1:
                mean = self._mean(torch.stack(losses).mean().item())  # one host sync per step
                if not math.isfinite(mean):
                    self._drop_gradients()
            self.engine.step()
        return mean, math.isfinite(mean) and self.engine.skipped_steps == skipped_before

    def _drop_gradients(self) -> None:
        """Make the coming engine.step() leave weights and optimizer state alone. DeepSpeed's
        ZeRO 1/2 and bf16 optimizers skip a step whose gradient norm is not finite themselves
        (tested with and without clipping); otherwise DeepSpeed calls our SkippableAdamW."""
        if not hasattr(self.engine.optimizer, "overflow"):
            self.optimizer.skip_next = True

    @torch.no_grad()
    def evaluate(self) -> float:
        loader = PackedTokenLoader(self.cfg.data.path, "val", shuffle=False, max_epochs=1, **self.loader_args)
        self.engine.eval()
        total = torch.zeros(2, dtype=torch.float64)
        batches = list(itertools.islice(loader, self.cfg.logging.eval_batches))
        if self.runner is not None:  # every rank must run the same number of micro-batches
            n = torch.tensor([len(batches)])
            dist.all_reduce(n, op=dist.ReduceOp.MIN)
            for stats in self.runner.run(iter(batches), int(n), forward_only=True):
                total += torch.tensor([stats["sum"].item(), stats["count"]], dtype=torch.float64)
        else:
            for batch in batches:
                tokens = batch["tokens"].to(self.dist.device)
                logits = self.engine(tokens[:, :-1]).float()
                total[0] += F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum").item()
                total[1] += tokens[:, 1:].numel()
        self.engine.train()
        dist.all_reduce(total)
        return (total[0] / total[1]).item()

    def fit(self) -> list[float]:
        cfg = self.cfg
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: setattr(self, "stop_signal", signum))
        self.resume()
        self.log(
            f"Sessa LM {self.n_params / 1e6:.2f}M parameters, {self.dist.world_size} ranks, "
            f"{self.gas} accumulation steps, seq_len {self.seq_len}, steps {self.step} -> "
            f"{cfg.schedule.train_steps}, tensorboard: {cfg.logging.dir}"
        )
        batches = iter(self.train_loader)
        losses, bad, start, last_saved = [], 0, time.perf_counter(), self.step
        self.first_step = self.step
        tokens_per_step = cfg.schedule.global_batch_size * self.seq_len
        stop_at = cfg.schedule.train_steps
        if cfg.schedule.stop_after_steps:
            stop_at = min(stop_at, self.step + cfg.schedule.stop_after_steps)
        while self.step < stop_at and self.stop_signal is None:
            t0 = time.perf_counter()
            loss, applied = self.train_step(batches)
            step_time = time.perf_counter() - t0
            self.step += 1
            self.tokens += tokens_per_step
            losses.append(loss)
            bad = 0 if applied else bad + 1
            if bad:
                self.log(f"step {self.step}: loss {loss} or its gradients not finite: update skipped ({bad} in a row)")
                if bad >= cfg.logging.max_bad_steps:
                    raise TrainError(
                        f"{bad} consecutive steps with non-finite loss or gradients at step {self.step}: aborting; "
                        "lower optimizer.lr or resume from an earlier checkpoint"
                    )
            val = None
            if self.has_val and self.step % cfg.logging.eval_every_steps == 0:
                val = self.evaluate()
                perplexity = math.exp(min(val, 50))
                self.log(f"step {self.step}: validation loss {val:.4f}, perplexity {perplexity:.2f}")
                if self.writer:
                    self.writer.add_scalar("val/loss", val, self.step)
                    self.writer.add_scalar("val/perplexity", perplexity, self.step)
            self._log_step(loss, step_time, tokens_per_step, start, skipped=bool(bad), val=val)
            # a skipped step left the weights as they were: its checkpoint is safe to publish
            if cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0:
                self.save()
                last_saved = self.step
        if self.stop_signal is not None:
            self.log(f"received signal {self.stop_signal}: saving and stopping at step {self.step}")
        if last_saved != self.step:
            self.save()
        if self.writer:
            self.writer.close()
            self.metrics.close()
        return losses

    def _log_step(
        self, loss: float, step_time: float, tokens_per_step: int, start: float, skipped: bool, val: float | None
    ) -> None:
        cfg = self.cfg
        lr = self.scheduler.get_last_lr()[0]
        tok_s = tokens_per_step / step_time
        if self.writer:
            tflops = self.flops_per_token * tok_s / self.dist.world_size / 1e12
            scalars = {
                "train/loss": loss,
                "train/lr": lr,
                "train/grad_norm": self.engine.get_global_grad_norm() or 0.0,
                "perf/tokens_per_s": tok_s,
                "perf/step_time_s": step_time,
                "perf/tflops_per_s_per_device": tflops,
            }
            if cfg.logging.peak_tflops > 0:
                scalars["perf/mfu"] = scalars["perf/tflops_per_s_per_device"] / cfg.logging.peak_tflops
            if self.dist.device.type == "cuda":
                scalars["perf/max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, self.step)
            row = {
                "step": self.step,
                "loss": loss,
                "lr": lr,
                "tokens": self.tokens,
                "step_time_s": step_time,
                "tokens_per_s": tok_s,
                "skipped": skipped,
            }
            if val is not None:
                row["val_loss"] = val
            self.metrics.write(json.dumps(row) + "\n")
            self.metrics.flush()
        if self.step % cfg.logging.every_steps == 0 or self.step == cfg.schedule.train_steps:
            mean_step = (time.perf_counter() - start) / max(1, self.step - self.first_step)
            eta = (cfg.schedule.train_steps - self.step) * mean_step
            self.log(
                f"step {self.step}/{cfg.schedule.train_steps}  loss {loss:.4f}  lr {lr:.2e}  "
                f"{tok_s:,.0f} tok/s  {step_time:.2f}s/step  eta {eta:.0f}s"
            )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="sessa-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--config",
        action="append",
        required=True,
        type=Path,
        help="a YAML file; repeat to merge several, later ones win",
    )
    p.add_argument("--resume", help="none | auto | a checkpoint folder (sets checkpoint.resume)")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. schedule.train_steps=500")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides) + ([f"checkpoint.resume={args.resume}"] if args.resume else [])
    try:
        cfg = load_config(args.config, overrides)
        trainer = Trainer(cfg, init_distributed())
        trainer.fit()
    except (ConfigError, TrainError, ValueError) as e:
        print(f"sessa-train: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
