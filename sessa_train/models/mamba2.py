"""The matched Mamba-2 baseline (``model.arch: mamba2``): the same LM (embedding, pre-norm
residual layers with an MLP, final norm, head) with the mixer of transformers' ``Mamba2Mixer``
(its pure-torch SSD path on CPU; the mamba-ssm / causal-conv1d CUDA kernels when installed,
which transformers picks up by itself). The selective scan is the library's, not ours.

    y = x + Mamba2Mixer(LayerNorm(x))
    y = y + MLP(LayerNorm(y))          MLP: D -> F -> D, GELU

Mixer settings are Mamba-2's (Dao & Gu 2024): expand 2, SSM heads of width 64, state 128 (d_model
when narrower), one B/C group, a causal conv of width 4, SSD chunks of 256 (``scan_chunk``: less
for a shorter sequence). A mixer holds about 6 D^2 + 2 N D weights, so F (``mamba2_ffn_hidden_size``)
is chosen so that a layer holds the weights of a Sessa layer of the same config within 1% (a test
checks the whole model).

What it cannot do, refused in one line: tensor or context parallelism (the library's mixer is
one module, not split; pipeline parallelism and ZeRO work as for the others) and document
masking (the torch path has no per-document state reset). Left padding in batched generation
works: padding tokens are zeroed (the mixer's ``attention_mask``), so they leave the state at 0.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from sessa_train.config import ModelConfig
from sessa_train.errors import ConfigError
from sessa_train.models.architecture import Architecture
from sessa_train.models.layer import MLP, SessaLayer
from sessa_train.models.plan import ModelPlan
from sessa_train.models.positions import Positions

EXPAND, HEAD_DIM, STATE, GROUPS, CONV, CHUNK = 2, 64, 128, 1, 4, 256


def state_size(cfg: ModelConfig) -> int:
    """N: Mamba-2's 128, or d_model where the model is narrower (the state would outweigh it)."""
    return min(STATE, cfg.d_model)


def ssm_heads(cfg: ModelConfig) -> int:
    inner = EXPAND * cfg.d_model
    if inner % HEAD_DIM:
        raise ConfigError(
            f"model.arch=mamba2 needs 2 x model.d_model divisible by {HEAD_DIM}, got d_model={cfg.d_model}"
        )
    return inner // HEAD_DIM


def mamba2_mixer_parameters(cfg: ModelConfig) -> int:
    """Weights of one Mamba-2 mixer (in_proj, conv1d with bias, A_log, D, dt_bias, norm, out_proj)."""
    D, H, inner = cfg.d_model, ssm_heads(cfg), EXPAND * cfg.d_model
    conv_dim = inner + 2 * GROUPS * state_size(cfg)
    return D * (inner + conv_dim + H) + conv_dim * (CONV + 1) + 3 * H + inner + inner * D


def sessa_layer_parameters(cfg: ModelConfig) -> int:
    """Weights of one Sessa layer of ``cfg`` (models/layer.py, models/mixer.py)."""
    with torch.device("meta"):
        return sum(p.numel() for p in SessaLayer(cfg).parameters())


def mamba2_ffn_hidden_size(cfg: ModelConfig) -> int:
    """F such that norm + mixer + norm + MLP(F) holds a Sessa layer's weights."""
    if cfg.ffn_hidden_size:
        return cfg.ffn_hidden_size
    D, target = cfg.d_model, sessa_layer_parameters(cfg)
    rest = target - mamba2_mixer_parameters(cfg) - 4 * D - D  # two LayerNorms, fc2's bias
    step = 8 if 0.005 * target > 8 * (2 * D + 1) else 1  # a multiple of 8 where that costs < 0.5%
    return max(step, round(rest / (2 * D + 1) / step) * step)  # fc1 (D x F + F) and fc2 (F x D)


def scan_chunk(seq_len: int) -> int:
    """The SSD chunk for ``seq_len`` rows: Mamba-2's 256, or the power of two that holds a shorter
    sequence. transformers' torch path pads every sequence to whole chunks, so at length 64 a
    chunk of 256 did the same sums (over zeros) 4x wider in its linear parts and 16x in its
    quadratic ones: 5.4x the time of a chunk of 64 for the two mixers at batch 64, d_model 64."""
    return min(CHUNK, 1 << max(seq_len - 1, 0).bit_length())


