"""The chunked feedback solve against the dense reference (the oracle)."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
import torch

from sessa_train.ops import feedback_decode_step, feedback_solve
from tests.helpers import LargestTensor, feedback_inputs, output_and_grads


def solve(backend, chunk_size=64):
    return functools.partial(feedback_solve, backend=backend, chunk_size=chunk_size)


@pytest.mark.parametrize("gamma_regime", ["near_zero", "mid", "near_max"])
@pytest.mark.parametrize(
    ("T", "chunk"),
    [(1, 4), (2, 1), (2, 4), (7, 3), (7, 7), (64, 16), (64, 24), (257, 64), (257, 32), (257, 10)],
)
def test_chunked_equals_reference_float64(T, chunk, gamma_regime):
    inputs = feedback_inputs(B=2, H=2, T=T, Dk=8, Dv=5, gamma_regime=gamma_regime)
    ref = output_and_grads(solve("reference"), inputs)
    got = output_and_grads(solve("chunked", chunk), inputs)
    for name, a, b in zip(["s", "dq_b", "dk_b", "df", "dgamma"], got, ref, strict=True):
        err = (a - b).abs().max().item()
        assert err < 1e-9, f"{name}: max abs error {err:.3e} (T={T}, chunk={chunk}, gamma={gamma_regime})"


@pytest.mark.parametrize("T", [7, 64, 257])
def test_chunked_equals_reference_float32_relative(T):
    inputs = feedback_inputs(B=1, H=2, T=T, Dk=16, Dv=16, gamma_regime="near_max", dtype=torch.float32)
    ref = output_and_grads(solve("reference"), inputs)
    got = output_and_grads(solve("chunked", 24), inputs)
    for name, a, b in zip(["s", "dq_b", "dk_b", "df", "dgamma"], got, ref, strict=True):
        rel = ((a - b).abs().max() / b.abs().max()).item()
        assert rel < 1e-4, f"{name}: relative error {rel:.3e} at T={T}"


def test_bfloat16_inputs_are_solved_in_float32():
    inputs = feedback_inputs(B=1, H=1, T=40, Dk=8, Dv=8, dtype=torch.float32)
    low = [x.detach().bfloat16().requires_grad_() for x in inputs]
    out = feedback_solve(*low, chunk_size=16)
    assert out.dtype == torch.bfloat16
    exact = feedback_solve(*(x.detach().float() for x in low), backend="reference")
    rel = ((out.float() - exact).abs().max() / exact.abs().max()).item()
    assert rel < 1e-2  # only the final cast to bf16 loses precision
    out.float().sum().backward()
    assert all(x.grad is not None and x.grad.dtype == torch.bfloat16 for x in low)


def test_gradcheck_chunked():
    inputs = feedback_inputs(B=1, H=2, T=11, Dk=3, Dv=2)
    assert torch.autograd.gradcheck(solve("chunked", 4), inputs, eps=1e-6, atol=1e-8)


def test_no_t_by_t_tensor_in_chunked_forward_or_backward():
    T, chunk = 512, 16
    inputs = feedback_inputs(B=1, H=1, T=T, Dk=8, Dv=8)
    monitor = LargestTensor()
    with monitor:
        out = feedback_solve(*inputs, backend="chunked", chunk_size=chunk)
        out.sum().backward()
    assert monitor.max_numel <= chunk * T, f"largest tensor has {monitor.max_numel} elements"
    # The monitor does see a materialised T x T system: the reference trips it.
    reference = LargestTensor()
    with reference:
        feedback_solve(*inputs, backend="reference").sum().backward()
    assert reference.max_numel >= T * T


def test_decode_step_equals_parallel_solve():
    q, k, f, gamma = (x.detach() for x in feedback_inputs(B=2, H=3, T=9, Dk=4, Dv=6))
    s = feedback_solve(q, k, f, gamma, backend="reference")
    scale = 4**-0.5
    for t in range(9):
        s_t = feedback_decode_step(q[:, :, t], k[:, :, :t], s[:, :, :t], f[:, :, t], gamma[:, :, t], scale)
        assert (s_t - s[:, :, t]).abs().max() < 1e-12


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"q": torch.zeros(2, 5, 4)}, "q_b must have rank 4"),
        ({"k": torch.zeros(1, 1, 6, 4)}, "k_b shape"),
        ({"f": torch.zeros(1, 2, 5, 3)}, "f shape"),
        ({"gamma": torch.zeros(1, 1, 4)}, "gamma shape"),
        ({"backend": "cuda-magic"}, "'cuda-magic'"),
        ({"chunk_size": 0}, "chunk_size must be >= 1, got 0"),
    ],
)
def test_bad_inputs_raise_value_error(kwargs, message):
    args = {"q": torch.zeros(1, 1, 5, 4), "k": torch.zeros(1, 1, 5, 4), "f": torch.zeros(1, 1, 5, 3)}
    args["gamma"] = torch.zeros(1, 1, 5)
    args.update(kwargs)
    q, k, f, gamma = (args.pop(n) for n in ("q", "k", "f", "gamma"))
    with pytest.raises(ValueError, match=re.escape(message)):
        feedback_solve(q, k, f, gamma, **args)


@pytest.mark.parametrize(("backend", "inner"), [("chunked", torch.float32), ("triton", torch.bfloat16)])
def test_bf16_model_hands_the_solve_bf16_and_it_accumulates_in_fp32(monkeypatch, backend, inner):
    """A bf16 model: the solve receives bf16 q_b, k_b, f, gamma; the blockwise solver runs on fp32
    copies (chunked) or on the bf16 tensors themselves (Triton, fp32 accumulators), and its state
    s, c, lse is fp32 either way; s returns as bf16, the loss is fp32, the parameter gradients bf16."""
    from sessa_train.config import ComputeConfig, ModelConfig
    from sessa_train.models import ModelPlan, SessaLM
    from sessa_train.ops import feedback

    cfg = ModelConfig(vocab_size=61, d_model=32, n_layers=1, n_heads=2)
    real, seen = feedback.solve_forward, []

    def spy(solver, q, k, f, gamma, scale, prefix=None, starts=None):
        out = real(solver, q, k, f, gamma, scale, prefix, starts)
        seen.append(([x.dtype for x in (q, k, f, gamma)], [x.dtype for x in out]))
        return out

    monkeypatch.setattr(feedback, "solve_forward", spy)
    torch.manual_seed(0)
    model = SessaLM(cfg, ModelPlan(ComputeConfig(feedback_backend=backend, feedback_chunk_size=16))).bfloat16()
    handed = []
    solve = model.plan.solve
    model.plan.solve = lambda q, k, f, gamma, scale, pos: (
        handed.append([x.dtype for x in (q, k, f, gamma)]) or solve(q, k, f, gamma, scale, pos)
    )
    ids = torch.randint(0, 61, (2, 40), generator=torch.Generator().manual_seed(1))
    loss = model(ids[:, :-1], targets=ids[:, 1:])
    loss.mean().backward()
    assert handed == [[torch.bfloat16] * 4]
    assert seen == [([inner] * 4, [torch.float32] * 3)]
    assert loss.dtype == torch.float32
    assert all(p.grad.dtype == torch.bfloat16 for p in model.parameters())
    with torch.no_grad():  # and the bf16 model computes what the fp32 one does, to bf16's precision
        reference = model.float()(ids[:, :-1], targets=ids[:, 1:])
    assert ((loss.float() - reference).abs().mean() / reference.mean()).item() < 2e-2


def test_the_chunked_default_block_is_the_measured_tables_choice():
    """ops/feedback.py's table is the sweep's result (docs/bench_feedback_blocks.json, written by
    tools/bench_feedback.py --blocks), and a solver takes the block of the nearest measured shape."""
    import json
    import math

    from sessa_train.ops.feedback import CHUNKED_BLOCKS, select_solver

    sweep = json.loads((Path(__file__).parent.parent / "docs" / "bench_feedback_blocks.json").read_text())
    assert {(b["T"], b["width"]): b["block"] for b in sweep["best"]} == CHUNKED_BLOCKS
    for row in sweep["best"]:  # the choice: the fastest, or a smaller block within 3% of it
        times = {
            r["block"]: r["chunked"]["time_s"]
            for r in sweep["rows"]
            if (r["T"], r["width"]) == (row["T"], row["width"])
        }
        assert row["block"] == min(b for b, t in times.items() if t <= 1.03 * min(times.values()))
    solver = select_solver("chunked", "cpu")
    for (T, width), block in CHUNKED_BLOCKS.items():
        assert solver.block(T, width) == block
        assert solver.block(int(T * 1.3), int(width * 0.8)) == block  # nearer to it than to any other
    far = min(CHUNKED_BLOCKS, key=lambda s: (abs(math.log2(s[0] / 100_000)) + abs(math.log2(s[1] / 16)), s))
    assert solver.block(100_000, 16) == CHUNKED_BLOCKS[far]
    assert select_solver("chunked", "cpu", chunk_size=32).block(8192, 1024) == 32  # the config's own wins
