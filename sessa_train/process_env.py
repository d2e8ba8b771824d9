"""Environment defaults of a training process, set before torch is loaded; a value the user has
set is kept.

``OMP_WAIT_POLICY=PASSIVE``: OpenMP threads sleep at a barrier instead of spinning. On a CPU
shared with other jobs, spinning threads of a 2-thread run spend most of their time in libgomp's
barriers: a tiny run took 0.61x the wall time of libgomp's default with passive waiting. On a quiet
machine passive waiting is not free: the same run took 1.23x (docs/benchmarks.md). Shared CI and
development machines are the usual CPU case, and the loss of spinning there is unbounded while
passive waiting's is not, so it is the default; ``OMP_WAIT_POLICY=ACTIVE`` gets spinning back.

``TORCH_EXTENSIONS_DIR=<venv>/torch_extensions``: DeepSpeed builds its CPU communication op with
torch's extension builder on first use (32 s on 2 cores, 1.5 GiB; tools/bootstrap.sh builds it at
set-up). Under the default ``~/.cache/torch_extensions`` two environments with different torch
builds (a second clone, CI) rebuild it in turn; one folder per environment builds it once.

The environment's ``bin`` folder first on ``PATH`` (as activating it would): torch's extension
builder runs the first ``ninja`` on ``PATH``, and two ninja releases read each other's build log
as changed commands (ninja 1.13 hashes them differently from 1.11), so a run with the venv
activated and one without rebuilt the op in turn, 35 s each.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping
from pathlib import Path


def runtime_defaults() -> dict[str, str]:
    return {"OMP_WAIT_POLICY": "PASSIVE", "TORCH_EXTENSIONS_DIR": str(Path(sys.prefix) / "torch_extensions")}


def apply_runtime_defaults(env: MutableMapping[str, str] = os.environ) -> None:
    for key, value in runtime_defaults().items():
        env.setdefault(key, value)
    own_bin = str(Path(sys.executable).parent)
    if env.get("PATH", "").split(os.pathsep)[0] != own_bin:
        env["PATH"] = os.pathsep.join(
            [own_bin, *(p for p in env.get("PATH", "").split(os.pathsep) if p and p != own_bin)]
        )