def _mixer_class() -> type:
    """transformers' Mamba2Mixer, if it is the one whose cache protocol this module speaks."""
    try:
        import transformers
        from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer
    except ImportError:
        raise ConfigError("model.arch=mamba2 needs transformers (pip install 'sessa-train[hf]')") from None
    if "cache" not in inspect.signature(Mamba2Mixer.forward).parameters:
        raise ConfigError(
            f"model.arch=mamba2 needs transformers>=5.24 (its Mamba2Mixer takes cache=), "
            f"found {transformers.__version__}"
        )
    return Mamba2Mixer


def _library_config(cfg: ModelConfig):
    from transformers import Mamba2Config

    return Mamba2Config(
        hidden_size=cfg.d_model, num_heads=ssm_heads(cfg), head_dim=HEAD_DIM, expand=EXPAND, state_size=state_size(cfg),
        n_groups=GROUPS, conv_kernel=CONV, chunk_size=CHUNK, num_hidden_layers=1, vocab_size=cfg.vocab_size,
        layer_norm_epsilon=cfg.ln_eps, use_bias=False, use_conv_bias=True,
    )  # fmt: skip


def new_cache(cfg: ModelConfig):
    """One layer's decode state: transformers' own cache for a one-layer Mamba-2 (the conv inputs
    and the SSM state; a fixed size after the prefill, whatever the length), so that the mixer and
    its cache always speak the protocol of the same transformers release."""
    from transformers import DynamicCache

    return DynamicCache(config=_library_config(cfg))


def _has_state(cache) -> bool:
    """Whether ``cache`` (from ``new_cache``) holds a state: the prefill has run."""
    return cache is not None and cache.get_recurrent_state(0) is not None


def padding_mask(pos: Positions, cache) -> torch.Tensor | None:
    """(B, T) 1 for the rows of each sequence's last document, 0 before it: the mixer's
    ``attention_mask``. Only left padding (one-token documents before the text) can be expressed
    so; other document boundaries are a ValueError (mamba2 trains without document masking)."""
    if pos.doc_start is None:
        return None
    rows = torch.arange(pos.start, pos.start + pos.length, device=pos.doc_start.device)
    mask = rows >= pos.doc_start[:, -1:]
    before = pos.rope[~mask]
    restarted = _has_state(cache) and bool((pos.rope == 0).any())
    if bool((before != 0).any()) or restarted:
        raise ValueError("model.arch=mamba2 keeps no documents apart: position_ids may only mark left padding "
                         "(single padding tokens before each row's text)")  # fmt: skip
    return mask.to(torch.int64)


class Mamba2Layer(nn.Module):
    def __init__(self, cfg: ModelConfig, plan: ModelPlan | None = None) -> None:
        super().__init__()
        plan = plan or ModelPlan()
        D = cfg.d_model
        self.cfg, self.plan = cfg, plan
        self.norm = plan.norm(D, cfg.ln_eps)
        self.mixer = _mixer_class()(_library_config(cfg), layer_idx=0)
        self.mlp_norm = plan.norm(D, cfg.ln_eps)
        self.mlp = MLP(D, mamba2_ffn_hidden_size(cfg), plan)

    def sequence_flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token of the SSD scan beyond its linears (``flops.py``): within a chunk
        C B^T and its product with x over on average Q/2 positions, the chunk states and their
        readout (N x P each a head), and the causal conv."""
        m = self.mixer
        Q = min(m.chunk_size, seq_len)
        per_head = 2 * (Q / 2) * (m.ssm_state_size + m.head_dim) + 2 * 2 * m.ssm_state_size * m.head_dim
        return m.num_heads * per_head + 2 * m.conv_dim * m.conv_kernel_size

    def init_cache(self, batch_size: int, max_len: int, *, device=None, dtype=None):
        return new_cache(self.cfg)

    def forward(self, x: torch.Tensor, pos: Positions | None = None, cache=None) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D); ``pos`` None: the rows are a whole sequence."""
        pos = pos or self.plan.positions(x.shape[1])
        mask = padding_mask(pos, cache)
        self.mixer.chunk_size = scan_chunk(x.shape[1])
        with torch.profiler.record_function("sessa.mamba2"):
            y = x + self.mixer(self.norm(x), cache, mask)
        return y + self.mlp(self.mlp_norm(y))


def _mamba2_divisible(cfg: ModelConfig) -> dict[str, int]:
    ssm_heads(cfg)
    return {}


MAMBA2 = Architecture("mamba2", Mamba2Layer, _mamba2_divisible, tensor_parallel=False, context_parallel=False)
