"""The training loop: steps, validation, checkpoints, signals and metrics of one run.

A run's state is its parts (``parts``: the model and optimizer through the engine, the RNG, the
data position, the metrics sink; ``checkpoint/``), which ``checkpoint/manager.py`` saves and loads;
the loop itself keeps the step and token counters, which are the checkpoint's own record. A run
resumes a checkpoint saved under any parallel layout: the same weights, AdamW moments, step
counts, schedule and global batches go on under this job's layout. Stopping (SIGTERM/SIGINT, or
the loader told to stop) is agreed by every rank between steps, so that all of them save the
same step.
"""

from __future__ import annotations

import itertools
import logging
import math
import signal
import time
from pathlib import Path

import torch

from sessa_train import distributed as comm
from sessa_train import logs
from sessa_train.checkpoint import (
    CheckpointManager,
    DataIdentity,
    Layout,
    Meta,
    ModelState,
    Part,
    RunRecord,
    read_config,
    read_meta,
)
from sessa_train.checkpoint.loader import LoaderState
from sessa_train.checkpoint.rng import RngState
from sessa_train.config import TrainConfig, architecture_difference
from sessa_train.data import PackedTokenLoader, StopRequestedError, find_tokenizer
from sessa_train.distributed import DistInfo
from sessa_train.errors import DataError, TrainError, redact, redacted
from sessa_train.flops import train_flops_per_token
from sessa_train.hardware import peak_tflops
from sessa_train.trainer.build import build_engine, build_loader, initial_weights, loader_args, parallel_state
from sessa_train.trainer.fp32 import DeepSpeedFp32
from sessa_train.trainer.metrics import Metrics
from sessa_train.trainer.optim import precision
from sessa_train.trainer.profiling import StepProfiler

log = logging.getLogger("sessa_train")


def _restart_count() -> int:
    """How often this job's workers were started again: torchrun's restarts, Slurm's requeues."""
    import os

    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0) + int(os.environ.get("SLURM_RESTART_COUNT") or 0)


def _location(path: str) -> str:
    """A data path as the checkpoint records it: a URL as given (without credentials), a local
    folder absolute."""
    return redact(path) if "://" in path else str(Path(path).resolve())


def logging_problem(cfg) -> str | None:
    """Why the run's logging outputs could not start (one line), or None: logging.dir (and wandb's
    folder in it) must be a writable folder, and wandb online needs an API key."""
    import os

    folders = [Path(cfg.dir)] + ([Path(cfg.dir) / "wandb"] if cfg.wandb.project else [])
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            return f"logging.dir={cfg.dir} cannot be used as a folder ({e.strerror})"
        try:
            probe = folder / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            return f"logging.dir={cfg.dir}: {folder} cannot be written ({e.strerror})"
    if cfg.wandb.project and cfg.wandb.mode == "online" and not _wandb_key():
        return (
            f"logging.wandb.project={cfg.wandb.project} with mode online needs a wandb API key (wandb login, or "
            "WANDB_API_KEY); or set logging.wandb.mode=offline (sync later with wandb sync)"
        )
    return None


def _wandb_key() -> bool:
    """Whether wandb would find an API key: WANDB_API_KEY, or a netrc entry for its host."""
    import netrc
    import os

    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


