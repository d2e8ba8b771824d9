"""The training loop: steps, validation, checkpoints, signals and metrics of one run.

A run resumes a checkpoint saved under any parallel layout (``trainer/state.py``): the same
weights, AdamW moments, step counts, schedule and global batches go on under this job's layout.
Stopping (SIGTERM/SIGINT, or the loader told to stop) is agreed by every rank between steps, so
that all of them save the same step.
"""

from __future__ import annotations

import itertools
import math
import signal
import time
from pathlib import Path

import torch

from sessa_train import distributed as comm
from sessa_train.checkpoint import CheckpointManager, ParamReader, read_config, read_meta, rng_file, set_rng
from sessa_train.config import TrainConfig, architecture_difference
from sessa_train.data import PackedTokenLoader, StopRequestedError, find_tokenizer, merge_loader_states
from sessa_train.distributed import DistInfo
from sessa_train.errors import DataError, TrainError
from sessa_train.flops import train_flops_per_token
from sessa_train.hardware import peak_tflops
from sessa_train.trainer.build import build_engine, build_loader, initial_weights, loader_args, rank_layout
from sessa_train.trainer.metrics import MetricsSink
from sessa_train.trainer.optim import precision
from sessa_train.trainer.state import optimizer_steps, restore_model, restore_schedule, write_model, write_rng

DATA_IDENTITY = ("index_sha256", "seq_len", "tokenizer_sha256")


def layout_phrase(layout: dict) -> str:
    return ",".join(f"{k}={layout[k]}" for k in ("tensor", "pipeline", "context", "data", "zero"))


