"""The GPU check: every CUDA path of the package, run once on a GPU, one JSON summary.

    bash tools/gpu_check.sh [--out gpu_check.json] [--quick]

Checks (each a section of the summary, with its numbers and ``ok``):
  kernels   the Triton solve against the chunked torch solve on CUDA, fp32 and bf16,
            T from 64 to 16384: the output and every gradient (q_b, k_b, f, gamma); and both
            against the float64 reference up to T = 2048; the CUDA-graph replay equals the
            eager launches bit for bit
  nan_guard non-finite feedback inputs give non-finite outputs, not a hang or a crash
  model     SessaLM on CUDA: Triton vs chunked logits and parameter gradients (fp32, bf16);
            prefill + token-by-token decode against the parallel forward
  trainer   configs/tiny.yaml on the default corpus, one process, NCCL, bf16: 30 steps
            uninterrupted, and 15 + a resume to 30 from a checkpoint; losses compared. Both run
            under tests/nccl_rules.py, so a collective handed a CPU tensor fails here.
  export    sessa-export of that checkpoint; transformers' generate() on CUDA equals
            sessa_train.generate (greedy)
  bench     tools/bench_feedback.py --device cuda (bf16, D = 1024, one feedback head)
Exits 1 if a check fails. On a machine without CUDA, tools/gpu_check.sh says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _solve_inputs(T: int, D: int, dtype, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, f = (torch.randn(1, 1, T, D, device="cuda", generator=g) for _ in range(3))
    gamma = 0.999 * torch.rand(1, 1, T, device="cuda", generator=g)
    w = torch.randn(1, 1, T, D, device="cuda", generator=g)
    return [x.to(dtype) for x in (q, k, f, gamma)], w


def _solve_and_grads(inputs, w, **kw):
    from sessa_train.ops import feedback_solve

    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    s = feedback_solve(*leaves, **kw)
    grads = torch.autograd.grad((s.double() * w.double()).sum(), leaves)
    return [s.detach(), *grads]


def check_kernels(quick: bool) -> dict:
    """Triton vs chunked (and vs fp64 reference up to T = 2048), output and every gradient."""
    names = ["s", "dq_b", "dk_b", "df", "dgamma"]
    bound = {"float32": 1e-4, "bfloat16": 5e-2}
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for T in (64, 1000, 4096) if quick else (64, 1000, 4096, 16384):
            inputs, w = _solve_inputs(T, 64, dtype, seed=T)
            triton = _solve_and_grads(inputs, w, backend="triton")
            chunked = _solve_and_grads(inputs, w, backend="chunked")
            row = {"dtype": str(dtype).split(".")[1], "T": T}
            row["vs_chunked"] = {n: _rel(a, b) for n, a, b in zip(names, triton, chunked, strict=True)}
            if T <= 2048:
                exact = _solve_and_grads([x.double() for x in inputs], w, backend="reference")
                row["vs_reference"] = {n: _rel(a, b) for n, a, b in zip(names, triton, exact, strict=True)}
            worst = max(max(row[k].values()) for k in ("vs_chunked", "vs_reference") if k in row)
            row["ok"] = worst < bound[row["dtype"]]
            rows.append(row)
    from sessa_train.ops import Solver

    inputs, w = _solve_inputs(4096, 64, torch.bfloat16, seed=5)  # the CUDA-graph replay = the eager launches
    eager = _solve_and_grads(inputs, w, solver=Solver("triton", 64, False))
    replayed = [_solve_and_grads(inputs, w, solver=Solver("triton", 64, True)) for _ in range(2)]
    same = all(torch.equal(a, b) for r in replayed for a, b in zip(eager, r, strict=True))
    return {"rows": rows, "bounds": bound, "graph_equals_eager": same, "ok": same and all(r["ok"] for r in rows)}


def check_nan_guard() -> dict:
    from sessa_train.ops import feedback_solve

    inputs, _ = _solve_inputs(256, 64, torch.float32, seed=1)
    inputs[0][0, 0, 100, 3] = float("nan")
    s = feedback_solve(*inputs, backend="triton")
    torch.cuda.synchronize()
    before, propagates = bool(torch.isfinite(s[0, 0, :100]).all()), not bool(torch.isfinite(s).all())
    return {"finite_before_the_nan_row": before, "nan_propagates": propagates, "ok": before and propagates}


def check_model() -> dict:
    from sessa_train.config import ComputeConfig, ModelConfig
    from sessa_train.models import ModelPlan, SessaLM

    cfg = ModelConfig(vocab_size=512, d_model=256, n_layers=2, n_heads=4, feedback_heads=1)
    ids = torch.randint(0, 512, (2, 300), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        runs = []
        for backend in ("triton", "chunked"):
            torch.manual_seed(0)
            model = SessaLM(cfg, ModelPlan(ComputeConfig(feedback_backend=backend))).to("cuda", dtype)
            loss = model(ids[:, :-1], targets=ids[:, 1:]).mean()
            loss.backward()
            runs.append((loss.item(), {n: p.grad.float() for n, p in model.named_parameters()}))
        (lt, gt), (lc, gc) = runs
        worst = max(_rel(gt[n], gc[n]) for n in gt)
        out[str(dtype).split(".")[1]] = {"loss_triton": lt, "loss_chunked": lc, "worst_grad_rel": worst}
    torch.manual_seed(0)
    model = SessaLM(cfg).to("cuda").eval()
    with torch.no_grad():
        full = model(ids[:, :40])
        cache = model.init_cache(2, 40)
        steps = [model(ids[:, :10], cache)] + [model(ids[:, t : t + 1], cache) for t in range(10, 40)]
    out["decode_vs_parallel"] = _rel(torch.cat(steps, 1), full)
    out["ok"] = (
        abs(out["float32"]["loss_triton"] - out["float32"]["loss_chunked"]) < 1e-4
        and out["float32"]["worst_grad_rel"] < 1e-3
        and out["bfloat16"]["worst_grad_rel"] < 1e-1
        and out["decode_vs_parallel"] < 1e-4
    )
    return out


def _train(work: Path, run: str, *extra: str) -> list[float]:
    data = work / "data"
    cmd = [sys.executable, str(REPO / "tests" / "rules_train.py"), "--config", str(REPO / "configs" / "tiny.yaml")]
    cmd += [f"data.path={data / 'shards'}", f"data.tokenizer={data / 'tokenizer.model'}", "parallel.precision=bf16"]
    cmd += ["schedule.train_steps=30", "schedule.warmup_steps=3", "checkpoint.every_steps=15"]
    cmd += [f"checkpoint.dir={work / run / 'ckpt'}", f"logging.dir={work / run / 'tb'}", "logging.eval_every_steps=15"]
    done = subprocess.run([*cmd, *extra], cwd=REPO, capture_output=True, text=True, timeout=1800)
    if done.returncode:
        raise RuntimeError(f"training failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return [json.loads(line)["train/loss"] for line in (work / run / "tb" / "metrics.jsonl").read_text().splitlines()]


def check_trainer(work: Path) -> dict:
    from sessa_train.data.cli import prepare_default_data_main

    assert prepare_default_data_main(["--out-dir", str(work / "data")]) == 0
    start = time.perf_counter()
    whole = _train(work, "whole")
    seconds = time.perf_counter() - start
    _train(work, "split", "schedule.stop_after_steps=15")
    resumed = _train(work, "split", "--resume", "auto")
    drift = max(abs(a - b) / b for a, b in zip(whole[15:], resumed[15:], strict=True))
    return {
        "losses": whole,
        "resumed_losses": resumed,
        "resume_drift": drift,
        "seconds_30_steps": seconds,
        "ok": len(resumed) == 30 and drift < 1e-2 and whole[-1] < whole[0],
    }


def check_export(work: Path) -> dict:
    from transformers import AutoModelForCausalLM

    from sessa_train.export import export_checkpoint, load_pretrained
    from sessa_train.generate import generate

    out = export_checkpoint(work / "whole" / "ckpt", work / "export")
    hf = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).to("cuda").eval()
    ours = load_pretrained(out, device="cuda")
    ids = torch.randint(0, 4096, (2, 12), device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    with torch.no_grad():
        logits = _rel(hf(ids).logits, ours(ids))
        text = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
    greedy = torch.stack(list(generate(ours, ids, 16)), dim=1)
    same = bool(torch.equal(text[:, 12:], greedy))
    return {"logits_rel": logits, "generate_equals_sessa_generate": same, "ok": logits < 1e-5 and same}


def check_bench(work: Path, quick: bool) -> dict:
    out = work / "bench_feedback.json"
    T = ["2048", "8192"] if quick else ["2048", "8192", "32768"]
    cmd = [sys.executable, str(REPO / "tools" / "bench_feedback.py"), "--device", "cuda", "--d-model", "1024"]
    done = subprocess.run([*cmd, "--T", *T, "--json", str(out)], cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return {"table": done.stdout, "points": json.loads(out.read_text()), "ok": True}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    p.add_argument("--work", type=Path, default=Path("runs/gpu_check"))
    p.add_argument("--quick", action="store_true", help="shorter kernel and benchmark sweeps")
    args = p.parse_args(argv)
    import triton

    args.work.mkdir(parents=True, exist_ok=True)
    summary: dict = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }
    checks = {
        "kernels": lambda: check_kernels(args.quick),
        "nan_guard": check_nan_guard,
        "model": check_model,
        "trainer": lambda: check_trainer(args.work),
        "export": lambda: check_export(args.work),
        "bench": lambda: check_bench(args.work, args.quick),
    }
    for name, check in checks.items():
        start = time.perf_counter()
        try:
            result = check()
        except Exception as e:  # recorded, and the check fails
            result = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
        result["seconds"] = round(time.perf_counter() - start, 1)
        summary[name] = result
        print(f"{name:10s} {'ok' if result['ok'] else 'FAILED'}  ({result['seconds']} s)", flush=True)
        args.out.write_text(json.dumps(summary, indent=1, default=str))
    failed = [n for n in checks if not summary[n]["ok"]]
    print(f"gpu_check: {len(checks) - len(failed)}/{len(checks)} checks passed; summary in {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    sys.exit(main())
