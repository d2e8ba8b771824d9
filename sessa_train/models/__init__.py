from sessa_train.models.layer import MLP, SessaLayer
from sessa_train.models.lm import SessaLM
from sessa_train.models.mixer import MixerCache, SessaMixer

__all__ = ["MLP", "MixerCache", "SessaLM", "SessaLayer", "SessaMixer"]