class Trainer:
    def __init__(self, cfg: TrainConfig, info: DistInfo) -> None:
        self.cfg, self.dist = cfg, info
        logs.setup(info.rank)
        self.stop_signal: int | None = None
        self.stop_reason = ""
        self.data_error: str | None = None  # the data error that ends the run, as every rank raises it
        self.state = parallel_state(cfg, info)
        par = cfg.parallel
        self.layout = Layout(info.world_size, par.tensor, par.pipeline, par.context, self.state.dp, par.zero_stage)
        ck = cfg.checkpoint
        self.checkpoints = CheckpointManager(
            ck.dir, ck.keep_last, info.rank, info.world_size, self.print, background=ck.async_save
        )
        self.checkpoints.check_writable()
        self._check_log_dir()
        self.checkpoints.lock()  # before anything in the folder is touched: one run per folder
        self.checkpoints.clear_partial()
        comm.barrier()
        resume = ck.resume
        if resume == "none" and (restarted := _restart_count()):
            resume = "auto"  # a restarted worker group (torchrun) or a requeued job (Slurm) goes on
            self.print(f"restart {restarted} of this job: resuming from the newest complete checkpoint")
        self.resume_from = self.checkpoints.resolve(resume, ck.resume_older)
        self.last_checkpoint = self.resume_from  # then the folder of each save
        meta = read_meta(self.resume_from) if self.resume_from else None
        saved = read_config(self.resume_from) if meta else None
        if meta and (differ := architecture_difference(saved["model"], cfg.model)):
            raise TrainError(f"{self.resume_from} holds a model with {differ}")
        slots = self._saved_slots(meta) if meta else None
        stop = lambda: self.stop_signal is not None  # noqa: E731
        self.train_loader = build_loader(cfg, self.state, slots, stop)
        index = self.train_loader.index
        first = self.train_loader.loaders[0] if cfg.data.blend else self.train_loader
        self.val_index = (first.index, first.index_sha256)  # validation reads the first source's val split
        self.seq_len = index["seq_len"]
        sources = ", ".join(f"{w} {_location(p)}" for w, p in cfg.data.sources)
        self.data_identity = DataIdentity(
            index_sha256=self.train_loader.index_sha256,
            seq_len=self.seq_len,
            tokenizer_sha256=index["tokenizer_sha256"],
            path=sources if cfg.data.blend else _location(cfg.data.path),
        )
        if meta:
            self._check_data(meta.data)
        self.tokenizer = find_tokenizer(cfg.data.sources[0][1], index, cfg.data.tokenizer)
        self.has_val = cfg.logging.eval_every_steps > 0 and index["splits"].get("val", {}).get("samples", 0) > 0
        weights = initial_weights(cfg, index["tokenizer_sha256"]) if ck.init_from and not meta else None
        self.engine = build_engine(cfg, info, self.state, self.seq_len, weights)
        self.flops_per_token = train_flops_per_token(cfg.model, self.seq_len)
        device = info.device
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        self.peak_tflops = cfg.logging.peak_tflops or peak_tflops(name, precision(cfg, device))
        self.record = redacted(cfg.to_dict())  # the config as checkpoints and metrics record it
        self.metrics = Metrics(cfg.logging, info.is_main, Path(ck.dir).parent.name, self.record)
        self.parts: dict[str, Part] = {
            "model": ModelState(DeepSpeedFp32(self.engine), cfg.model, self.state),
            "rng": RngState(info.rank, self.layout),
            "loader": LoaderState(self.train_loader),
            "metrics": self.metrics,
        }
        self.checkpoints.attach(self.parts, RunRecord(self.layout, self.data_identity, self.record, self.tokenizer))
        self.engine.before_update = self.checkpoints.copied
        self.step, self.tokens, self.first_step = 0, 0, 0
        if meta:
            self._report_schedule_change(saved, meta.step)
            if meta.layout != self.layout:
                self.print(f"resharding {self.resume_from.name} from {meta.layout.phrase()} to {self.layout.phrase()}")
            self.checkpoints.load(self.resume_from)
            self.step, self.tokens = meta.step, meta.tokens
            read = self.parts["model"].read_report
            self.print(f"resumed from {self.resume_from} at step {self.step} ({read.phrase()})")
        self.unreadable = self.seen_skipped = len(self.train_loader.skipped)  # shards found unreadable
        self.metrics.open(self.step)
        if meta:
            marker = {"event": "resume", "step": self.step, "checkpoint": str(self.resume_from)}
            self.metrics.event(marker | {"layout": vars(self.layout), "read": vars(self.parts["model"].read_report)})
        elif resume == "auto":
            self.print(f"no checkpoint in {ck.dir}: starting from scratch")
        if self.tokenizer is None:
            where = redact(cfg.data.path)
            self.print(f"no tokenizer found for {where} (data.tokenizer): checkpoints will not carry one")

    def print(self, message: str) -> None:
        if self.dist.is_main:
            log.info(message)

    def _check_log_dir(self) -> None:
        """Collective: every logging output can start (``logging_problem``), now rather than after the
        model is built."""
        problem = None
        if self.dist.is_main:
            problem = logging_problem(self.cfg.logging)
        comm.raise_first(problem, TrainError)

    def _report_schedule_change(self, saved: dict, step: int) -> None:
        """One line when a resumed run's learning-rate schedule differs from the one it was saved with."""
        from sessa_train.config import load_config
        from sessa_train.trainer.optim import lr_lambda

        keys = [("optimizer", k) for k in ("lr", "min_lr")] + [
            ("schedule", k) for k in ("train_steps", "warmup_steps", "decay")
        ]
        now = {(s, k): getattr(getattr(self.cfg, s), k) for s, k in keys}
        changed = [f"{s}.{k} {saved[s][k]} -> {v}" for (s, k), v in now.items() if saved.get(s, {}).get(k, v) != v]
        if not changed:
            return
        before = load_config([], [f"{s}.{k}={saved[s][k]}" for s, k in keys])
        was = before.optimizer.lr * lr_lambda(before)(step)
        lr = self.cfg.optimizer.lr * lr_lambda(self.cfg)(step)
        self.print(
            f"resuming with {', '.join(changed)}: the learning rate at step {step} goes from {was:.3g} to {lr:.3g}, "
            f"and the schedule now ends at step {self.cfg.schedule.train_steps} with {self.cfg.optimizer.min_lr:.3g}"
        )

    # -- state -------------------------------------------------------------------------
    def _saved_slots(self, meta: Meta):
        """The reader slots the checkpoint's data was read with, which the run keeps."""
        state, data = meta.parts["loader"], self.cfg.data
        LoaderState.check_sources(state, [w for w, _ in data.sources] if data.blend else None, self.resume_from.name)
        slots = LoaderState.slots(state)
        if slots and data.reader_slots and data.reader_slots != slots:
            raise DataError(
                f"data.reader_slots={data.reader_slots}, but {self.resume_from.name} was read with {slots} "
                f"reader slots, which a run keeps for its lifetime; set data.reader_slots={slots} or 0"
            )
        return slots

    def _check_data(self, saved: DataIdentity) -> None:
        for key in ("index_sha256", "seq_len", "tokenizer_sha256"):
            if getattr(saved, key) != getattr(self.data_identity, key):
                raise DataError(
                    f"{self.resume_from.name} was trained on other data: its {key}={getattr(saved, key)} differs from "
                    f"{getattr(self.data_identity, key)} of data.path={self.cfg.data.path} (it read {saved.path}); "
                    "point data.path at those shards, or export the checkpoint and start from it with "
                    "checkpoint.init_from"
                )

    def save(self, background: bool | None = None) -> Path:
        """Collective: a checkpoint of this step (``checkpoint.async_save``: written in the
        background, unless ``background=False``); the folder it is published as."""
        background = self.cfg.checkpoint.async_save if background is None else background
        start = time.perf_counter()
        path = self.last_checkpoint = self.checkpoints.save(self.step, self.tokens, background=background)
        blocking = f"{time.perf_counter() - start:.2f} s blocking the step"
        if self.checkpoints.waited >= 0.01:
            blocking += f", {self.checkpoints.waited:.2f} s of it waiting for the save before"
        self.print(f"saving {path.name} in the background ({blocking})" if background else f"saved {path} ({blocking})")
        return path

    def evaluate(self) -> float:
        loader = PackedTokenLoader(self.cfg.data.sources[0][1], "val", shuffle=False, max_epochs=1,
                                   index=self.val_index, **loader_args(self.cfg, self.state))  # fmt: skip
        return self.engine.evaluate(list(itertools.islice(loader, self.cfg.logging.eval_batches)))

    def _next_step(self, stream) -> list[dict] | None:
        """The micro-batches of the next step, or None when any rank is to stop (a signal, or its
        loader told to stop): agreed by all ranks before anything of the step runs."""
        data_error = None
        try:
            batches = [next(stream) for _ in range(self.engine.gas)]
        except StopRequestedError:
            batches = None
        except DataError as e:  # a shard that cannot be read: the run ends, after a checkpoint of the last step
            batches, data_error = None, str(e)
        stopping = batches is None or self.stop_signal is not None
        # shards found unreadable since the last step (each read by one data-parallel rank), and
        # the signal each rank received (so that the stop can name it and the rank)
        new = len(self.train_loader.skipped) - self.seen_skipped
        self.seen_skipped += new
        signals = [0.0] * self.dist.world_size
        signals[self.dist.rank] = float(self.stop_signal or 0)
        agreed = comm.sum_values(
            [float(stopping), float(new if self.state.data_rank_of_record else 0), float(data_error is not None),
             *signals]
        ).tolist()  # fmt: skip
        self.unreadable += int(agreed[1])
        if agreed[2] > 0:  # every rank learns the error, saves with the others, then raises it
            self.data_error = comm.first_problem(data_error)
            self.stop_reason = "a data error"
            self.train_loader.rewind()
            return None
        if agreed[0] > 0:
            self.stop_reason = next(
                (f"{signal.Signals(int(sig)).name} received by rank {r}" for r, sig in enumerate(agreed[3:]) if sig),
                "the data loader's stop",
            )
            self.train_loader.rewind()
            return None
        return batches

    # -- loop ----------------------------------------------------------------------------
    def fit(self) -> list[float]:
        """Train to the end of the schedule (or a stop); the losses of this job's steps."""
        try:
            return self._fit()
        except BaseException:
            self.checkpoints.wait(raising=False)  # a save in flight ends (and publishes, if it can) first
            raise

    def _fit(self) -> list[float]:
        cfg = self.cfg
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):  # USR1: Slurm's warning before preemption
            signal.signal(sig, lambda signum, frame: setattr(self, "stop_signal", signum))
        self.metrics.print(
            f"{cfg.model.arch} LM {self.engine.n_params / 1e6:.2f}M parameters, {self.dist.world_size} ranks, "
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
        profiler = StepProfiler(cfg.logging.profile_steps, cfg.logging.dir, self.dist.rank, self.dist.device)
        while self.step < stop_at:
            batches = self._next_step(stream)
            if batches is None:
                break
            profiler.before(self.step + 1)
            t0 = time.perf_counter()
            loss, applied, grad_norm = self.engine.train_step(iter(batches))
            step_time = time.perf_counter() - t0
            profiler.after(self.step + 1)
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
            scalars = self._step_scalars(loss, grad_norm, step_time, tokens_per_step, skipped=bool(bad))
            if self.has_val and self.step % cfg.logging.eval_every_steps == 0:
                val = self.evaluate()
                scalars |= {"val/loss": val, "val/perplexity": math.exp(min(val, 50))}
                self.metrics.print(
                    f"step {self.step}: validation loss {val:.4f}, perplexity {scalars['val/perplexity']:.2f}"
                )
            lm = cfg.logging.lm_eval
            if lm.every_steps and self.step % lm.every_steps == 0:
                if last_saved != self.step:
                    self.save()
                    last_saved = self.step
                self.checkpoints.wait()  # the evaluation reads the published checkpoint
                scalars |= self._lm_eval(self.last_checkpoint)
            extras = {"sample_ids": ids} if ids is not None else {}
            if sources := getattr(self.train_loader, "source_tokens", dict)():  # a blend's tokens by shard set
                extras["source_tokens"] = sources
            self.metrics.log(self.step, scalars, extras)
            self._progress(scalars, start)
            # a skipped step left the weights as they were: its checkpoint is safe to publish
            if cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0:
                self.save()
                last_saved = self.step
        profiler.close()  # a run stopped inside the profiled steps still writes their trace
        if self.step < stop_at:
            self.metrics.print(f"stopping at step {self.step} on {self.stop_reason}: saving")
        if last_saved != self.step:
            self.save(background=False)
        self.checkpoints.wait()
        self.metrics.close()
        self.checkpoints.unlock()
        if self.data_error:
            saved = f"the run stopped at step {self.step}, saved in {self.cfg.checkpoint.dir}"
            raise DataError(f"{self.data_error} ({saved})")
        return losses

    def _lm_eval(self, path: Path) -> dict[str, float]:
        """Collective: rank 0 runs lm-evaluation-harness on the step's checkpoint ``path`` (the
        others wait); its scalars, as every rank sees them."""
        from sessa_train.evaluation.harness import evaluate, scalars_of

        scalars = {}
        if self.dist.is_main:
            lm = self.cfg.logging.lm_eval
            results, out, _ = evaluate(
                path, list(lm.tasks), batch_size=lm.batch_size, limit=lm.limit, device=self.dist.device
            )
            scalars = scalars_of(results)
            self.print(
                f"step {self.step}: lm-eval " + ", ".join(f"{k} {v:.4f}" for k, v in scalars.items()) + f" ({out})"
            )
        return comm.all_gather_objects(scalars)[0]

    def _sample_ids(self, batches: list[dict]) -> list[int]:
        """The step's global batch: every data-parallel rank's sample ids, sorted."""
        mine = [i for b in batches for i in b["sample_ids"].tolist()] if self.state.data_rank_of_record else []
        return sorted(i for ids in comm.all_gather_objects(mine) for i in ids)

    def _step_scalars(
        self, loss: float, grad_norm: float, step_time: float, tokens_per_step: int, skipped: bool
    ) -> dict[str, float]:
        """The step's numbers, under the names every sink records."""
        tok_s = tokens_per_step / step_time
        tflops = self.flops_per_token * tok_s / self.dist.world_size / 1e12
        scalars = {
            "train/loss": loss,
            "train/lr": self.engine.scheduler.get_last_lr()[0],
            "train/grad_norm": grad_norm,
            "train/skipped": float(skipped),
            "train/tokens": float(self.tokens),
            "data/skipped_shards": float(self.unreadable),
            "perf/tokens_per_s": tok_s,
            "perf/step_time_s": step_time,
            "perf/tflops_per_s_per_device": tflops,
        }
        if self.peak_tflops:
            scalars["perf/mfu"] = tflops / self.peak_tflops
        sources = getattr(self.train_loader, "source_tokens", dict)()  # a blend's tokens per shard set
        scalars |= {f"data/tokens/source_{i}": float(n) for i, n in enumerate(sources.values())}  # in blend order
        if self.dist.device.type == "cuda":
            scalars["perf/max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return scalars

    def _progress(self, s: dict[str, float], start: float) -> None:
        cfg = self.cfg
        if self.step % cfg.logging.every_steps and self.step != cfg.schedule.train_steps:
            return
        mean_step = (time.perf_counter() - start) / max(1, self.step - self.first_step)
        eta = (cfg.schedule.train_steps - self.step) * mean_step
        self.metrics.print(
            f"step {self.step}/{cfg.schedule.train_steps}  loss {s['train/loss']:.4f}  grad norm "
            f"{s['train/grad_norm']:.3f}  lr {s['train/lr']:.2e}  {s['perf/tokens_per_s']:,.0f} tok/s  "
            f"{s['perf/tflops_per_s_per_device']:.3g} TFLOP/s per device"
            + (f"  MFU {s['perf/mfu']:.1%}" if "perf/mfu" in s else "")
            + f"  {s['perf/step_time_s']:.2f}s/step  eta {eta:.0f}s"
        )
