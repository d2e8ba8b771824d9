"""The pretraining loop (``loop.py``) and what it is built from: ``build.py`` (the parallel state,
the loader, the model under DeepSpeed), ``engine.py`` (a step through DeepSpeed), ``runner.py``,
``optim.py``, ``fp32.py`` (DeepSpeed's fp32 weights and moments for the checkpoint's model part),
``metrics.py`` (the sinks)."""

from sessa_train.trainer.build import build_engine, parallel_state
from sessa_train.trainer.engine import Engine
from sessa_train.trainer.loop import Trainer

__all__ = ["Engine", "Trainer", "build_engine", "parallel_state"]
