"""Sharded checkpoints (DeepSpeed's) written so that a crash never leaves one resume would use.

Layout under ``checkpoint.dir`` (on storage every rank can reach):

    step_00000100/            DeepSpeed model + per-rank ZeRO optimizer shards, our client
                              state (step, tokens, scheduler via DeepSpeed, loader state,
                              resolved config), rank{r:05d}.pt (that rank's RNG states) and
                              layout.json (ranks and tensor/pipeline/context sizes it was saved with)
    latest                    name of the newest complete checkpoint

Protocol: every rank writes into ``step_N.partial/``; after a barrier rank 0 renames it to
``step_N/``, replaces ``latest`` atomically and removes checkpoints beyond ``keep_last``.
A crash at any point leaves ``latest`` naming a complete checkpoint; ``*.partial`` folders
are ignored and cleared at the next start.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

STEP_DIR = re.compile(r"^step_(\d{8})$")


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    def __init__(self, root: str | Path, keep_last: int, rank: int, layout: dict[str, int] | None = None) -> None:
        self.root, self.keep_last, self.rank = Path(root), keep_last, rank
        self.layout = layout or {}  # e.g. {"ranks": 4, "tensor": 2, "pipeline": 2, "context": 1}

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.is_dir() and STEP_DIR.match(p.name))

    def clear_partial(self) -> None:
        """Rank 0 removes leftovers of an interrupted save (call before the first barrier)."""
        if self.rank == 0 and self.root.is_dir():
            for p in self.root.glob("*.partial"):
                shutil.rmtree(p, ignore_errors=True)

    def resolve(self, resume: str) -> Path | None:
        """The checkpoint to resume from: ``none``, ``auto`` (newest complete) or a path."""
        if resume == "none":
            return None
        if resume == "auto":
            latest = self.root / "latest"
            if latest.is_file():
                named = self.root / latest.read_text().strip()
                if STEP_DIR.match(named.name) and named.is_dir():
                    return named
            found = self.complete()
            return found[-1] if found else None
        path = Path(resume)
        if not (path.is_dir() and STEP_DIR.match(path.name) and (path / f"rank{0:05d}.pt").is_file()):
            raise ValueError(f"checkpoint.resume={resume!r} is not a complete checkpoint folder (step_NNNNNNNN)")
        return path

    def save(self, engine, step: int, client_state: dict) -> Path:
        """Collective: every rank calls it with the same ``step``."""
        name = f"step_{step:08d}"
        partial = self.root / f"{name}.partial"
        engine.save_checkpoint(str(self.root), tag=partial.name, client_state=client_state, save_latest=False)
        torch.save(rng_state(), partial / f"rank{self.rank:05d}.pt")
        if self.rank == 0:
            (partial / "layout.json").write_text(json.dumps(self.layout))
        dist.barrier()
        final = self.root / name
        if self.rank == 0:
            if final.exists():  # saved again at the same step (e.g. at exit right after a periodic save)
                shutil.rmtree(final)
            os.replace(partial, final)
            tmp = self.root / "latest.tmp"
            tmp.write_text(name)
            os.replace(tmp, self.root / "latest")
            for old in self.complete()[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
        return final

    def load(self, engine, path: Path) -> dict:
        """Restore engine state and this rank's RNG; returns the client state."""
        saved = path / "layout.json"
        if saved.is_file() and (found := json.loads(saved.read_text())) != self.layout:
            show = lambda d: ", ".join(f"{k}={v}" for k, v in d.items())  # noqa: E731
            raise ValueError(
                f"{path} was saved with {show(found)}; this run has {show(self.layout)}: resume with the saved "
                "layout, or export it (sessa-export) and start from the export with checkpoint.init_from"
            )
        rank_file = path / f"rank{self.rank:05d}.pt"
        if not rank_file.is_file():
            raise ValueError(f"{path} has no state for rank {self.rank}: it was saved with fewer ranks")
        _, client_state = engine.load_checkpoint(str(path.parent), tag=path.name)
        if client_state is None:
            raise ValueError(f"DeepSpeed could not load checkpoint {path}")
        set_rng_state(torch.load(rank_file, weights_only=False))
        return client_state
