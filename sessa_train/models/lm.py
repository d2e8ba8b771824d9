"""Causal language model: embedding -> N layers -> final LayerNorm -> LM head.

The layers are Sessa layers, or with ``arch: transformer`` the matched Transformer baseline.
A pipeline stage (``ModelPlan.stages`` > 1) holds the embedding only on the first stage, its
block of layers, and the final norm and head only on the last; layers keep their global index
as their name, so every weight has the same name in every layout.
"""

from __future__ import annotations

import torch
from torch import nn

from sessa_train.config import ModelConfig
from sessa_train.models.layer import SessaLayer
from sessa_train.models.mixer import MixerCache
from sessa_train.models.plan import ModelPlan
from sessa_train.models.transformer import TransformerLayer


class SessaLM(nn.Module):
    def __init__(self, cfg: ModelConfig, plan: ModelPlan | None = None) -> None:
        super().__init__()
        plan = plan or ModelPlan()
        self.cfg, self.plan = cfg, plan
        D, V = cfg.d_model, cfg.vocab_size
        layer = SessaLayer if cfg.arch == "sessa" else TransformerLayer
        self.embed = plan.embedding(V, D) if plan.first_stage else None
        self.layers = nn.ModuleDict({str(i): layer(cfg, plan) for i in plan.layer_ids(cfg.n_layers)})
        self.norm = nn.LayerNorm(D, eps=cfg.ln_eps) if plan.last_stage else None
        self.lm_head = plan.column(D, V, bias=False) if plan.last_stage else None
        if self.embed is not None:
            nn.init.normal_(self.embed.weight, std=cfg.init_std)
        if self.lm_head is not None and not cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=cfg.init_std)
        elif self.lm_head is not None and self.embed is not None:
            self.lm_head.weight = self.embed.weight
        elif self.lm_head is not None:  # tied, and the embedding lives on the first pipeline stage:
            weight = self.lm_head.weight.detach()  # it lends it every step (parallel/pipeline.py)
            del self.lm_head.weight
            self.lm_head.register_buffer("weight", weight, persistent=False)

    def init_cache(self, batch_size: int, max_len: int, *, device=None, dtype=None) -> list[MixerCache]:
        """One preallocated cache per layer for prefill + token-by-token decoding."""
        return [m.mixer.init_cache(batch_size, max_len, device=device, dtype=dtype) for m in self.layers.values()]

    def forward(
        self, inputs: torch.Tensor, cache: list[MixerCache] | None = None, *, targets: torch.Tensor | None = None
    ) -> torch.Tensor:
        """inputs (B, T) int64 token ids -> logits (B, T, vocab_size), or with ``targets`` (B, T)
        the per-token cross-entropy (B, T) in float32.

        With ``cache`` (from ``init_cache``): the first call prefills, later calls take one token.
        A pipeline stage without the embedding takes hidden states (B, T, D) as ``inputs``; one
        without the head returns hidden states. Under tensor parallelism logits hold this rank's
        vocabulary rows (the loss is taken over all of them).
        """
        if self.embed is not None:
            if inputs.dim() != 2 or inputs.dtype not in (torch.int32, torch.int64):
                got = f"{inputs.dtype} {tuple(inputs.shape)}"
                raise ValueError(f"SessaLM expects integer token ids of shape (batch, seq), got {got}")
            x = self.embed(inputs)
        else:
            x = inputs
        if cache is not None and len(cache) != len(self.layers):
            raise ValueError(f"cache has {len(cache)} layers, model has {len(self.layers)}")
        for i, layer in enumerate(self.layers.values()):
            x = self.plan.recompute("full", self.compiled(layer), x) if cache is None else layer(x, cache[i])
        if self.lm_head is None:
            return x
        logits = self.lm_head(self.norm(x))
        return logits if targets is None else self.plan.token_loss(logits, targets)

    def compiled(self, layer: nn.Module) -> nn.Module:
        """``layer``, or with ``compute.compile`` its ``torch.compile`` (made once, kept beside it)."""
        if not self.plan.compute.compile:
            return layer
        if "compiled" not in layer.__dict__:
            layer.__dict__["compiled"] = torch.compile(layer)  # not a submodule: no second state-dict entry
        return layer.__dict__["compiled"]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
