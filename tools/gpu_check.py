"""The GPU check: every CUDA path of the package, run once on a GPU, one JSON summary and a log.

    bash tools/gpu_check.sh [--out DIR] [--deadline 420] [--sections kernels model ...] [--quick]

Each section runs in its own process under a time limit (the smaller of its own and what is left
of ``--deadline``), so that a hang or a crash costs one section, not the run. After every section
``DIR/gpu_check.json`` (the summary) and ``DIR/gpu_check.log`` (each section's output) are
rewritten, so a run stopped from outside still leaves what finished. Sections, in order of value:

  device     the card and its two ceilings measured here: a device-to-device copy (bytes read
             plus written per second) and an 8192^3 bf16 matrix product (TFLOP/s), random data
  kernels    the Triton solve against the chunked torch solve, fp32 and bf16, T = 64 .. 16384,
             one document and packed documents, head widths 64 and 1024: the output and every
             gradient (q_b, k_b, f, gamma), as ||x - ref|| / ||ref||; against the float64
             reference up to T = 2048; the CUDA-graph replay equals the eager launches bit for bit
  model      SessaLM on CUDA: Triton vs chunked logits and every parameter gradient (fp32, bf16);
             prefill + token-by-token decode against the parallel forward
  nan_guard  non-finite feedback inputs give non-finite outputs, not a hang or a crash
  bench      tools/bench_feedback.py --device cuda: bf16, one feedback head of width 1024, B*T =
             64k tokens, T = 2k, 8k, 32k, forward and forward+backward: the Triton solve (eager
             and CUDA-graph replay), the chunked solve, causal SDPA of the same shape and
             flash-linear-attention's DeltaFormer solve (beta = -gamma), where installed; then
             16 heads of width 64 (the same FLOPs) for SDPA, Triton and DeltaFormer
  trainer    configs/tiny.yaml on the default corpus, torchrun with one process, NCCL, bf16: 30
             steps uninterrupted, and 15 + a resume to 30 from a checkpoint; losses compared
  train125m  configs/125m.yaml at seq 2048 (micro-batch 8, one micro-batch per step) for 20
             steps: tokens/s, MFU, peak memory and a profiler trace's top 10 kernels (steps 15-16)
  export     sessa-export of the tiny checkpoint; transformers' generate() on CUDA equals
             sessa_train.generate (greedy)

Exits 1 if a check fails. On a machine without CUDA, tools/gpu_check.sh says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# each section's own limit in seconds (the run's --deadline may cut it shorter)
DTYPES = ["float32", "bfloat16"]  # the kernel check's input dtypes (--dtypes)
LIMITS = {
    "device": 30,
    "kernels": 150,
    "model": 60,
    "nan_guard": 30,
    "bench": 180,
    "trainer": 150,
    "train125m": 120,
    "export": 60,
}


def _rel(a, b) -> float:
    """||a - b|| / ||b|| in float64 (0 for two zero tensors)."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------------------------
# sections (each runs in a child process and returns a dict with "ok")
# ---------------------------------------------------------------------------------------


