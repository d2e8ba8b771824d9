from sessa_train.models.layer import MLP, SessaLayer
from sessa_train.models.lm import SessaLM
from sessa_train.models.mixer import SessaCache, SessaMixer
from sessa_train.models.plan import ModelPlan, Split
from sessa_train.models.positions import DecodeCache, Positions

__all__ = ["MLP", "DecodeCache", "ModelPlan", "Positions", "SessaCache", "SessaLM", "SessaLayer", "SessaMixer", "Split"]
