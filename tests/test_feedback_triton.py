"""The Triton feedback kernels against the dense reference (the oracle).

Without a GPU they run under TRITON_INTERPRET=1 (tests/conftest.py); a separate subprocess
compiles every variant for sm_80 and sm_90 without the interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sessa_train.ops import feedback_solve
from sessa_train.ops import feedback_triton as ft
from sessa_train.ops.feedback import BACKENDS
from tests.helpers import HANG_GUARD_S, feedback_inputs, output_and_grads

REPO = Path(__file__).resolve().parents[1]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ["s", "dq_b", "dk_b", "df", "dgamma"]


def on_device(inputs):
    return tuple(x.detach().to(DEVICE).requires_grad_() for x in inputs)


def triton_solve(block):
    def fn(q, k, f, gamma):
        return feedback_solve(q, k, f, gamma, backend="triton", chunk_size=block)

    return fn


def reference_at(inputs):
    """Reference output and gradients in float64 at exactly the given (rounded) inputs."""
    exact = tuple(x.detach().cpu().double().requires_grad_() for x in inputs)
    return output_and_grads(triton_solve_reference, exact)


def triton_solve_reference(q, k, f, gamma):
    return feedback_solve(q, k, f, gamma, backend="reference")


def relative_errors(got, ref):
    return {
        n: ((a.double().cpu() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
        for n, a, b in zip(NAMES, got, ref, strict=True)
    }


@pytest.mark.parametrize(
    ("T", "Dk", "Dv", "block", "B", "H", "gamma_regime"),
    [
        (1, 32, 32, 16, 2, 2, "mid"),
        (31, 32, 32, 16, 1, 4, "near_max"),
        (31, 32, 64, 32, 2, 1, "mid"),
        (64, 64, 64, 32, 2, 2, "near_max"),
        (64, 32, 32, 16, 1, 2, "near_zero"),
        (200, 32, 32, 32, 2, 2, "mid"),
        (200, 64, 64, 16, 1, 1, "near_max"),
    ],
)
def test_triton_equals_reference_float32(T, Dk, Dv, block, B, H, gamma_regime):
    inputs = on_device(feedback_inputs(B, H, T, Dk, Dv, gamma_regime, dtype=torch.float32, seed=T))
    got = output_and_grads(triton_solve(block), inputs)
    errors = relative_errors(got, reference_at(inputs))
    assert max(errors.values()) < 1e-5, errors


@pytest.mark.parametrize(
    ("T", "block", "splits"),
    [(200, 16, 64), (131, 32, 3), (300, 128, 8), (129, 128, 1)],
)
def test_split_k_and_block_128_equal_reference_float32(monkeypatch, T, block, splits):
    """Split-K over many programs (each reduction shared by up to ``splits`` programs, whose last
    one sums the parts), and 128-row blocks, with unchanged tolerances."""
    monkeypatch.setattr(ft, "SPLIT_TARGET", splits)
    inputs = on_device(feedback_inputs(1, 1, T, 32, 48, "near_max", dtype=torch.float32, seed=T + block))
    got = output_and_grads(triton_solve(block), inputs)
    errors = relative_errors(got, reference_at(inputs))
    assert max(errors.values()) < 1e-5, errors


def _count_launches(monkeypatch, block: int, T: int):
    """(forward launches, backward launches, ops run between the first and the last launch of a
    chunk loop that allocate or synchronise with the host)."""
    counts = {"forward": [], "backward": []}
    phase, inside, seen = ["forward"], [False], []
    real_launch = ft.launch

    def counting(kernel, grid, *args, **kwargs):
        counts[phase[0]].append(getattr(kernel, "fn", kernel).__name__)
        inside[0] = len(counts[phase[0]]) > 1  # the chunk loop starts after the first launch
        real_launch(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(ft, "launch", counting)
    for name in ("empty", "zeros", "empty_like", "zeros_like", "full"):
        real = getattr(torch, name)

        def watched(*a, _real=real, _name=name, **kw):
            if inside[0]:
                seen.append(_name)
            return _real(*a, **kw)

        monkeypatch.setattr(torch, name, watched)
    real_item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda self: seen.append("item") or real_item(self))
    q, k, f, gamma = (
        x.detach().reshape(1, *x.shape[2:]) for x in feedback_inputs(1, 1, T, 16, 16, dtype=torch.float32)
    )
    s, c, lse = ft.triton_forward(q, k, f, gamma, None, 0.25, block)
    inside[0], phase[0] = False, "backward"
    ft.triton_backward(torch.ones_like(s), q, k, gamma, None, s, c, lse, 0.25, block)
    inside[0] = False
    return counts["forward"], counts["backward"], seen


@pytest.mark.parametrize(("T", "block"), [(100, 16), (256, 64)])
def test_launches_per_chunk_step_and_a_loop_fit_for_cuda_graphs(monkeypatch, T, block):
    """At most 2 launches per chunk step forward (after one lse pass) and 3 backward (after one pass
    over the diagonal blocks), and no allocation or host synchronisation inside the chunk loops (so
    a CUDA graph can capture them)."""
    forward, backward, seen = _count_launches(monkeypatch, block, T)
    steps = -(-T // block)
    assert forward[0] == "_lse_kernel" and len(forward) - 1 <= 2 * steps, forward
    assert backward[0] == "_diag_kernel" and len(backward) - 1 <= 3 * steps, backward
    assert forward.count("_fwd_step_kernel") == steps and backward.count("_dq_kernel") == steps
    assert seen == [], seen


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_precision_inputs(dtype):
    """Half inputs: half GEMM operands (fp16; bf16 is upcast in the interpreter), fp32 accumulation."""
    inputs = on_device(feedback_inputs(2, 2, 64, 32, 32, "near_max", dtype=torch.float32, seed=3))
    inputs = tuple(x.detach().to(dtype).requires_grad_() for x in inputs)
    got = output_and_grads(triton_solve(16), inputs)
    assert all(g.dtype == dtype for g in got)
    errors = relative_errors(got, reference_at(inputs))
    # fp16: inputs of 11 significant bits, bf16: 8; outputs are rounded to the input dtype
    assert max(errors.values()) < (1e-2 if dtype == torch.float16 else 3e-2), errors


def _poison(dtype: torch.dtype) -> float:
    """What unread memory holds in these tests: NaN, or for integers a value no index can be."""
    return float("nan") if dtype.is_floating_point else -(2**30)


def guarded(x: torch.Tensor, pad: int = 4096) -> torch.Tensor:
    """A contiguous copy of x sitting inside a poisoned buffer (NaN; integers far out of range):
    any out-of-bounds read shows."""
    buf = torch.full((x.numel() + 2 * pad,), _poison(x.dtype), dtype=x.dtype, device=x.device)
    view = buf[pad : pad + x.numel()].view(x.shape)
    view.copy_(x)
    return view


@pytest.mark.parametrize("docs", [False, True])
def test_no_out_of_bounds_or_unwritten_reads(monkeypatch, docs):
    """Inputs inside poisoned guards, and every buffer the kernels allocate poisoned first; with
    packed documents (of lengths that cut blocks anywhere) the skipped blocks are never read."""
    T, block = 45, 16  # T not a multiple of the block: partial last block, padded strips
    q, k, f, gamma = (
        x.detach().reshape(2, *x.shape[2:]).to(DEVICE)
        for x in feedback_inputs(1, 2, T, 24, 40, "near_max", dtype=torch.float32, seed=7)
    )
    lengths = [7, 20, 18]
    starts = torch.tensor([sum(lengths[:i]) for i, n in enumerate(lengths) for _ in range(n)], device=DEVICE)
    key_start = starts.expand(1, T) if docs else None
    G = torch.randn(2, T, 40, device=DEVICE)
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poisoned(make):
        return lambda *a, **kw: (t := make(*a, **kw)).fill_(_poison(t.dtype))

    monkeypatch.setattr(torch, "empty", poisoned(real_empty))
    monkeypatch.setattr(torch, "empty_like", poisoned(real_empty_like))
    args = [guarded(x) for x in (q, k, f, gamma)]
    flat = guarded(starts.expand(2, T).contiguous()) if docs else None
    s, c, lse = ft.triton_forward(*args, flat, 24**-0.5, block)
    grads = ft.triton_backward(
        guarded(G), args[0], args[1], args[3], flat, guarded(s), guarded(c), guarded(lse), 24**-0.5, block
    )
    monkeypatch.undo()
    for name, x in zip(["s", "c", "lse", "dq", "dk", "df", "dgamma"], [s, c, lse, *grads], strict=True):
        assert torch.isfinite(x).all(), f"{name} has non-finite entries"
    exact = tuple(x.detach().double().cpu().requires_grad_() for x in (q, k, f, gamma))
    ref = feedback_solve(*(x.unsqueeze(0) for x in exact), backend="reference", key_start=key_start).squeeze(0)
    ref_grads = torch.autograd.grad(ref, exact, G.double().cpu())
    for name, a, b in zip(NAMES, [s, *grads], [ref.detach(), *ref_grads], strict=True):
        assert (a.double().cpu() - b).abs().max() / b.abs().max() < 1e-5, name


def test_model_with_triton_backend_equals_chunked():
    from sessa_train.config import ComputeConfig, ModelConfig
    from sessa_train.models import ModelPlan, SessaLM

    cfg = ModelConfig(vocab_size=53, d_model=32, n_layers=2, n_heads=2, feedback_heads=2)
    tokens = torch.randint(0, 53, (2, 40), generator=torch.Generator().manual_seed(0))
    results = []
    for backend in ("chunked", "triton"):
        torch.manual_seed(0)
        model = SessaLM(cfg, ModelPlan(ComputeConfig(feedback_backend=backend, feedback_chunk_size=16)))
        loss = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_c, grads_c), (loss_t, grads_t) = results
    assert abs(loss_c.item() - loss_t.item()) < 1e-5
    for name, g in grads_c.items():
        assert (grads_t[name] - g).abs().max() <= 1e-4 * g.abs().max() + 1e-7, name


@pytest.mark.parametrize(
    ("env", "device", "expected"),
    [
        (None, "cpu", "chunked"),
        (None, "cuda", "triton"),
        ("reference", "cuda", "reference"),
        ("triton", "cpu", "triton"),
    ],
)
def test_auto_backend_and_environment_switch(monkeypatch, env, device, expected):
    from sessa_train.ops.feedback import BACKEND_ENV, Solver, select_solver

    if env is None:
        monkeypatch.delenv(BACKEND_ENV, raising=False)
    else:
        monkeypatch.setenv(BACKEND_ENV, env)
    assert select_solver("auto", torch.device(device)).backend == expected
    assert select_solver("chunked", torch.device(device)) == Solver("chunked")  # an explicit choice stays
    # CUDA graphs: only the Triton kernels on CUDA replay their chunk loops from a graph
    assert select_solver("triton", torch.device("cuda"), 64, graphs=True) == Solver("triton", 64, True)
    assert not select_solver("chunked", torch.device("cuda"), graphs=True).graphs


def test_bad_backend_requests_are_one_line_errors(monkeypatch):
    from sessa_train.ops.feedback import BACKEND_ENV

    inputs = [x.detach() for x in feedback_inputs(1, 1, 8, 16, 16, dtype=torch.float32)]
    monkeypatch.setenv(BACKEND_ENV, "cuda-fast")
    with pytest.raises(ValueError, match="SESSA_FEEDBACK_BACKEND='cuda-fast' is not a feedback backend; valid: auto"):
        feedback_solve(*inputs)
    monkeypatch.delenv(BACKEND_ENV)
    with pytest.raises(ValueError, match=r"chunk_size in \(16, 32, 64, 128\), got 24"):
        feedback_solve(*inputs, backend="triton", chunk_size=24)
    with pytest.raises(ValueError, match="one dtype among"):
        feedback_solve(inputs[0].double(), *inputs[1:], backend="triton", chunk_size=16)
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="needs CUDA tensors \\(got device cpu\\); on CPU use backend 'chunked'"):
            feedback_solve(*inputs, backend="triton", chunk_size=16)


@pytest.mark.slow
def test_every_kernel_variant_compiles_for_sm80_and_sm90(tmp_path):
    """triton.compile for GPUTarget("cuda", 80/90, 32) in a subprocess without the interpreter, or
    its record (docs/kernel_compile/) where that was compiled from today's sources and Triton."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # a compile is a real one, never Triton's cache
    out = subprocess.run(
        [sys.executable, "tools/compile_kernels.py", "--reuse", "--json", str(tmp_path / "kernels.json")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads((tmp_path / "kernels.json").read_text())
    rows = report["variants"]
    sys.path.insert(0, str(REPO / "tools"))
    from compile_kernels import key, variants

    assert report["key"] == key(report["triton"])  # about today's kernels

    expected = set(variants())
    default = BACKENDS["triton"].default_block(4096, 1024)
    assert {(cc, dt, b, name) for cc, dt, b, name, _ in expected} == {
        (cc, dt, b, name)
        for cc in (80, 90)
        for dt in ("float32", "bfloat16", "float16")
        for b in BACKENDS["triton"].blocks
        if ft.block_fits(b, getattr(torch, dt), cc)
        for docs in ((False, True) if b == default else (False,))
        for name, *_ in ft.kernel_variants(b, getattr(torch, dt), docs=docs)
    }
    assert {(r["dtype"], r["block"]) for r in rows if r["capability"] == 80 and r["block"] == 128} == set()
    assert {(r["capability"], r["dtype"], r["block"], r["kernel"], r["num_warps"]) for r in rows} == expected
    for r in rows:
        assert r["ok"] and 0 < r["shared_bytes"] <= report["shared_limit"][str(r["capability"])], r
        assert r["cubin_bytes"] > 0


@pytest.mark.slow
def test_compile_check_fails_when_a_default_half_precision_variant_spills(tmp_path):
    """With 4 warps as the default launch, bf16 bwd_strips spills (sm_90, block 64): refused."""
    code = (
        "import sys; sys.path.insert(0, 'tools'); import compile_kernels as ck\n"
        "import sessa_train.ops.feedback_triton as ft\n"
        "ft.NUM_WARPS = (4, 8)\n"
        "print(ck.compile_one((90, 'bfloat16', 64, 'bwd_strips', 4)))\n"
        "print(ck.compile_one((90, 'bfloat16', 64, 'bwd_strips', 8)))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_CACHE_DIR": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S
    )
    assert out.returncode == 0, out.stderr[-2000:]
    default, other = (eval(line) for line in out.stdout.strip().splitlines()[-2:])
    assert not default["ok"] and default["error"] == f"default launch spills {default['stack_bytes']} bytes per thread"
    assert default["stack_bytes"] > 0 and default["registers"] == 255
    assert other["ok"] and not other["default"]  # a non-default autotune config may spill; it is reported only


def test_gpu_check_says_it_needs_cuda_and_exits_0_on_a_cpu_machine(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the check would really run")
    out = subprocess.run(
        ["bash", str(REPO / "tools" / "gpu_check.sh"), "--out", str(tmp_path / "g.json")],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    line = out.stdout.strip()
    assert out.returncode == 0 and len(line.splitlines()) == 1
    assert line.startswith("gpu_check: needs a CUDA GPU (torch.cuda.is_available() is False") and line.endswith("run")
    assert not (tmp_path / "g.json").exists()


@pytest.mark.slow
def test_every_kernel_variant_compiles_with_the_oldest_triton_allowed(tmp_path):
    """pyproject.toml allows triton>=X.Y: the same check with Triton X.Y.0 (pip-installed into a
    cache folder on first use), so the kernels also build on the machines that have it."""
    import re

    oldest = re.search(r'"triton>=([0-9.]+)"', (REPO / "pyproject.toml").read_text())[1]
    version = oldest if oldest.count(".") == 2 else f"{oldest}.0"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_CACHE_DIR": str(tmp_path)}
    cmd = [sys.executable, "tools/compile_kernels.py", "--triton", version, "--reuse"]
    cmd += ["--json", str(tmp_path / "k.json")]
    out = subprocess.run(
        cmd,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads((tmp_path / "k.json").read_text())
    sys.path.insert(0, str(REPO / "tools"))
    from compile_kernels import key

    assert report["triton"] == version and report["key"] == key(version) and len(report["variants"]) > 100
    assert all(r["ok"] for r in report["variants"])


def test_a_compile_record_holds_only_for_the_sources_it_was_compiled_from(tmp_path):
    """The record's key changes with each kernel source, this script and the Triton release."""
    import shutil

    sys.path.insert(0, str(REPO / "tools"))
    from compile_kernels import KEY_FILES, key

    for name in KEY_FILES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, tmp_path / name)
    today = key("3.9.0", tmp_path)
    assert today == key("3.9.0", REPO) and key("3.4.0", tmp_path) != today
    for name in KEY_FILES:
        original = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(original + b"\n# changed\n")
        assert key("3.9.0", tmp_path) != today, name
        (tmp_path / name).write_bytes(original)
