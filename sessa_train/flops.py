"""Model FLOPs of a Sessa LM, for throughput and MFU estimates.

Per token and layer, forward, counting a multiply-add as 2 FLOPs:
    dense projections      2 * (parameters of the layer's matrices)
    forward attention      2 * 2 * (T/2) * D      (QK^T and AV over on average T/2 keys)
    feedback solve         2 * 2 * (T/2) * D      (q_b k_b^T and A s over T/2 earlier tokens)
plus the LM head 2 * D * V. Training = 3 x forward (backward = 2 x forward). The Transformer
baseline has attention (Wq, Wk, Wv, Wo) and its MLP, and no feedback solve.
"""

from __future__ import annotations

from sessa_train.config import ModelConfig


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    D, kv = cfg.d_model, cfg.kv_heads * cfg.head_dim
    if cfg.arch == "transformer":
        from sessa_train.models.transformer import matched_ffn_hidden_size

        matrices = 2 * D * D + 2 * D * kv + 2 * D * matched_ffn_hidden_size(cfg)
        return cfg.n_layers * (2 * matrices + 2 * 2 * (seq_len / 2) * D) + 2 * D * cfg.vocab_size
    matrices = 2 * D * D + D * D + 2 * D * kv + 2 * D * D + D * D  # W_in, Wq, Wk+Wv, W_fb, W_out
    if cfg.n_heads > 1:
        matrices += D * D  # Wo
    matrices += 2 * D * cfg.ffn_hidden_size
    per_layer = 2 * matrices + 2 * 2 * (seq_len / 2) * D * 2
    return cfg.n_layers * per_layer + 2 * D * cfg.vocab_size


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    return 3 * forward_flops_per_token(cfg, seq_len)
