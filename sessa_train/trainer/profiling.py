"""``logging.profile_steps: [start, end]``: a torch.profiler trace of those steps.

Every rank writes ``<logging.dir>/profile/<host>_<pid>.*.pt.trace.json`` (tensorboard's profiler
plugin and chrome://tracing / Perfetto read it) and, on a GPU, a CUDA memory snapshot
``memory_rank<r>.pickle`` (https://pytorch.org/memory_viz). The work is labelled with
``torch.profiler.record_function``: ``sessa.solve`` (the feedback solve), ``sessa.attention``
(the forward branch's attention core), ``sessa.mlp``, ``sessa.optimizer`` (the optimizer step) and
``sessa.communication`` (every collective and point-to-point call of the package).

The profiler library (kineto) writes a ``USDT: ... profiler_start`` / ``profiler_stop`` line to
stderr at each start and stop whatever ``KINETO_LOG_LEVEL`` says; those two lines are dropped,
anything else written to stderr meanwhile is passed on.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch


@contextlib.contextmanager
def _without_usdt_lines() -> Iterator[None]:
    """Runs the block with file descriptor 2 in a temporary file, then writes what it holds to
    stderr, less the lines kineto starts with ``USDT:``."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            lines = held.read().decode(errors="replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines if not line.startswith("USDT:")))
            sys.stderr.flush()


class StepProfiler:
    """Starts a profiler before step ``start`` and writes its trace after step ``end``."""

    def __init__(self, steps: list[int], log_dir: str | Path, rank: int, device: torch.device) -> None:
        self.start, self.end = (steps[0], steps[1]) if steps else (0, -1)
        self.out, self.rank, self.cuda = Path(log_dir) / "profile", rank, device.type == "cuda"
        self.profiler: torch.profiler.profile | None = None

    def before(self, step: int) -> None:
        """Called before step ``step`` (1-based) runs."""
        if step != self.start:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.memory._record_memory_history(max_entries=100_000)
        self.profiler = torch.profiler.profile(
            activities=activities, on_trace_ready=torch.profiler.tensorboard_trace_handler(str(self.out))
        )
        with _without_usdt_lines():
            self.profiler.__enter__()

    def after(self, step: int) -> None:
        """Called after step ``step`` has run."""
        if step == self.end:
            self.close()

    def close(self) -> None:
        """Write the trace of what was profiled (the run may end before ``end``: a stop, a signal)."""
        if self.profiler is None:
            return
        with _without_usdt_lines():
            self.profiler.__exit__(None, None, None)
        self.profiler = None
        if self.cuda:
            torch.cuda.memory._dump_snapshot(str(self.out / f"memory_rank{self.rank}.pickle"))
            torch.cuda.memory._record_memory_history(enabled=None)
