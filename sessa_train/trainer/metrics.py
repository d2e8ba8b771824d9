"""Where a run's numbers go: one dict of named scalars per step, handed to every sink.

Names are written once, by the trainer (``train/loss``, ``perf/tokens_per_s``, ``val/loss``, ...),
and every sink takes the same dict: ``metrics.jsonl`` (one JSON row per step: ``step``, the
scalars, and the step's extras such as ``sample_ids``), tensorboard, and wandb when
``logging.wandb.project`` is set (``mode`` online, offline or disabled). Only the main rank writes;
on other ranks every call does nothing.

``Metrics`` is the checkpoint part ``metrics``: a resumed run drops the rows and scalars of steps
after its checkpoint (an earlier job wrote them, and they are computed again), so that each step
appears once, and continues the same wandb run; a run that starts from scratch moves an existing
metrics.jsonl aside (``metrics.jsonl.<time>``) and hides older tensorboard steps.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Protocol

from sessa_train.config import LoggingConfig

log = logging.getLogger("sessa_train")


class Sink(Protocol):
    def log(self, step: int, scalars: dict[str, float], extras: dict) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """metrics.jsonl: one row per step, and event rows (a resume marker) between them."""

    def __init__(self, path: Path, resumed_step: int) -> None:
        if resumed_step == 0 and path.is_file() and path.stat().st_size:
            path.rename(path.with_name(f"{path.name}.{time.strftime('%Y%m%d-%H%M%S')}"))
        elif path.is_file():
            kept = [line for line in path.read_text().splitlines(keepends=True) if _step(line) <= resumed_step]
            path.write_text("".join(kept))
        self.rows = open(path, "a")  # noqa: SIM115 (closed in close())

    def log(self, step: int, scalars: dict[str, float], extras: dict) -> None:
        self.write({"step": step, **scalars, **extras})

    def write(self, row: dict) -> None:
        self.rows.write(json.dumps(row) + "\n")
        self.rows.flush()

    def close(self) -> None:
        self.rows.close()


class TensorboardSink:
    def __init__(self, log_dir: Path, resumed_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir), purge_step=resumed_step + 1)

    def log(self, step: int, scalars: dict[str, float], extras: dict) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """A wandb run in ``log_dir/wandb`` (``run_id``: the run a resumed job continues)."""

    def __init__(self, cfg: LoggingConfig, run_name: str, config: dict, run_id: str | None) -> None:
        import wandb

        self.run = wandb.init(
            project=cfg.wandb.project,
            entity=cfg.wandb.entity or None,
            mode=cfg.wandb.mode,
            dir=str(cfg.dir),
            name=run_name,
            id=run_id,
            resume="allow" if run_id else None,
            config=config,
        )
        self.run_id = self.run.id

    def log(self, step: int, scalars: dict[str, float], extras: dict) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class Metrics:
    """Every sink of the run (on the main rank), and the checkpoint part ``metrics``."""

    def __init__(self, cfg: LoggingConfig, enabled: bool, run_name: str = "run", config: dict | None = None) -> None:
        self.cfg, self.enabled, self.run_name, self.config = cfg, enabled, run_name, config or {}
        self.sinks: list[Sink] = []
        self.jsonl: JsonlSink | None = None
        self.wandb_id: str | None = None

    # -- the checkpoint part ----------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"wandb_run_id": self.wandb_id}

    def load_state_dict(self, state: dict) -> None:
        self.wandb_id = state.get("wandb_run_id")

    # -- sinks ------------------------------------------------------------------------------
    def open(self, resumed_step: int) -> None:
        """Start every sink; a resumed run's from its checkpoint's step."""
        if not self.enabled:
            return
        log_dir = Path(self.cfg.dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = JsonlSink(log_dir / "metrics.jsonl", resumed_step)
        self.sinks = [self.jsonl, TensorboardSink(log_dir, resumed_step)]
        if self.cfg.wandb.project:
            sink = WandbSink(self.cfg, self.run_name, self.config, self.wandb_id if resumed_step else None)
            self.wandb_id = sink.run_id
            self.sinks.append(sink)

    def log(self, step: int, scalars: dict[str, float], extras: dict | None = None) -> None:
        """One step's scalars (every sink) and extras (metrics.jsonl only)."""
        for sink in self.sinks:
            sink.log(step, scalars, extras or {})

    def event(self, row: dict) -> None:
        """A row of metrics.jsonl that is not a step's (a resume marker)."""
        if self.jsonl:
            self.jsonl.write(row)

    def print(self, message: str) -> None:
        if self.enabled:
            log.info(message)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks, self.jsonl = [], None


def _step(line: str) -> float:
    """The step of a metrics.jsonl line (a torn last line counts as after every step)."""
    try:
        return json.loads(line).get("step", 0)
    except ValueError:
        return float("inf")