def check_device(work: Path, quick: bool) -> dict:
    import torch

    props = torch.cuda.get_device_properties(0)
    out = {"name": props.name, "capability": f"{props.major}.{props.minor}", "sms": props.multi_processor_count}
    out["memory_gib"] = props.total_memory / 2**30
    x = torch.randn(2**30 // 2, device="cuda", dtype=torch.bfloat16)  # 1 GiB
    y = torch.empty_like(x)
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def timed(fn, n: int) -> float:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        start.record()
        for _ in range(n):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / n / 1e3

    out["copy_tb_s"] = 2 * x.numel() * 2 / timed(lambda: y.copy_(x), 20) / 1e12
    out["bf16_matmul_tflops"] = 2 * 8192**3 / timed(lambda: a @ b, 20) / 1e12
    out["ok"] = True
    return out


def _solve_inputs(B: int, T: int, D: int, dtype, seed: int, documents: int = 1):
    import torch

    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, f, w = (torch.randn(B, 1, T, D, device="cuda", generator=g) for _ in range(4))
    gamma = 0.999 * torch.rand(B, 1, T, device="cuda", generator=g)
    starts = None
    if documents > 1:  # random document boundaries, each row's own set
        cuts = torch.rand(B, T, device="cuda", generator=g) < (documents - 1) / T
        cuts[:, 0] = True
        index = torch.arange(T, device="cuda").expand(B, T)
        starts = torch.where(cuts, index, 0).cummax(dim=1).values
    return [x.to(dtype) for x in (q, k, f, gamma)], w, starts


def _solve_and_grads(inputs, w, starts, **kw):
    import torch

    from sessa_train.ops import feedback_solve

    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    s = feedback_solve(*leaves, key_start=starts, **kw)
    grads = torch.autograd.grad((s.double() * w.double()).sum(), leaves)
    return [s.detach(), *grads]


def check_kernels(work: Path, quick: bool) -> dict:
    """Triton vs chunked (and vs the fp64 reference up to T = 2048), output and every gradient.
    Each row also records its seconds (the first of a dtype and document mode compiles and tunes)."""
    import torch

    from sessa_train.ops import Solver

    names = ["s", "dq_b", "dk_b", "df", "dgamma"]
    # ||x - ref|| / ||ref||: float32 (tf32x3 solves) and bf16 operands (METHOD: 1e-3 .. 1e-2)
    bound = {"float32": 1e-4, "bfloat16": 2e-2}
    cases = [(1, 64, 64, 1), (1, 1000, 64, 1), (2, 2048, 64, 8), (1, 4096, 64, 1), (1, 2048, 1024, 1)]
    cases += [] if quick else [(1, 16384, 64, 1), (2, 8192, 64, 16)]
    rows = []
    for dtype in [getattr(torch, d) for d in DTYPES]:
        for B, T, D, docs in cases:
            began = time.perf_counter()
            inputs, w, starts = _solve_inputs(B, T, D, dtype, seed=T + D + docs, documents=docs)
            row = {"dtype": str(dtype).split(".")[1], "B": B, "T": T, "D": D, "documents": docs}
            try:
                triton = _solve_and_grads(inputs, w, starts, backend="triton")
                torch.cuda.synchronize()
                row["triton_first_s"] = round(time.perf_counter() - began, 2)
                chunked = _solve_and_grads(inputs, w, starts, backend="chunked")
                row["vs_chunked"] = {n: _rel(a, b) for n, a, b in zip(names, triton, chunked, strict=True)}
                if T <= 2048:
                    exact = _solve_and_grads([x.double() for x in inputs], w, starts, backend="reference")
                    row["vs_reference"] = {n: _rel(a, b) for n, a, b in zip(names, triton, exact, strict=True)}
                    row["chunked_vs_reference"] = {n: _rel(a, b) for n, a, b in zip(names, chunked, exact, strict=True)}
                finite = all(bool(torch.isfinite(x).all()) for x in triton)
                worst = max(max(row[k].values()) for k in ("vs_chunked", "vs_reference") if k in row)
                row["worst"] = worst
                row["ok"] = finite and worst < bound[row["dtype"]]
            except Exception as e:  # one case's failure is recorded; the rest still run
                row |= {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}
            row["seconds"] = round(time.perf_counter() - began, 2)
            print(json.dumps(row), flush=True)
            rows.append(row)
    inputs, w, _ = _solve_inputs(1, 4096, 64, torch.bfloat16, seed=5)  # the CUDA-graph replay = the eager launches
    eager = _solve_and_grads(inputs, w, None, solver=Solver("triton", 64, False))
    replayed = [_solve_and_grads(inputs, w, None, solver=Solver("triton", 64, True)) for _ in range(2)]
    same = all(torch.equal(a, b) for r in replayed for a, b in zip(eager, r, strict=True))
    ok = same and all(r["ok"] for r in rows)
    return {"rows": rows, "bounds": bound, "metric": "||x - ref|| / ||ref||", "graph_equals_eager": same, "ok": ok}


def check_nan_guard(work: Path, quick: bool) -> dict:
    """A NaN in row 100's query: rows of earlier blocks stay finite, the NaN reaches the output
    (the step is then skipped by the trainer), nothing hangs. Rows 64..99 share row 100's 64-row
    block, whose triangular solve multiplies the whole block (0 * NaN): reported, not required."""
    import torch

    from sessa_train.ops import Solver, feedback_solve

    inputs, _, _ = _solve_inputs(1, 256, 64, torch.float32, seed=1)
    inputs[0][0, 0, 100, 3] = float("nan")
    s = feedback_solve(*inputs, solver=Solver("triton", 64, False))
    torch.cuda.synchronize()
    earlier_blocks = bool(torch.isfinite(s[0, 0, :64]).all())
    same_block = bool(torch.isfinite(s[0, 0, 64:100]).all())
    propagates = not bool(torch.isfinite(s[0, 0, 100:]).all())
    out = {"earlier_blocks_finite": earlier_blocks, "same_block_earlier_rows_finite": same_block}
    return out | {"nan_propagates": propagates, "ok": earlier_blocks and propagates}


def check_model(work: Path, quick: bool) -> dict:
    """Triton vs chunked in one model: fp32 logits, loss and every parameter gradient; in bf16 each
    backend's gradients against the fp32 ones (the oracle), Triton within 2x of chunked's error."""
    import torch

    from sessa_train.config import ComputeConfig, ModelConfig
    from sessa_train.models import ModelPlan, SessaLM

    cfg = ModelConfig(vocab_size=512, d_model=256, n_layers=2, n_heads=4, feedback_heads=1)
    ids = torch.randint(0, 512, (2, 300), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        for backend in ("triton", "chunked"):
            torch.manual_seed(0)
            model = SessaLM(cfg, ModelPlan(ComputeConfig(feedback_backend=backend))).to("cuda", dtype)
            logits = model(ids[:, :-1])
            loss = model(ids[:, :-1], targets=ids[:, 1:]).mean()
            loss.backward()
            grads = {n: p.grad.float() for n, p in model.named_parameters()}
            runs[dtype, backend] = (logits.detach().float(), loss.item(), grads)
    xt, lt, gt = runs[torch.float32, "triton"]
    xc, lc, gc = runs[torch.float32, "chunked"]
    out: dict = {"parameters": len(gt)}
    out["float32"] = {"logits_rel": _rel(xt, xc), "loss_triton": lt, "loss_chunked": lc}
    out["float32"]["worst_grad_rel"] = max(_rel(gt[n], gc[n]) for n in gt)
    for backend in ("triton", "chunked"):  # bf16 against the fp32 chunked model
        x, loss, g = runs[torch.bfloat16, backend]
        errors = sorted(((_rel(g[n], gc[n]), n) for n in gc), reverse=True)
        out[f"bf16_{backend}"] = {"logits_rel": _rel(x, xc), "loss": loss, "worst_grads": errors[:4]}
    bt, bc = out["bf16_triton"], out["bf16_chunked"]
    tri, chu = dict((n, e) for e, n in bt["worst_grads"]), dict((n, e) for e, n in bc["worst_grads"])
    out["bf16_triton_vs_chunked_worst"] = bt["worst_grads"][0][0] / max(bc["worst_grads"][0][0], 1e-12)
    out["bf16_worst_named"] = {n: {"triton": tri.get(n), "chunked": chu.get(n)} for n in tri}
    torch.manual_seed(0)
    model = SessaLM(cfg).to("cuda").eval()
    with torch.no_grad():
        full = model(ids[:, :40])
        cache = model.init_cache(2, 40)
        steps = [model(ids[:, :10], cache)] + [model(ids[:, t : t + 1], cache) for t in range(10, 40)]
    out["decode_vs_parallel"] = _rel(torch.cat(steps, 1), full)
    f32 = out["float32"]
    out["ok"] = (
        f32["logits_rel"] < 1e-4
        and abs(f32["loss_triton"] - f32["loss_chunked"]) < 1e-4
        and f32["worst_grad_rel"] < 1e-3
        and bt["logits_rel"] < 2 * bc["logits_rel"] + 1e-3
        and out["bf16_triton_vs_chunked_worst"] < 2.0
        and out["decode_vs_parallel"] < 1e-4
    )
    return out


def _run(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, **kw)
    print(done.stdout[-6000:], done.stderr[-6000:], sep="\n", flush=True)
    if done.returncode:
        raise RuntimeError(f"exit code {done.returncode}: {' '.join(cmd[:6])} ...\n{done.stderr[-3000:]}")
    return done


def check_bench(work: Path, quick: bool) -> dict:
    """The solve's speed (bf16): width 1024 (all rows; DeltaFormer in its own, time-limited run)
    and 16 heads of 64. Each invocation's table goes to the log; the JSON keeps every point."""
    T = ["2048", "8192"] if quick else ["2048", "8192", "32768"]
    base = [sys.executable, str(REPO / "tools" / "bench_feedback.py"), "--device", "cuda", "--tokens", "65536"]
    base += ["--repeats", "5", "--T", *T]
    runs = {
        "width1024": (["--d-model", "1024", "--backends", "triton", "triton-graphs", "chunked"], 120),
        "width1024_deltaformer": (["--d-model", "1024", "--backends", "deltaformer"], 60),
        "heads16x64": (["--d-model", "64", "--heads", "16", "--backends", "triton-graphs", "deltaformer"], 60),
    }
    out: dict = {}
    for name, (extra, limit) in runs.items():
        path = work / f"bench_{name}.json"
        try:
            done = _run([*base, *extra, "--json", str(path)], limit)
            out[name] = {"table": done.stdout, "points": json.loads(path.read_text())}
        except Exception as e:
            out[name] = {"error": f"{type(e).__name__}: {e}"[:3000]}
    out["ok"] = "points" in out["width1024"]
    return out


def _prepare_data(work: Path, seq_len: int) -> tuple[Path, Path]:
    """The default corpus and tokenizer (sessa-prepare-default-data), its shards at ``seq_len``."""
    from sessa_train.data.cli import prepare_default_data_main, write_shards_main

    data = work / "data"
    if not (data / "shards" / "index.json").is_file():
        assert prepare_default_data_main(["--out-dir", str(data)]) == 0
    shards = data / "shards" if seq_len == 256 else data / f"shards-{seq_len}"
    if not (shards / "index.json").is_file():
        cmd = ["--input", str(data / "corpus.jsonl"), "--tokenizer", str(data / "tokenizer.model")]
        assert write_shards_main([*cmd, "--out", str(shards), "--seq-len", str(seq_len), "--no-progress"]) == 0
    return shards, data / "tokenizer.model"


def _train(work: Path, run: str, config: str, *extra: str, seq_len: int = 256, timeout: float = 600) -> list[dict]:
    """sessa-train under torchrun with one process (NCCL, bf16); the rows of its metrics.jsonl."""
    shards, tokenizer = _prepare_data(work, seq_len)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "-m", "sessa_train.train"]
    cmd += ["--config", str(REPO / "configs" / config)]
    cmd += [f"data.path={shards}", f"data.tokenizer={tokenizer}", "parallel.precision=bf16"]
    cmd += [f"checkpoint.dir={work / run / 'ckpt'}", f"logging.dir={work / run / 'tb'}"]
    _run([*cmd, *extra], timeout)
    rows = [json.loads(line) for line in (work / run / "tb" / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "train/loss" in r]


def check_trainer(work: Path, quick: bool) -> dict:
    """30 steps uninterrupted; 15, then a resume to 30 from the step-15 checkpoint."""
    steps = ["schedule.train_steps=30", "schedule.warmup_steps=3", "checkpoint.every_steps=15"]
    steps += ["logging.eval_every_steps=15"]
    start = time.perf_counter()
    whole = _train(work, "whole", "tiny.yaml", *steps)
    seconds = time.perf_counter() - start
    _train(work, "split", "tiny.yaml", *steps, "schedule.stop_after_steps=15")
    resumed = _train(work, "split", "tiny.yaml", *steps, "--resume", "auto")
    a, b = [r["train/loss"] for r in whole], [r["train/loss"] for r in resumed]
    drift = max(abs(x - y) / abs(y) for x, y in zip(a[15:], b[15:], strict=True)) if len(b) == 30 else float("nan")
    return {
        "losses": a,
        "resumed_losses": b,
        "resume_drift": drift,
        "seconds_30_steps": seconds,
        "tokens_per_s": [r.get("perf/tokens_per_s") for r in whole[-5:]],
        "ok": len(b) == 30 and drift < 1e-2 and a[-1] < a[0],
    }


def _top_kernels(trace_dir: Path, n: int = 10) -> list[dict]:
    """The n kernels with the most GPU time in a torch.profiler chrome trace."""
    traces = sorted(trace_dir.glob("*.pt.trace.json"))
    if not traces:
        return []
    events = json.loads(traces[-1].read_text())["traceEvents"]
    total: dict[str, list[float]] = {}
    for e in events:
        if e.get("cat") == "kernel":
            entry = total.setdefault(e["name"][:120], [0.0, 0])
            entry[0] += e.get("dur", 0.0)
            entry[1] += 1
    busy = sum(t for t, _ in total.values()) or 1.0
    ranked = sorted(total.items(), key=lambda kv: -kv[1][0])[:n]
    return [{"kernel": k, "ms": t / 1e3, "calls": c, "share": t / busy} for k, (t, c) in ranked]


def check_train125m(work: Path, quick: bool) -> dict:
    steps = 12 if quick else 20
    extra = [f"schedule.train_steps={steps}", "schedule.warmup_steps=5", "schedule.global_batch_size=8"]
    extra += ["data.micro_batch_size=8", f"checkpoint.every_steps={steps * 10}"]
    extra += [f"logging.eval_every_steps={steps * 10}", f"logging.profile_steps=[{steps - 5},{steps - 4}]"]
    rows = _train(work, "125m", "125m.yaml", *extra, seq_len=2048)
    late = rows[len(rows) // 2 :]  # past compilation and warm-up, the profiled steps left out
    late = [r for r in late if r["step"] not in (steps - 5, steps - 4)] or late

    def mean(key: str) -> float | None:
        values = [r[key] for r in late if key in r]
        return sum(values) / len(values) if values else None

    return {
        "steps": len(rows),
        "losses": [r["train/loss"] for r in rows],
        "tokens_per_s": mean("perf/tokens_per_s"),
        "tflops_per_s": mean("perf/tflops_per_s_per_device"),
        "mfu": mean("perf/mfu"),
        "step_time_s": mean("perf/step_time_s"),
        "max_memory_gib": max((r.get("perf/max_memory_gib", 0.0) for r in rows), default=None),
        "top_kernels": _top_kernels(work / "125m" / "tb" / "profile"),
        "ok": len(rows) == steps and rows[-1]["train/loss"] < rows[0]["train/loss"],
    }


def check_export(work: Path, quick: bool) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from sessa_train.export import export_checkpoint, load_pretrained
    from sessa_train.generate import generate

    run = next(r for r in ("whole", "125m") if (work / r / "ckpt").is_dir())  # whichever ran on this machine
    out = export_checkpoint(work / run / "ckpt", work / "export")
    hf = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).to("cuda").eval()
    ours = load_pretrained(out, device="cuda")
    ids = torch.randint(0, 4096, (2, 12), device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    with torch.no_grad():
        logits = _rel(hf(ids).logits, ours(ids))
        text = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
    greedy = torch.stack(list(generate(ours, ids, 16)), dim=1)
    same = bool(torch.equal(text[:, 12:], greedy))
    result = {"checkpoint": run, "logits_rel": logits, "generate_equals_sessa_generate": same}
    return result | {"ok": logits < 1e-5 and same}


CHECKS = {
    "device": check_device,
    "kernels": check_kernels,
    "model": check_model,
    "nan_guard": check_nan_guard,
    "bench": check_bench,
    "trainer": check_trainer,
    "train125m": check_train125m,
    "export": check_export,
}


# ---------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------


def run_section(name: str, work: Path, quick: bool) -> int:
    """In the child process: run one section, write ``work/<name>.json``."""
    start = time.perf_counter()
    try:
        result = CHECKS[name](work, quick)
    except Exception as e:  # recorded, and the check fails
        result = {"ok": False, "error": f"{type(e).__name__}: {e}"[:3000], "traceback": traceback.format_exc()[-4000:]}
    result["seconds"] = round(time.perf_counter() - start, 1)
    (work / f"{name}.json").write_text(json.dumps(result, indent=1, default=str))
    return 0


def _versions() -> dict:
    import torch
    import triton

    return {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/gpu_check"), help="where gpu_check.json and .log go")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: OUT/work)")
    p.add_argument("--deadline", type=float, default=900.0, help="seconds for the whole run")
    p.add_argument("--sections", nargs="+", choices=list(CHECKS), default=list(CHECKS))
    p.add_argument("--quick", action="store_true", help="shorter sweeps")
    p.add_argument("--dtypes", nargs="+", choices=DTYPES, default=DTYPES, help="the kernel check's input dtypes")
    p.add_argument("--section", choices=list(CHECKS), help=argparse.SUPPRESS)  # the child process
    args = p.parse_args(argv)
    work = args.work or args.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    DTYPES[:] = args.dtypes
    if args.section:
        return run_section(args.section, work, args.quick)

    began = time.monotonic()
    summary_path, log_path = args.out / "gpu_check.json", args.out / "gpu_check.log"
    summary: dict = _versions() | {"sections": args.sections, "deadline_s": args.deadline}
    log = open(log_path, "a")  # noqa: SIM115 (closed below)
    for name in args.sections:
        left = args.deadline - (time.monotonic() - began)
        limit = min(LIMITS[name], left)
        if limit < 10:
            result = {"ok": False, "error": f"not run: {left:.0f} s left of the --deadline"}
        else:
            log.write(f"\n===== {name} (limit {limit:.0f} s) {time.strftime('%H:%M:%S')} =====\n")
            log.flush()
            (work / f"{name}.json").unlink(missing_ok=True)
            start = time.perf_counter()
            cmd = [sys.executable, __file__, "--section", name, "--work", str(work), "--out", str(args.out)]
            cmd += ["--dtypes", *args.dtypes] + (["--quick"] if args.quick else [])
            child = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                child.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
            seconds = round(time.perf_counter() - start, 1)
            path = work / f"{name}.json"
            if path.is_file():
                result = json.loads(path.read_text())
            elif child.returncode == -signal.SIGKILL:
                result = {"ok": False, "error": f"timed out after {seconds} s (limit {limit:.0f} s)"}
            else:
                result = {"ok": False, "error": f"the section's process ended with code {child.returncode}"}
            result["wall_s"] = seconds
        summary[name] = result
        summary_path.write_text(json.dumps(summary, indent=1, default=str))
        print(f"{name:10s} {'ok' if result['ok'] else 'FAILED'}  ({result.get('wall_s', 0)} s)", flush=True)
    log.close()
    failed = [n for n in args.sections if not summary[n]["ok"]]
    print(
        f"gpu_check: {len(args.sections) - len(failed)}/{len(args.sections)} checks passed; summary in {summary_path}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    sys.exit(main())
