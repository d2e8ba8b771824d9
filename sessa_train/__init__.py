"""sessa-train: pretraining framework for Sessa (Selective State Space Attention) models.

The names below load on first use, so that the config and the launcher do not import torch.
"""

import importlib

_EXPORTS = {"ModelConfig": "config", "SessaLM": "models", "feedback_solve": "ops", "load_pretrained": "export"}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sessa_train' has no attribute {name!r}")
    return getattr(importlib.import_module(f"sessa_train.{_EXPORTS[name]}"), name)
