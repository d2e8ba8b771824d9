"""Model FLOPs of a Sessa LM (or a baseline: Transformer, Mamba-2), for throughput and MFU, read off the
one model definition.

Per token, forward, counting a multiply-add as 2 FLOPs:
    every linear layer (LM head included)   2 * (its weight's elements)
    every module with sequence-length work   its ``sequence_flops_per_token(T)``
        (forward attention: QK^T and AV over on average T/2 keys; the Sessa mixer adds the
        feedback solve's q_b k_b^T and A s over T/2 earlier tokens)
Training = 3 x forward (backward = 2 x forward).
"""

from __future__ import annotations

import torch
from torch import nn

from sessa_train.config import ModelConfig
from sessa_train.models import SessaLM


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    with torch.device("meta"):
        model = SessaLM(cfg)
    modules = list(model.modules())
    dense = sum(2 * m.weight.numel() for m in modules if isinstance(m, nn.Linear))
    sequence = sum(m.sequence_flops_per_token(seq_len) for m in modules if hasattr(m, "sequence_flops_per_token"))
    return dense + sequence


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    return 3 * forward_flops_per_token(cfg, seq_len)
