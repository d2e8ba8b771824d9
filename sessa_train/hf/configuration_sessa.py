"""transformers config of a sessa-train export (copied into every export folder)."""

from transformers import PretrainedConfig


class SessaConfig(PretrainedConfig):
    """Holds the export's ``model`` section (sessa_train.ModelConfig fields) unchanged."""

    model_type = "sessa"

    def __init__(self, model: dict | None = None, tie_word_embeddings: bool = True, **kwargs):
        self.model = dict(model or {})
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
