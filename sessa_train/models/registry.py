"""The architectures a model can be built of (``model.arch``), one ``Architecture`` record each.

Each mixer's module defines its layer and its record; ``RECORDS`` collects them. ``SessaLM``
builds its layers from the record, ``parallel/plan.py`` checks layouts against it, and
``config.ARCHITECTURES`` (torch-free, for the launcher) lists the same names (a test checks). A
new mixer is a module with its layer and record, added to the tuple below.
"""

from __future__ import annotations

from sessa_train.models.architecture import Architecture
from sessa_train.models.layer import SESSA
from sessa_train.models.mamba2 import MAMBA2
from sessa_train.models.transformer import TRANSFORMER

RECORDS: dict[str, Architecture] = {a.name: a for a in (SESSA, TRANSFORMER, MAMBA2)}
