"""The package's messages: Python ``logging`` on stdout, one logger (``sessa_train``).

Rank 0 prints its messages as they are (progress lines, one-line notes); every other rank
prints warnings and errors only, prefixed with its rank, so that a job's log shows each line once
and says which rank a problem came from.
"""

from __future__ import annotations

import logging
import sys

LOGGER = "sessa_train"


def setup(rank: int) -> logging.Logger:
    logger = logging.getLogger(LOGGER)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s" if rank == 0 else f"[rank {rank}] %(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger.propagate = False
    return logger
