"""The on-disk checkpoint format: writing, finding and reading checkpoints. Sharded (DeepSpeed's)
and written so that a crash never leaves one resume would use.

Layout under ``checkpoint.dir`` (on storage every rank can reach):

    step_00000100/            DeepSpeed model + per-rank ZeRO optimizer shards, our client
                              state (step, tokens, scheduler via DeepSpeed, loader state,
                              resolved config), rank{r:05d}.pt (that rank's RNG states),
                              layout.json (ranks and tensor/pipeline/context sizes it was saved with)
                              and config.json (the resolved config, readable before loading anything)
    latest                    name of the newest complete checkpoint

Protocol: every rank writes into ``step_N.partial/``; after a barrier rank 0 renames it to
``step_N/``, replaces ``latest`` atomically and removes checkpoints beyond ``keep_last``.
A crash at any point leaves ``latest`` naming a complete checkpoint; ``*.partial`` folders
are ignored and cleared at the next start.

Reading: ``find_checkpoint`` (a step folder, or a root whose ``latest`` names one),
``read_weights`` (the plain fp32 model weights and our client state, whatever the layout and
ZeRO stage) and ``module_state`` (DeepSpeed's module weights of one model-parallel rank). Export,
evaluation and the tests read checkpoints through these alone.
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

from sessa_train import distributed as comm
from sessa_train.config import ModelConfig
from sessa_train.errors import CheckpointError

STEP_DIR = re.compile(r"^step_(\d{8})$")
# DeepSpeed's module file of model-parallel rank m (ZeRO 0-2; ZeRO-3 holds placeholders only)
MODULE_FILE = "mp_rank_{:02d}_model_states.pt"
ZERO3_MODULE_FILE = "zero_pp_rank_0_mp_rank_00_model_states.pt"


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
            raise CheckpointError(f"checkpoint.resume={resume!r} is not a complete checkpoint folder (step_NNNNNNNN)")
        return path

    def save(self, engine, step: int, client_state: dict) -> Path:
        """Collective: every rank calls it with the same ``step``."""
        name = f"step_{step:08d}"
        partial = self.root / f"{name}.partial"
        engine.save_checkpoint(str(self.root), tag=partial.name, client_state=client_state, save_latest=False)
        torch.save(rng_state(), partial / f"rank{self.rank:05d}.pt")
        if self.rank == 0:
            (partial / "layout.json").write_text(json.dumps(self.layout))
            (partial / "config.json").write_text(json.dumps(client_state["config"], indent=1))
        comm.barrier()
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
        comm.barrier()
        return final

    @staticmethod
    def saved_config(path: Path) -> dict:
        """The resolved config a checkpoint was saved with (config.json; in checkpoints written
        before it existed, the client state of DeepSpeed's module file)."""
        if (path / "config.json").is_file():
            return json.loads((path / "config.json").read_text())
        return _load(path / MODULE_FILE.format(0))["config"]

    def load(self, engine, path: Path) -> dict:
        """Restore engine state and this rank's RNG; returns the client state."""
        saved = path / "layout.json"
        if saved.is_file() and (found := json.loads(saved.read_text())) != self.layout:
            show = lambda d: ", ".join(f"{k}={v}" for k, v in d.items())  # noqa: E731
            raise CheckpointError(
                f"{path} was saved with {show(found)}; this run has {show(self.layout)}: resume with the saved "
                "layout, or export it (sessa-export) and start from the export with checkpoint.init_from"
            )
        rank_file = path / f"rank{self.rank:05d}.pt"
        if not rank_file.is_file():
            raise CheckpointError(f"{path} has no state for rank {self.rank}: it was saved with fewer ranks")
        _, client_state = engine.load_checkpoint(str(path.parent), tag=path.name)
        if client_state is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {path}")
        set_rng_state(torch.load(rank_file, weights_only=False))
        return client_state


def find_checkpoint(path: str | Path) -> Path:
    """A complete ``step_N`` folder, or a checkpoint root whose ``latest`` names one."""
    path = Path(path)
    if (path / "latest").is_file():
        path = path / (path / "latest").read_text().strip()
    if not any((path / name).is_file() for name in (MODULE_FILE.format(0), ZERO3_MODULE_FILE)):
        raise CheckpointError(f"{path} is not a complete checkpoint (no {MODULE_FILE.format(0)}); pass a step_N folder")
    return path


def module_state(path: str | Path, model_parallel_rank: int = 0) -> dict[str, torch.Tensor]:
    """DeepSpeed's module weights of one model-parallel (TP x PP) rank, as saved."""
    return _load(find_checkpoint(path) / MODULE_FILE.format(model_parallel_rank))["module"]


def _load(file: Path) -> dict:
    return torch.load(file, map_location="cpu", weights_only=False)


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(fp32 plain model state dict, our client state: step, tokens, resolved config) of a checkpoint.

    With ZeRO optimizer shards present the weights are the fp32 master weights consolidated by
    ``deepspeed.utils.zero_to_fp32`` (ZeRO 1-3, any data-parallel size); otherwise the module
    weights. A tensor/pipeline/context-parallel checkpoint holds one module file per model-parallel
    rank m = pp_rank * tensor + tp_rank (parallel/state.py); ``layout.merge_states`` joins them.
    Those are the fp32 weights of an fp32 run, the bf16 module weights of a bf16 run.
    """
    path = find_checkpoint(path)
    first = _load(next(path / n for n in (MODULE_FILE.format(0), ZERO3_MODULE_FILE) if (path / n).is_file()))
    if "config" not in first:
        raise CheckpointError(f"{path} was not written by sessa-train (no resolved config in its client state)")
    parallel = first["config"].get("parallel", {})
    tensor, pipeline = parallel.get("tensor", 1), parallel.get("pipeline", 1)
    if tensor * pipeline * parallel.get("context", 1) > 1:  # trained as megatron-core stages
        from sessa_train.parallel.layout import merge_states

        stages = {}
        for m in range(tensor * pipeline):
            file = path / MODULE_FILE.format(m)
            if not file.is_file():
                need = f"a tensor={tensor} x pipeline={pipeline} checkpoint has one per model-parallel rank"
                raise CheckpointError(f"{path} lacks {file.name}: {need}")
            stages[divmod(m, tensor)] = (first if m == 0 else _load(file))["module"]
        weights = merge_states(stages, ModelConfig.from_dict(first["config"]["model"]))
    elif any(path.glob("*zero_pp_rank_*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        weights = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    else:
        weights = first["module"]
    return {k: v.float() for k, v in weights.items()}, first
