"""Typed model configuration, validated on construction.

Every bad value raises ``ValueError`` naming the field, the value and what is valid.
Defaults follow the public reference layer (see docs/reference_compat.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from sessa_train.ops.feedback import BACKENDS


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 32000
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4  # forward-branch attention heads (H)
    n_kv_heads: int | None = None  # GQA; None = n_heads
    feedback_heads: int = 1  # the reference uses one feedback head over the full width
    gamma_max: float = 0.999
    gamma_bias_init: float = 1.0
    rope: bool = True  # RoPE on the forward branch's q and k (never on the feedback branch)
    rope_theta: float = 10000.0
    ln_eps: float = 1e-5
    ffn_hidden_size: int = 0  # 0 = no MLP between Sessa layers (the reference has none)
    tie_embeddings: bool = True
    init_std: float = 0.02  # embedding (and untied LM head) init; linears keep torch's default
    feedback_backend: str = "auto"
    feedback_chunk_size: int = 128

    def __post_init__(self) -> None:
        def positive(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"model.{name} must be a positive integer, got {value!r}")

        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "feedback_heads", "feedback_chunk_size"):
            positive(name)
        if self.n_kv_heads is not None:
            positive("n_kv_heads")
        if self.d_model % self.n_heads:
            raise ValueError(f"model.d_model={self.d_model} must be divisible by model.n_heads={self.n_heads}")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"model.n_heads={self.n_heads} must be divisible by model.n_kv_heads={self.kv_heads}")
        if self.d_model % self.feedback_heads:
            raise ValueError(
                f"model.d_model={self.d_model} must be divisible by model.feedback_heads={self.feedback_heads}"
            )
        if self.rope and self.head_dim % 2:
            raise ValueError(
                f"RoPE needs an even head dim, got d_model/n_heads = {self.d_model}/{self.n_heads} = {self.head_dim}"
            )
        if not 0.0 < self.gamma_max < 1.0:
            raise ValueError(f"model.gamma_max must be in (0, 1), got {self.gamma_max!r}")
        if not isinstance(self.ffn_hidden_size, int) or self.ffn_hidden_size < 0:
            raise ValueError(f"model.ffn_hidden_size must be an integer >= 0, got {self.ffn_hidden_size!r}")
        for name in ("rope_theta", "ln_eps", "init_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"model.{name} must be > 0, got {getattr(self, name)!r}")
        if self.feedback_backend not in BACKENDS:
            raise ValueError(f"model.feedback_backend={self.feedback_backend!r}; valid: {', '.join(BACKENDS)}")

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)
