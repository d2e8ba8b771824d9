"""Where a run's numbers go: console lines, ``metrics.jsonl`` rows and tensorboard scalars.

Only the main rank writes; on other ranks every call does nothing. A resumed run drops the rows
and scalars of steps after its checkpoint (an earlier job wrote them, and they are computed
again), so that each step appears once; a run that starts from scratch moves an existing
metrics.jsonl aside (``metrics.jsonl.<time>``) and hides older tensorboard steps.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


class MetricsSink:
    def __init__(self, log_dir: str | Path, enabled: bool, resumed_step: int = 0) -> None:
        self.enabled, self.writer, self.rows = enabled, None, None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            path = Path(log_dir) / "metrics.jsonl"
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            if resumed_step == 0 and path.is_file() and path.stat().st_size:
                path.rename(path.with_name(f"{path.name}.{time.strftime('%Y%m%d-%H%M%S')}"))
            elif path.is_file():
                kept = [line for line in path.read_text().splitlines(keepends=True) if _step(line) <= resumed_step]
                path.write_text("".join(kept))
            self.writer = SummaryWriter(str(log_dir), purge_step=resumed_step + 1)
            self.rows = open(path, "a")  # noqa: SIM115 (closed in close())

    def print(self, message: str) -> None:
        if self.enabled:
            print(message, flush=True)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Tensorboard scalars, e.g. {"train/loss": 2.1}."""
        if self.writer:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def row(self, values: dict) -> None:
        """One JSON line of metrics.jsonl."""
        if self.rows:
            self.rows.write(json.dumps(values) + "\n")
            self.rows.flush()

    def close(self) -> None:
        if self.writer:
            self.writer.close()
            self.rows.close()


def _step(line: str) -> float:
    """The step of a metrics.jsonl line (a torn last line counts as after every step)."""
    try:
        return json.loads(line).get("step", 0)
    except ValueError:
        return float("inf")
