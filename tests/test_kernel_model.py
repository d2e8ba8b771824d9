"""tools/kernel_model.py: its launch plan is the one the Triton solve really launches, and its
work matches a hand count."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from sessa_train.ops import feedback_triton as ft
from tests.helpers import feedback_inputs

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import kernel_model as km


def test_the_models_plan_is_the_launches_of_the_code(monkeypatch):
    """Forward and backward of N = 2 sequences, T = 200 (a partial last block), block 16: every
    launch's kernel and program count, in order, as the model lists them (same split target)."""
    sms = km.GPUS["H100"].sms
    monkeypatch.setattr(ft, "SPLIT_TARGET", 2 * sms)
    seen = []
    real = ft.launch
    monkeypatch.setattr(ft, "launch", lambda kernel, grid, *a, **kw: seen.append(
        (getattr(kernel, "fn", kernel).__name__.strip("_").removesuffix("_kernel"), math.prod(grid))
    ) or real(kernel, grid, *a, **kw))  # fmt: skip
    q, k, f, gamma = (
        x.detach().reshape(2, *x.shape[2:]) for x in feedback_inputs(1, 2, 200, 32, 32, dtype=torch.float32)
    )
    s, c, lse = ft.triton_forward(q, k, f, gamma, None, 0.2, 16)
    ft.triton_backward(torch.ones_like(s), q, k, gamma, None, s, c, lse, 0.2, 16)
    plan = km.plan("v2", N=2, T=200, D=32, C=16, elt=4, sms=sms)
    assert [(la.kernel, la.programs) for la in plan] == seen


def test_the_models_work_is_a_hand_count():
    """One sequence, T = 128, block 64 (two chunk steps), D = 64 (one feature tile)."""
    g = 2 * 64 * 64 * 64  # flops of one block pair over the 64 features
    solve = math.log2(64) * (2 * 64**2 * 64 + 2 * 64**3) + 2 * 64**2 * 64  # Neumann rounds and c = A x
    forward = [
        3 * g + 2 * g,  # lse over 1 + 2 key blocks, then both diagonal blocks
        solve,  # chunk 0: no earlier block
        g,  # chunk 1: its prefix strip
        g + solve,  # chunk 1: prefix product and solve
    ]
    backward = [
        2 * g,  # the diagonal blocks
        solve,  # chunk 1: no later block
        2 * 3 * g + g,  # chunk 1: dlogits and dk of its 2 key blocks (3 products each), column strip of chunk 0
        2 * g,  # chunk 1: dq over 2 key blocks
        g + solve,  # chunk 0: pull from chunk 1 and the adjoint solve
        3 * g,  # chunk 0: dlogits and dk of its one key block
        g,  # chunk 0: dq
    ]
    plan = km.plan("v2", N=1, T=128, D=64, C=64, elt=2, sms=132)
    assert [la.total_flops for la in plan] == forward + backward
