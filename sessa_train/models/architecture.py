"""The record of one architecture (``models/registry.py`` collects them)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from sessa_train.config import ModelConfig


@dataclass(frozen=True)
class Architecture:
    """``layer(cfg, plan)`` builds one layer, whose ``init_cache(batch, max_len, device, dtype)``
    gives its decode state; ``tensor_divisible(cfg)``: config values (by the name errors give)
    that the tensor-parallel size must divide; ``tensor_parallel`` / ``context_parallel``: whether
    those layouts can split it (refused in one line otherwise)."""

    name: str
    layer: Callable[..., nn.Module]
    tensor_divisible: Callable[[ModelConfig], dict[str, int]]
    tensor_parallel: bool = True
    context_parallel: bool = True
