"""What ``modeling_sessa.py`` imports as ``.sessa_model``, taken from the installed package.

An export carries its own generated ``sessa_model.py`` (``hf/bundle.py``) so that it loads without
sessa-train; inside the package the same names come from the package itself, so that
``sessa_train.hf.modeling_sessa.SessaForCausalLM`` loads an export with none of the folder's code
(``export.load_for_transformers``).
"""

from sessa_train.config import ComputeConfig, ModelConfig
from sessa_train.models import ModelPlan, SessaLM
from sessa_train.models.positions import positions_of

__all__ = ["ComputeConfig", "ModelConfig", "ModelPlan", "SessaLM", "positions_of"]
