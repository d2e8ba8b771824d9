"""Where a run's numbers go: console lines, ``metrics.jsonl`` rows and tensorboard scalars.

Only the main rank writes; on other ranks every call does nothing.
"""

from __future__ import annotations

import json
from pathlib import Path


class MetricsSink:
    def __init__(self, log_dir: str | Path, enabled: bool) -> None:
        self.enabled, self.writer, self.rows = enabled, None, None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(log_dir))
            self.rows = open(Path(log_dir) / "metrics.jsonl", "a")  # noqa: SIM115 (closed in close())

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
