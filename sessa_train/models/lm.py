"""Causal language model: embedding -> N Sessa layers -> final LayerNorm -> LM head.

With ``arch: transformer`` the layers are the matched Transformer baseline instead.
"""

from __future__ import annotations

import torch
from torch import nn

from sessa_train.config import ModelConfig
from sessa_train.models.layer import SessaLayer
from sessa_train.models.mixer import MixerCache
from sessa_train.models.transformer import TransformerLayer


class SessaLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        layer = SessaLayer if cfg.arch == "sessa" else TransformerLayer
        self.layers = nn.ModuleList(layer(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, std=cfg.init_std)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        else:
            nn.init.normal_(self.lm_head.weight, std=cfg.init_std)

    def init_cache(self, batch_size: int, max_len: int, *, device=None, dtype=None) -> list[MixerCache]:
        """One preallocated cache per layer for prefill + token-by-token decoding."""
        return [layer.mixer.init_cache(batch_size, max_len, device=device, dtype=dtype) for layer in self.layers]

    def forward(self, input_ids: torch.Tensor, cache: list[MixerCache] | None = None) -> torch.Tensor:
        """input_ids (B, T) int64 -> logits (B, T, vocab_size).

        With ``cache`` (from ``init_cache``): the first call prefills, later calls take one token.
        """
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int32, torch.int64):
            got = f"{input_ids.dtype} {tuple(input_ids.shape)}"
            raise ValueError(f"SessaLM expects integer token ids of shape (batch, seq), got {got}")
        if cache is not None and len(cache) != len(self.layers):
            raise ValueError(f"cache has {len(cache)} layers, model has {len(self.layers)}")
        x = self.embed(input_ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, None if cache is None else cache[i])
        return self.lm_head(self.norm(x))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
