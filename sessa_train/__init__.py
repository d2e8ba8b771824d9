"""sessa-train: pretraining framework for Sessa (Selective State Space Attention) models."""

from sessa_train.config import ModelConfig
from sessa_train.export import load_pretrained
from sessa_train.models import SessaLM
from sessa_train.ops import feedback_solve

__all__ = ["ModelConfig", "SessaLM", "feedback_solve", "load_pretrained"]
__version__ = "0.1.0"
