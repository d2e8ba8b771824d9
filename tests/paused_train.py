"""sessa-train that stops inside a checkpoint load, as a script for torchrun (tests only):

torchrun --nproc-per-node 4 tests/paused_train.py MARKER --config c.yaml [overrides]

The first time a rank reads a parameter of the checkpoint (``checkpoint.ParamReader.region``) it
writes MARKER and sleeps: a test that waits for MARKER and then kills the job knows the kill
landed during the load, after its first read.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sessa_train import checkpoint

marker = Path(sys.argv.pop(1))
original = checkpoint.ParamReader.region


def paused(self, *args, **kwargs):
    value = original(self, *args, **kwargs)
    marker.write_text("reading")
    time.sleep(600)
    return value


checkpoint.ParamReader.region = paused

from sessa_train.train import cli  # noqa: E402

cli()