class Trainer:
    def __init__(self, cfg: TrainConfig, info: DistInfo) -> None:
        self.cfg, self.dist = cfg, info
        self.stop_signal: int | None = None
        self.layout = rank_layout(cfg, info)
        # the ranks of a tensor x pipeline x context group read the same data: the first speaks for it
        mp = self.layout.model_parallel
        self.data_rank_of_record = mp is None or (mp.tp_rank, mp.pp_rank, mp.cp_rank) == (0, 0, 0)
        par = cfg.parallel
        self.layout_record = {
            "ranks": info.world_size,
            "tensor": par.tensor,
            "pipeline": par.pipeline,
            "context": par.context,
            "data": self.layout.dp,
            "zero": par.zero_stage,
        }
        ck = cfg.checkpoint
        self.checkpoints = CheckpointManager(ck.dir, ck.keep_last, info.rank, info.world_size, self.print)
        self.checkpoints.check_writable()
        self.checkpoints.clear_partial()
        comm.barrier()
        self.resume_from = self.checkpoints.resolve(cfg.checkpoint.resume, cfg.checkpoint.resume_older)
        meta = read_meta(self.resume_from) if self.resume_from else None
        if meta and (differ := architecture_difference(read_config(self.resume_from)["model"], cfg.model)):
            raise TrainError(f"{self.resume_from} holds a model with {differ}")
        slots = meta["loader"]["slots"] if meta else None
        if meta:
            self._check_blend(meta["loader"])
        if slots and cfg.data.reader_slots and cfg.data.reader_slots != slots:
            raise DataError(
                f"data.reader_slots={cfg.data.reader_slots}, but {self.resume_from.name} was read with {slots} "
                f"reader slots, which a run keeps for its lifetime; set data.reader_slots={slots} or 0"
            )
        stop = lambda: self.stop_signal is not None  # noqa: E731
        self.train_loader = build_loader(cfg, self.layout, slots, stop)
        index = self.train_loader.index
        self.seq_len = index["seq_len"]
        self.data_identity = {
            "index_sha256": self.train_loader.index_sha256,
            "seq_len": self.seq_len,
            "tokenizer_sha256": index["tokenizer_sha256"],
            "path": ", ".join(f"{w} {Path(p).resolve()}" for w, p in cfg.data.sources)
            if cfg.data.blend
            else str(Path(cfg.data.path).resolve()),
        }
        if meta:
            self._check_data(meta["data"])
        self.tokenizer = find_tokenizer(cfg.data.sources[0][1], index, cfg.data.tokenizer)
        self.has_val = cfg.logging.eval_every_steps > 0 and index["splits"].get("val", {}).get("samples", 0) > 0
        weights = initial_weights(cfg) if cfg.checkpoint.init_from and not meta else None
        self.engine = build_engine(cfg, info, self.layout, self.seq_len, weights)
        self.flops_per_token = train_flops_per_token(cfg.model, self.seq_len)
        device = self.dist.device
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        self.peak_tflops = cfg.logging.peak_tflops or peak_tflops(name, precision(cfg, device))
        self.step, self.tokens, self.first_step = 0, 0, 0
        if meta:
            self._restore(meta)
        self.unreadable = self.seen_skipped = len(self.train_loader.skipped)  # shards found unreadable
        self.metrics = MetricsSink(cfg.logging.dir, info.is_main, resumed_step=self.step)
        if meta:
            marker = {"event": "resume", "step": self.step, "checkpoint": str(self.resume_from)}
            self.metrics.row(marker | {"layout": self.layout_record})
        elif cfg.checkpoint.resume == "auto":
            self.print(f"no checkpoint in {cfg.checkpoint.dir}: starting from scratch")
        if self.tokenizer is None:
            self.print(f"no tokenizer found for {cfg.data.path} (data.tokenizer): checkpoints will not carry one")

    def print(self, message: str) -> None:
        if self.dist.is_main:
            print(message, flush=True)

    # -- state -------------------------------------------------------------------------
    def _check_blend(self, saved: dict) -> None:
        """A run keeps its blend (or its single data.path) and the blend's weights for its lifetime."""
        weights = [w for w, _ in self.cfg.data.sources] if self.cfg.data.blend else None
        if saved.get("weights") != weights:
            was = f"a blend with weights {saved['weights']}" if "weights" in saved else "one data.path"
            now = f"data.blend with weights {weights}" if weights else "one data.path"
            raise DataError(f"{self.resume_from.name} was read from {was}; this run has {now}")

    def _check_data(self, saved: dict) -> None:
        for key in DATA_IDENTITY:
            if saved[key] != self.data_identity[key]:
                raise DataError(
                    f"{self.resume_from.name} was trained on other data: its {key}={saved[key]} differs from "
                    f"{self.data_identity[key]} of data.path={self.cfg.data.path} (it read {saved['path']}); point "
                    "data.path at those shards, or export the checkpoint and start from it with checkpoint.init_from"
                )

    def _restore(self, meta: dict) -> None:
        """Weights, moments, step counts, schedule and data position of ``self.resume_from``."""
        path, saved = self.resume_from, meta["layout"]
        if saved != self.layout_record:
            self.print(f"resharding {path.name} from {layout_phrase(saved)} to {layout_phrase(self.layout_record)}")
        reader = ParamReader(path, self.cfg.model, saved["tensor"], saved["pipeline"])
        restore_model(self.engine, reader, meta["optimizer_steps"])
        restore_schedule(self.engine.scheduler, meta["scheduler_steps"])
        for counter, value in meta["engine"].items():  # global_steps, global_samples, skipped_steps
            setattr(self.engine.ds, counter, value)
        self.train_loader.load_state_dict(meta["loader"])
        self.step, self.tokens = meta["step"], meta["tokens"]
        if saved == self.layout_record:  # nothing in a step draws random numbers; kept for exactness
            from safetensors.torch import load_file

            set_rng(load_file(str(rng_file(path, self.dist.rank))))
        self.print(f"resumed from {path} at step {self.step}")

    def save(self) -> None:
        loader = merge_loader_states(comm.all_gather_objects(self.train_loader.state_dict()))
        ds = self.engine.ds
        meta = {
            "step": self.step,
            "tokens": self.tokens,
            "optimizer_steps": optimizer_steps(self.engine),
            "scheduler_steps": self.engine.scheduler.last_epoch,
            "engine": {k: getattr(ds, k) for k in ("global_steps", "global_samples", "skipped_steps")},
            "layout": self.layout_record,
            "data": self.data_identity,
            "loader": loader,
        }

        def write(folder: Path) -> list[Path]:
            return [*write_model(self.engine, folder), write_rng(folder, self.dist.rank)]

        path = self.checkpoints.save(self.step, write, meta, self.cfg.to_dict(), self.tokenizer)
        self.print(f"saved {path}")

    def evaluate(self) -> float:
        loader = PackedTokenLoader(
            self.cfg.data.sources[0][1], "val", shuffle=False, max_epochs=1, **loader_args(self.cfg, self.layout)
        )
        return self.engine.evaluate(list(itertools.islice(loader, self.cfg.logging.eval_batches)))

    def _next_step(self, stream) -> list[dict] | None:
        """The micro-batches of the next step, or None when any rank is to stop (a signal, or its
        loader told to stop): agreed by all ranks before anything of the step runs."""
        try:
            batches = [next(stream) for _ in range(self.engine.gas)]
        except StopRequestedError:
            batches = None
        stopping = batches is None or self.stop_signal is not None
        # shards found unreadable since the last step (each read by one data-parallel rank)
        new = len(self.train_loader.skipped) - self.seen_skipped
        self.seen_skipped += new
        agreed = comm.sum_values([float(stopping), float(new if self.data_rank_of_record else 0)]).tolist()
        self.unreadable += int(agreed[1])
        if agreed[0] > 0:
            self.train_loader.rewind()
            return None
        return batches

    # -- loop ----------------------------------------------------------------------------
    def fit(self) -> list[float]:
        cfg = self.cfg
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: setattr(self, "stop_signal", signum))
        self.metrics.print(
            f"Sessa LM {self.engine.n_params / 1e6:.2f}M parameters, {self.dist.world_size} ranks, "
            f"{self.engine.gas} accumulation steps, seq_len {self.seq_len}, {self.train_loader.slots} reader slots, "
            f"steps {self.step} -> {cfg.schedule.train_steps}, tensorboard: {cfg.logging.dir}"
        )
        stream = iter(self.train_loader)
        losses, bad, start, last_saved = [], 0, time.perf_counter(), self.step
        self.first_step = self.step
        tokens_per_step = cfg.schedule.global_batch_size * self.seq_len
        stop_at = cfg.schedule.train_steps
        if cfg.schedule.stop_after_steps:
            stop_at = min(stop_at, self.step + cfg.schedule.stop_after_steps)
        while self.step < stop_at:
            batches = self._next_step(stream)
            if batches is None:
                break
            t0 = time.perf_counter()
            loss, applied, grad_norm = self.engine.train_step(iter(batches))
            step_time = time.perf_counter() - t0
            ids = self._sample_ids(batches) if cfg.logging.sample_ids else None
            self.train_loader.advance()
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
            self._log_step(loss, grad_norm, step_time, tokens_per_step, start, skipped=bool(bad), val=val, ids=ids)
            # a skipped step left the weights as they were: its checkpoint is safe to publish
            if cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0:
                self.save()
                last_saved = self.step
        if self.step < stop_at:
            why = f"signal {self.stop_signal}" if self.stop_signal is not None else "the data loader's stop"
            self.metrics.print(f"stopping at step {self.step} on {why}: saving")
        if last_saved != self.step:
            self.save()
        self.metrics.close()
        return losses

    def _sample_ids(self, batches: list[dict]) -> list[int]:
        """The step's global batch: every data-parallel rank's sample ids, sorted."""
        mine = [i for b in batches for i in b["sample_ids"].tolist()] if self.data_rank_of_record else []
        return sorted(i for ids in comm.all_gather_objects(mine) for i in ids)

    def _log_step(
        self,
        loss: float,
        grad_norm: float,
        step_time: float,
        tokens_per_step: int,
        start: float,
        skipped: bool,
        val: float | None,
        ids: list[int] | None,
    ) -> None:
        cfg = self.cfg
        lr = self.engine.scheduler.get_last_lr()[0]
        tok_s = tokens_per_step / step_time
        tflops = self.flops_per_token * tok_s / self.dist.world_size / 1e12
        unreadable = self.unreadable
        scalars = {
            "train/loss": loss,
            "train/lr": lr,
            "train/grad_norm": grad_norm,
            "data/skipped_shards": unreadable,
            "perf/tokens_per_s": tok_s,
            "perf/step_time_s": step_time,
            "perf/tflops_per_s_per_device": tflops,
        }
        if self.peak_tflops:
            scalars["perf/mfu"] = tflops / self.peak_tflops
        sources = getattr(self.train_loader, "source_tokens", dict)()  # a blend's tokens per shard set
        scalars |= {f"data/tokens/source_{i}": n for i, n in enumerate(sources.values())}  # in blend order
        if self.dist.device.type == "cuda":
            scalars["perf/max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        self.metrics.scalars(self.step, scalars)
        row = {"step": self.step, "loss": loss, "grad_norm": grad_norm, "lr": lr, "tokens": self.tokens}
        row |= {"step_time_s": step_time, "tokens_per_s": tok_s, "tflops_per_s_per_device": tflops}
        row |= {"skipped": skipped, "skipped_shards": unreadable}
        if self.peak_tflops:
            row["mfu"] = tflops / self.peak_tflops
        if sources:
            row["source_tokens"] = sources
        if val is not None:
            row["val_loss"] = val
        if ids is not None:
            row["sample_ids"] = ids
        self.metrics.row(row)
        if self.step % cfg.logging.every_steps == 0 or self.step == cfg.schedule.train_steps:
            mean_step = (time.perf_counter() - start) / max(1, self.step - self.first_step)
            eta = (cfg.schedule.train_steps - self.step) * mean_step
            self.metrics.print(
                f"step {self.step}/{cfg.schedule.train_steps}  loss {loss:.4f}  grad norm {grad_norm:.3f}  "
                f"lr {lr:.2e}  {tok_s:,.0f} tok/s  {tflops:.3g} TFLOP/s per device"
                + (f"  MFU {tflops / self.peak_tflops:.1%}" if self.peak_tflops else "")
                + f"  {step_time:.2f}s/step  eta {eta:.0f}s"
            )
