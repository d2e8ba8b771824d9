"""Run the trainer as a user would (a subprocess) on a small run: shared by the trainer and export tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.helpers import HANG_GUARD_S

REPO = Path(__file__).resolve().parent.parent


def write_config(path: Path, shards: Path, run: Path, **model) -> Path:
    m = {"vocab_size": 400, "d_model": 32, "n_layers": 2, "n_heads": 2, **model}
    path.write_text(f"""
model: {json.dumps(m)}
data: {{path: "{shards}", micro_batch_size: 4}}
schedule: {{train_steps: 8, warmup_steps: 2, global_batch_size: 8}}
optimizer: {{lr: 3.0e-3, min_lr: 3.0e-4}}
checkpoint: {{dir: "{run}/ckpt", every_steps: 100}}
logging: {{dir: "{run}/tb", every_steps: 1, eval_every_steps: 4, eval_batches: 2}}
""")
    return path


TRAINER = ["-m", "sessa_train.train"]
UNDER_NCCL_RULES = [str(REPO / "tests" / "rules_train.py")]  # the trainer with tests/nccl_rules.py installed


def command(config: Path, *overrides: str, nproc: int = 1, entry: list[str] = TRAINER) -> list[str]:
    """The trainer's command line: plain python for one rank, torchrun for more."""
    if nproc == 1:
        launcher = [sys.executable, *entry]
    else:
        port = str(29500 + os.getpid() % 1000)
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
        launcher += ["--master-port", port, *entry]
    return [*launcher, "--config", str(config), *overrides]


# the trainer runs as a user's would: without the Triton interpreter tests/conftest.py turns on
ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {
    "OMP_NUM_THREADS": "1",
    "PYTHONUNBUFFERED": "1",
}


def two_threads(threads: int) -> dict[str, str]:
    """``threads`` intra-op threads; more than one spin at OpenMP's barriers (``ACTIVE``) rather
    than sleep (the trainer's default, for shared machines): the suite runs one job at a time, and
    on such a quiet machine a 2-thread tiny run takes 0.83x the wall time so (docs/benchmarks.md)."""
    return {"OMP_NUM_THREADS": str(threads)} | ({"OMP_WAIT_POLICY": "ACTIVE"} if threads > 1 else {})


def train(
    config: Path,
    *overrides: str,
    nproc: int = 1,
    check: bool = True,
    threads: int = 1,
    entry: list[str] = TRAINER,
    env: dict | None = None,
) -> subprocess.CompletedProcess:
    """``threads``: intra-op threads per rank (one rank alone may use both cores of CI); ``env``:
    variables added to the trainer's environment."""
    cmd = command(config, *overrides, nproc=nproc, entry=entry)
    env = ENV | two_threads(threads) | (env or {})
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=HANG_GUARD_S)
    if check and out.returncode != 0:
        raise AssertionError(f"training failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def losses(run: Path) -> list[tuple[int, float]]:
    """(step, loss) of every step row of metrics.jsonl (not the resume markers)."""
    rows = [json.loads(line) for line in (run / "tb" / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]


def rank_weights(checkpoint: Path, tensor_rank: int = 0, stage: int | None = None) -> dict[str, torch.Tensor]:
    """The fp32 weights a checkpoint holds for one tensor-parallel rank (of one pipeline stage, or
    all), read straight from its safetensors files: no sessa-train code, an independent read."""
    from safetensors.torch import load_file

    weights = {}
    for file in sorted(
        (checkpoint / "model").glob(f"tp{tensor_rank}-pp{'*' if stage is None else stage}-*.safetensors")
    ):
        weights |= {k: v for k, v in load_file(file).items() if not k.endswith((".exp_avg", ".exp_avg_sq"))}
    return weights


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    """The plain weights of the newest checkpoint of a run without tensor parallelism."""
    ckpt = run / "ckpt" / (run / "ckpt" / "latest").read_text().strip()
    weights = rank_weights(ckpt)
    if "lm_head.weight" not in weights:  # tied: the head is the embedding
        weights["lm_head.weight"] = weights["embed.weight"]
    return weights
