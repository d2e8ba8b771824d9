"""The training loop: steps, validation, checkpoints, signals and metrics of one run."""

from __future__ import annotations

import itertools
import math
import signal
import time

import torch

from sessa_train import distributed as comm
from sessa_train.checkpoint import CheckpointManager
from sessa_train.config import TrainConfig, architecture_difference
from sessa_train.data import PackedTokenLoader, merge_states
from sessa_train.distributed import DistInfo
from sessa_train.errors import TrainError
from sessa_train.flops import train_flops_per_token
from sessa_train.trainer.build import build_engine, build_loader, initial_weights, loader_args, rank_layout
from sessa_train.trainer.metrics import MetricsSink


class Trainer:
    def __init__(self, cfg: TrainConfig, info: DistInfo) -> None:
        self.cfg, self.dist = cfg, info
        self.layout = rank_layout(cfg, info)
        self.train_loader = build_loader(cfg, self.layout)
        index = self.train_loader.index
        self.seq_len = index["seq_len"]
        self.has_val = cfg.logging.eval_every_steps > 0 and index["splits"].get("val", {}).get("samples", 0) > 0
        weights = initial_weights(cfg) if cfg.checkpoint.init_from else None
        self.engine = build_engine(cfg, info, self.layout, self.seq_len, weights)
        self.flops_per_token = train_flops_per_token(cfg.model, self.seq_len)
        par = cfg.parallel
        layout = {"ranks": info.world_size, "tensor": par.tensor, "pipeline": par.pipeline, "context": par.context}
        self.checkpoints = CheckpointManager(cfg.checkpoint.dir, cfg.checkpoint.keep_last, info.rank, layout)
        self.metrics = MetricsSink(cfg.logging.dir, info.is_main)
        self.step, self.tokens, self.first_step = 0, 0, 0
        self.stop_signal: int | None = None

    # -- state -------------------------------------------------------------------------
    def resume(self) -> None:
        self.checkpoints.clear_partial()
        comm.barrier()
        path = self.checkpoints.resolve(self.cfg.checkpoint.resume)
        if path is None:
            if self.cfg.checkpoint.resume == "auto":
                self.metrics.print(f"no complete checkpoint in {self.cfg.checkpoint.dir}: starting from scratch")
            return
        if differ := architecture_difference(self.checkpoints.saved_config(path)["model"], self.cfg.model):
            raise TrainError(f"{path} holds a model with {differ}")
        client = self.checkpoints.load(self.engine.ds, path)
        self.step, self.tokens = client["step"], client["tokens"]
        self.train_loader.load_state_dict(client["loader"])
        self.metrics.print(f"resumed from {path} at step {self.step}")

    def save(self) -> None:
        states = comm.all_gather_objects(self.train_loader.state_dict())
        client = {
            "step": self.step,
            "tokens": self.tokens,
            "loader": merge_states(states),
            "config": self.cfg.to_dict(),
        }
        path = self.checkpoints.save(self.engine.ds, self.step, client)
        self.metrics.print(f"saved {path}")

    def evaluate(self) -> float:
        loader = PackedTokenLoader(
            self.cfg.data.path, "val", shuffle=False, max_epochs=1, **loader_args(self.cfg, self.layout)
        )
        return self.engine.evaluate(list(itertools.islice(loader, self.cfg.logging.eval_batches)))

    # -- loop ----------------------------------------------------------------------------
    def fit(self) -> list[float]:
        cfg = self.cfg
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: setattr(self, "stop_signal", signum))
        self.resume()
        self.metrics.print(
            f"Sessa LM {self.engine.n_params / 1e6:.2f}M parameters, {self.dist.world_size} ranks, "
            f"{self.engine.gas} accumulation steps, seq_len {self.seq_len}, steps {self.step} -> "
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
            loss, applied = self.engine.train_step(batches)
            step_time = time.perf_counter() - t0
            self.step += 1
            self.tokens += tokens_per_step
            losses.append(loss)
            bad = 0 if applied else bad + 1
            if bad:
                self.metrics.print(
                    f"step {self.step}: loss {loss} or its gradients not finite: update skipped ({bad} in a row)"
                )
                if bad >= cfg.logging.max_bad_steps:
                    raise TrainError(
                        f"{bad} consecutive steps with non-finite loss or gradients at step {self.step}: aborting; "
                        "lower optimizer.lr or resume from an earlier checkpoint"
                    )
            val = None
            if self.has_val and self.step % cfg.logging.eval_every_steps == 0:
                val = self.evaluate()
                perplexity = math.exp(min(val, 50))
                self.metrics.print(f"step {self.step}: validation loss {val:.4f}, perplexity {perplexity:.2f}")
                self.metrics.scalars(self.step, {"val/loss": val, "val/perplexity": perplexity})
            self._log_step(loss, step_time, tokens_per_step, start, skipped=bool(bad), val=val)
            # a skipped step left the weights as they were: its checkpoint is safe to publish
            if cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0:
                self.save()
                last_saved = self.step
        if self.stop_signal is not None:
            self.metrics.print(f"received signal {self.stop_signal}: saving and stopping at step {self.step}")
        if last_saved != self.step:
            self.save()
        self.metrics.close()
        return losses

    def _log_step(
        self, loss: float, step_time: float, tokens_per_step: int, start: float, skipped: bool, val: float | None
    ) -> None:
        cfg = self.cfg
        lr = self.engine.scheduler.get_last_lr()[0]
        tok_s = tokens_per_step / step_time
        tflops = self.flops_per_token * tok_s / self.dist.world_size / 1e12
        scalars = {
            "train/loss": loss,
            "train/lr": lr,
            "train/grad_norm": self.engine.ds.get_global_grad_norm() or 0.0,
            "perf/tokens_per_s": tok_s,
            "perf/step_time_s": step_time,
            "perf/tflops_per_s_per_device": tflops,
        }
        if cfg.logging.peak_tflops > 0:
            scalars["perf/mfu"] = tflops / cfg.logging.peak_tflops
        if self.dist.device.type == "cuda":
            scalars["perf/max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        self.metrics.scalars(self.step, scalars)
        row = {"step": self.step, "loss": loss, "lr": lr, "tokens": self.tokens, "step_time_s": step_time}
        row |= {"tokens_per_s": tok_s, "skipped": skipped}
        if val is not None:
            row["val_loss"] = val
        self.metrics.row(row)
        if self.step % cfg.logging.every_steps == 0 or self.step == cfg.schedule.train_steps:
            mean_step = (time.perf_counter() - start) / max(1, self.step - self.first_step)
            eta = (cfg.schedule.train_steps - self.step) * mean_step
            self.metrics.print(
                f"step {self.step}/{cfg.schedule.train_steps}  loss {loss:.4f}  lr {lr:.2e}  "
                f"{tok_s:,.0f} tok/s  {step_time:.2f}s/step  eta {eta:.0f}s"
            )
