"""transformers model of a sessa-train export (copied into every export folder).

The network is sessa_train's own ``SessaLM``, from ``sessa_model.py`` beside this file, which
sessa-export generates from the package (``hf/bundle.py``): an export loads without sessa-train
installed, with the weights and numerics of training. The feedback solve is the pure-torch
chunked one; ``generate()`` decodes with the recurrent cache.

Padded batches (left or right padding, ``attention_mask``): a padding token is a document of its
own and real tokens count their positions from each row's first one, so that no real token reads
a padding token in the forward attention or the feedback solve (``models/positions.py``). A model
trained with document masking (``document_masking`` in its config) also starts a document after
every EOS of its input.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_sessa import SessaConfig
from .sessa_model import ComputeConfig, ModelConfig, ModelPlan, SessaLM, positions_of  # generated at export

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
        compute = ComputeConfig(feedback_backend="chunked", feedback_cuda_graphs=False)
        lm = SessaLM(ModelConfig.from_dict(config.model), ModelPlan(compute))
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

    def _eos(self) -> int | None:
        """The EOS that starts a document, for a model trained with document masking."""
        return self.config.eos_token_id if getattr(self.config, "document_masking", False) else None

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None, labels=None, **kwargs):
        cache = kwargs.get(CACHE)
        if use_cache and cache is None:
            cache = SessaDecodeCache(self.lm, input_ids.shape[0], input_ids.shape[1] + 256)
        seen = 0 if cache is None else cache.get_seq_length()
        if position_ids is None and (attention_mask is not None or self._eos() is not None) and seen == 0:
            position_ids = positions_of(input_ids, attention_mask, self._eos())
        if cache is not None:
            cache.state.reserve(input_ids.shape[1])
        logits = self.lm(input_ids, None if cache is None else cache.state, position_ids=position_ids)
        loss = None
        if labels is not None:  # -100 (padding) is ignored, as in transformers
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE: cache})

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, use_cache=True, **kwargs):
        """The tokens the cache has not seen yet, with the cache (under the installed version's name)
        and their positions in their documents (from the padding and, with document masking, EOS).
        ``use_cache=False``: no cache, every step computes the whole sequence again."""
        cache = kwargs.get(CACHE) if use_cache else None
        seen = 0 if cache is None else cache.get_seq_length()
        position_ids = None
        if attention_mask is not None or self._eos() is not None:
            position_ids = positions_of(input_ids, attention_mask, self._eos())
        if position_ids is not None:
            position_ids = position_ids[:, seen:]
        return {
            "input_ids": input_ids[:, seen:],
            "position_ids": position_ids,
            CACHE: cache,
            "use_cache": bool(use_cache),
            "attention_mask": attention_mask,
        }
