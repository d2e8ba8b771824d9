"""The pretraining loop (``loop.py``) and what it is built from: ``build.py`` (rank layout,
loader, the model under DeepSpeed with its runner), ``runner.py``, ``optim.py``, ``metrics.py``."""

from sessa_train.trainer.build import Engine, RankLayout, build_engine, rank_layout
from sessa_train.trainer.loop import Trainer

__all__ = ["Engine", "RankLayout", "Trainer", "build_engine", "rank_layout"]
