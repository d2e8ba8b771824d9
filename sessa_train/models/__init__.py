from sessa_train.models.layer import MLP, SessaLayer
from sessa_train.models.lm import SessaLM
from sessa_train.models.mixer import MixerCache, SessaMixer
from sessa_train.models.plan import ModelPlan, Split

__all__ = ["MLP", "MixerCache", "ModelPlan", "SessaLM", "SessaLayer", "SessaMixer", "Split"]
