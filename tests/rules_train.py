"""sessa-train under NCCL's rules (tests/nccl_rules.py), as a script for torchrun:

torchrun --nproc-per-node 2 tests/rules_train.py --config c.yaml [overrides]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.nccl_rules import install

install("rank")

from sessa_train.train import cli  # noqa: E402

cli()
