"""Shared test helpers: random feedback-solve inputs and a tensor-size monitor."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

GAMMA_MAX = 0.999
# every subprocess a test starts runs under this limit: a guard against a hang, not a speed check:
# a few times the slowest quiet run (a real compile of every kernel variant, ~220 s with the Triton
# install; the shared tiny run, ~90 s) so that it holds on a loaded machine and a hang fails in minutes
HANG_GUARD_S = 600


def script(name: str) -> list[str]:
    """The command line of one of the package's console scripts (``sessa-export`` ...), as installed."""
    import sys
    from pathlib import Path

    return [str(Path(sys.executable).with_name(name))]


def feedback_inputs(B, H, T, Dk, Dv, gamma_regime="mid", dtype=torch.float64, seed=0):
    """q_b, k_b (B,H,T,Dk), f (B,H,T,Dv), gamma (B,H,T), all requiring grad."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, Dk, generator=g, dtype=dtype)
    k = torch.randn(B, H, T, Dk, generator=g, dtype=dtype)
    f = torch.randn(B, H, T, Dv, generator=g, dtype=dtype)
    u = torch.rand(B, H, T, generator=g, dtype=dtype)
    gamma = {
        "near_zero": 1e-6 * u,
        "mid": GAMMA_MAX * u,
        "near_max": GAMMA_MAX - 1e-4 * u,
    }[gamma_regime]
    return tuple(x.requires_grad_() for x in (q, k, f, gamma))


def random_like_shape(x: torch.Tensor, seed: int) -> torch.Tensor:
    """A fixed random tensor of x's shape (not its strides: solve outputs may be column-major),
    drawn in float64 so that every dtype and device gets the same values (rounded)."""
    w = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return w.to(device=x.device, dtype=x.dtype)


def output_and_grads(fn, inputs, seed=1):
    """Run fn(*inputs) -> out; return [out, d<out,w>/d input for each input] for a fixed random w."""
    out = fn(*inputs)
    grads = torch.autograd.grad((out * random_like_shape(out, seed)).sum(), inputs)
    return [out.detach(), *grads]


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an aten op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out
