"""A tensor-parallel Sessa layer built from megatron-core's parallel linears and mappings.

Same math as ``models.layer.SessaLayer`` (docs/parallelism.md has the layout); P = TP size:

    u = LN(x)                          replicated
    a = GELU(W_in,a u)                 column-parallel, gathered: q/k/v and W_fb read all of a
    g = W_in,g u                       column-parallel, kept split: it gates this rank's s channels
    f = Wo SDPA(q, k, v)               q/k/v column-parallel by heads, Wo row-parallel (all-reduce)
    s = solve(q_b, k_b, f_r, gamma)    feedback_heads % P == 0: this rank's heads, no communication;
                                       feedback_heads == 1: q_b, k_b, gamma replicated (their
                                       gradients all-reduced), f_r = this rank's D/P channels of f
    y = x + W_out (s * g)              row-parallel (all-reduce)

With context parallelism (CP) x is this rank's block of T/CP tokens: K/V are all-gathered over
the CP group for f, and the solve is the ring of ``context_parallel.py``.

``layout.layer_spec`` says how each parameter is cut from the plain SessaLayer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel as tp
from megatron.core.model_parallel_config import ModelParallelConfig
from torch import nn

from sessa_train.config import ModelConfig
from sessa_train.models.rope import apply_rope, rope_angles
from sessa_train.ops import feedback_solve
from sessa_train.ops.feedback import resolve_backend
from sessa_train.parallel.context_parallel import feedback_solve_context_parallel, gather_sequence


def _heads(x: torch.Tensor, n: int) -> torch.Tensor:
    B, T, _ = x.shape
    return x.view(B, T, n, -1).transpose(1, 2)


def check_tp_shapes(cfg: ModelConfig, P: int) -> None:
    for name, value in (("n_heads", cfg.n_heads), ("n_kv_heads", cfg.kv_heads)):
        if value % P or cfg.n_heads == 1:
            raise ValueError(f"model.{name}={value} must be > 1 and divisible by parallel.tensor={P}")
    if cfg.feedback_heads != 1 and cfg.feedback_heads % P:
        raise ValueError(f"model.feedback_heads={cfg.feedback_heads} must be 1 or divisible by parallel.tensor={P}")
    if cfg.ffn_hidden_size or cfg.arch != "sessa":
        raise ValueError("tensor parallelism covers the Sessa layer without MLP so far")


class TPSessaLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig) -> None:
        super().__init__()
        P = ps.get_tensor_model_parallel_world_size()
        check_tp_shapes(cfg, P)
        self.cfg, self.P = cfg, P
        self.cp_size = ps.get_context_parallel_world_size()
        D, hd = cfg.d_model, cfg.head_dim
        keep = torch.nn.init.zeros_  # weights come from layout.shard (of a plain model) or a checkpoint

        def column(n_in, n_out, gather=False, bias=True):
            return tp.ColumnParallelLinear(n_in, n_out, config=mp, init_method=keep, bias=bias, gather_output=gather)

        def row(n_in, n_out, bias=True):
            return tp.RowParallelLinear(
                n_in, n_out, config=mp, init_method=keep, bias=bias, input_is_parallel=True, skip_bias_add=False
            )

        self.norm = nn.LayerNorm(D, eps=cfg.ln_eps, dtype=mp.params_dtype)
        self.in_a, self.in_g = column(D, D, gather=True), column(D, D)
        self.q_proj = column(D, cfg.n_heads * hd)
        self.k_proj, self.v_proj = column(D, cfg.kv_heads * hd), column(D, cfg.kv_heads * hd)
        self.o_proj = row(D, D, bias=False)
        if cfg.feedback_heads == 1:  # replicated: every rank needs the whole single head
            self.fb_proj = nn.Linear(D, 2 * D, dtype=mp.params_dtype)
            self.gamma_proj = nn.Linear(D, 1, bias=False, dtype=mp.params_dtype)
            self.gamma_bias = nn.Parameter(torch.zeros(1, dtype=mp.params_dtype))
        else:
            self.fb_q, self.fb_k = column(D, D), column(D, D)
            self.gamma_proj = column(D, cfg.feedback_heads, bias=False)
            self.gamma_bias = nn.Parameter(torch.zeros(cfg.feedback_heads // P, dtype=mp.params_dtype))
        self.out_proj = row(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, D), replicated over the TP group -> (B, T, D), replicated."""
        cfg, P = self.cfg, self.P
        u = self.norm(x)
        a = F.gelu(self.in_a(u)[0])
        g = self.in_g(u)[0]
        T, cp = x.shape[1], self.cp_size
        start = ps.get_context_parallel_rank() * T if cp > 1 else 0  # this rank's block of the sequence
        q = _heads(self.q_proj(a)[0], cfg.n_heads // P)
        k = _heads(self.k_proj(a)[0], cfg.kv_heads // P)
        v = _heads(self.v_proj(a)[0], cfg.kv_heads // P)
        if cfg.rope:
            angles = rope_angles(torch.arange(start, start + T, device=x.device), cfg.head_dim, cfg.rope_theta, x.dtype)
            q, k = apply_rope(q, angles), apply_rope(k, angles)
        gqa = cfg.kv_heads != cfg.n_heads
        if cp > 1:  # all-gather K/V over the context-parallel group; rows see keys up to their position
            group = ps.get_context_parallel_group()
            k, v = gather_sequence(k, group, 2), gather_sequence(v, group, 2)
            rows = torch.arange(start, start + T, device=x.device)[:, None]
            mask = torch.arange(T * cp, device=x.device)[None, :] <= rows
            f = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        else:
            f = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        f = self.o_proj(f.transpose(1, 2).flatten(2))[0]  # (B, T, D), all-reduced
        f_local = tp.scatter_to_tensor_model_parallel_region(f)  # this rank's D/P channels
        if cfg.feedback_heads == 1:
            fb = tp.copy_to_tensor_model_parallel_region(self.fb_proj(a))  # backward: all-reduce
            gamma = cfg.gamma_max * torch.tanh(self.gamma_bias + self.gamma_proj(a))
            gamma = tp.copy_to_tensor_model_parallel_region(gamma)
            q_b, k_b = (_heads(t, 1) for t in fb.chunk(2, dim=-1))
            heads = 1
        else:
            heads = cfg.feedback_heads // P
            q_b, k_b = _heads(self.fb_q(a)[0], heads), _heads(self.fb_k(a)[0], heads)
            gamma = cfg.gamma_max * torch.tanh(self.gamma_bias + self.gamma_proj(a)[0])
        scale = 1.0 / math.sqrt(cfg.d_model // cfg.feedback_heads)
        chunk = cfg.feedback_chunk_size or None
        f_heads, gamma = _heads(f_local, heads), gamma.transpose(1, 2)
        if cp > 1:  # ring forward substitution over the context-parallel group
            _, chunk = resolve_backend("auto", x.device, chunk)
            group = ps.get_context_parallel_group()
            s = feedback_solve_context_parallel(q_b, k_b, f_heads, gamma, scale, chunk, group, (T,) * cp)
        else:
            s = feedback_solve(q_b, k_b, f_heads, gamma, scale=scale, backend=cfg.feedback_backend, chunk_size=chunk)
        return x + self.out_proj(s.transpose(1, 2).flatten(2) * g)[0]
