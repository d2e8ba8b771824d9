"""transformers model of a sessa-train export (copied into every export folder).

The network is sessa_train's own ``SessaLM``, from ``sessa_model.py`` beside this file, which
sessa-export generates from the package (``hf/bundle.py``): an export loads without sessa-train
installed, with the weights and numerics of training. The feedback solve is the pure-torch
chunked one; ``generate()`` decodes with the recurrent cache.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_sessa import SessaConfig
from .sessa_model import ComputeConfig, ModelConfig, ModelPlan, SessaLM  # generated at export

# transformers 5.x names the recurrent state ``cache`` (in outputs, model inputs and generate's
# kwargs) where 4.x says ``past_key_values``: the installed version's name is used throughout, so
# generate hands our cache back to forward and no deprecation warning is raised
CACHE = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


class SessaDecodeCache:
    """SessaLM's decode state (``SessaLM.init_cache``) as generate sees it: its length."""

    def __init__(self, lm: SessaLM, batch_size: int, capacity: int) -> None:
        self.state = lm.init_cache(batch_size, capacity)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.state.length


class SessaForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = SessaConfig
    base_model_prefix = ""
    _tied_weights_keys: ClassVar[dict[str, str]] = {"lm_head.weight": "embed.weight"}

    def __init__(self, config: SessaConfig) -> None:
        super().__init__(config)
        lm = SessaLM(ModelConfig.from_dict(config.model), ModelPlan(ComputeConfig(feedback_backend="chunked")))
        # register SessaLM's modules under their own names: export tensor names load as they are
        self.embed, self.layers, self.norm, self.lm_head = lm.embed, lm.layers, lm.norm, lm.lm_head
        object.__setattr__(self, "lm", lm)  # not a submodule: its parameters are the ones above
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the state is SessaDecodeCache, not attention keys/values

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.lm_head

    def _init_weights(self, module) -> None:
        pass  # weights come from the export

    def forward(self, input_ids, attention_mask=None, use_cache=None, labels=None, **kwargs):
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("Sessa does not support padded batches: pass unpadded prompts of equal length")
        cache = kwargs.get(CACHE)
        if use_cache and cache is None:
            cache = SessaDecodeCache(self.lm, input_ids.shape[0], input_ids.shape[1] + 256)
        if cache is not None:
            cache.state.reserve(input_ids.shape[1])
        logits = self.lm(input_ids, None if cache is None else cache.state)
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE: cache})

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        """The tokens the cache has not seen yet, with the cache (under the installed version's name)."""
        cache = kwargs.get(CACHE)
        if cache is not None and cache.get_seq_length() > 0:
            input_ids = input_ids[:, cache.get_seq_length() :]
        return {"input_ids": input_ids, CACHE: cache, "use_cache": True, "attention_mask": attention_mask}
