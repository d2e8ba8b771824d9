"""Time and peak memory of forward+backward: reference vs chunked feedback solve.

--scope layer (default): one SessaLayer (projections, SDPA forward branch and the solve);
--scope solve: the feedback solve alone, one head over the full width (the reference's).
--device cuda: the solve alone on the GPU in bf16 (--dtype), Triton vs chunked vs reference
vs a causal scaled_dot_product_attention of the same shape (B, 1, T, D): time, tokens/s,
TFLOP/s and peak memory (torch.cuda.max_memory_allocated), in this process.
--documents 1 8: each sample packed of that many equal documents (document masking): the
chunked solve (or the layer) at each count, time and peak memory side by side.
--blocks 64 128 256 --widths 64 256 1024: the chunked solve (one head of each width) at each
block size and T; the fastest block per (T, width) (a smaller one within 3% of it) is the table
``ops/feedback.py`` reads (``CHUNKED_BLOCKS``; the JSON's ``best``; tests/test_feedback_solve.py
checks the two agree).

Each (backend, T) point runs in a fresh subprocess. Peak memory is the growth of the
process's resident-set high-water mark (VmHWM) over its resident set just before the
first forward, so it counts every activation, autograd buffer and workspace of one
forward+backward. Time is the median of --repeats further runs. The reference is
skipped where its measured quadratic growth predicts more than --max-gib.

    python tools/bench_feedback.py                       # D=256, B=1, T=1k..16k
    python tools/bench_feedback.py --T 1024 2048 --json runs/bench.json
    python tools/bench_feedback.py --device cuda --T 2048 8192 32768 --d-model 1024
    python tools/bench_feedback.py --scope solve --T 8192 --d-model 1024 --documents 1 8
    python tools/bench_feedback.py --scope solve --T 1024 2048 4096 8192 --widths 64 256 1024 \
        --blocks 64 128 256 --json docs/bench_feedback_blocks.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(args: argparse.Namespace) -> dict:
    import torch

    from sessa_train.config import ComputeConfig, ModelConfig
    from sessa_train.models import ModelPlan, Positions, SessaLayer
    from sessa_train.ops import feedback_solve

    torch.manual_seed(0)
    T, D, backend = args.T[0], args.d_model, args.worker
    docs = args.documents[0]
    position_ids = (torch.arange(T) % -(-T // docs)).expand(args.batch, T) if docs > 1 else None
    pos = Positions.of(0, T, position_ids)
    if args.scope == "layer":
        cfg = ModelConfig(vocab_size=8, d_model=D, n_layers=1, n_heads=args.n_heads)
        layer = SessaLayer(cfg, ModelPlan(ComputeConfig(feedback_backend=backend, feedback_chunk_size=args.chunk_size)))
        inputs = [torch.randn(args.batch, T, D, requires_grad=True)]

        def forward(x):
            return layer(x, pos)

    else:
        shapes = [(args.batch, 1, T, D)] * 3 + [(args.batch, 1, T)]
        inputs = [torch.randn(shape).requires_grad_() for shape in shapes]
        with torch.no_grad():
            inputs[3].uniform_(0.0, 0.999)

        def forward(q, k, f, gamma):
            return feedback_solve(q, k, f, gamma, backend=backend, chunk_size=args.chunk_size, key_start=pos.doc_start)

    def step() -> float:
        start = time.perf_counter()
        forward(*inputs).square().mean().backward()
        elapsed = time.perf_counter() - start
        for x in inputs:
            x.grad = None
        return elapsed

    before = _rss_kib("VmRSS")
    first = step()
    peak = _rss_kib("VmHWM") - before
    times = [step() for _ in range(args.repeats)] or [first]
    return {"peak_mib": peak / 1024, "time_s": statistics.median(times), "first_s": first}


def attention_flops(T: int, D: int, batch: int) -> float:
    """FLOPs of causal attention fwd+bwd over (batch, heads, T, D), D the width of all heads together:
    2 GEMMs of T^2/2 x D forward, 2.5x that backward. The feedback solve's work has the same form
    (logits, then A @ s), so the same count is used for every row: TFLOP/s ratios are time ratios."""
    return 3.5 * forward_flops(T, D, batch)


def forward_flops(T: int, D: int, batch: int) -> float:
    """FLOPs of causal attention's forward: 2 GEMMs of T^2/2 x D."""
    return 2 * 2 * batch * (T * T / 2) * D


def _deltaformer_solve():
    """flash-linear-attention's DeltaFormer solve u = v - beta * A u (A the strictly causal softmax
    of q k^T / sqrt(D)), i.e. the feedback system with beta = -gamma, on (B, T, H, D) tensors; its
    autotuning pruned to two configs per kernel (compile time), one for heads wider than 128."""
    import triton
    from fla.ops.deltaformer import parallel

    for kernel in vars(parallel).values():
        if isinstance(kernel, triton.runtime.Autotuner) and len(kernel.configs) > 2:
            small = [c for c in kernel.configs if c.kwargs.get("BLOCK_C") == 64 and c.kwargs.get("BLOCK_T", 32) == 32]
            kernel.configs = small[:2] or kernel.configs[:2]

    def solve(q, k, f, gamma):  # (B, T, H, D) and (B, T, H)
        return parallel.ParallelDeltaformerFunction.apply(q, k, f, -gamma)

    return solve


def cuda_table(args: argparse.Namespace) -> None:
    import torch
    import torch.nn.functional as F

    from sessa_train.ops import Solver, feedback_solve

    dtype = getattr(torch, args.dtype)
    name = torch.cuda.get_device_name()
    H, D = args.heads, args.d_model
    print(f"# feedback solve on {name}, {args.dtype}, {H} head(s) of width {D}, B*T = {args.tokens or 'B'} tokens")
    columns = ["T", "B", "backend", "pass", "time (ms)", "tokens/s", "TFLOP/s", "peak (GiB)", "vs SDPA"]
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    runs = {
        "sdpa (causal)": lambda q, k, f, gamma: F.scaled_dot_product_attention(q, k, f, is_causal=True),
        "triton": functools.partial(feedback_solve, solver=Solver("triton", args.chunk_size, False)),
        "triton-graphs": functools.partial(feedback_solve, solver=Solver("triton", args.chunk_size, True)),
        "chunked": functools.partial(feedback_solve, backend="chunked"),
        "reference": functools.partial(feedback_solve, backend="reference"),
    }
    rows = []
    for T in sorted(args.T):
        B = max(1, args.tokens // T) if args.tokens else args.batch
        g = torch.Generator(device="cuda").manual_seed(0)
        shape = (B, H, T, D)
        q, k, f = (torch.randn(shape, device="cuda", dtype=dtype, generator=g) for _ in range(3))
        gamma = (0.999 * torch.rand(shape[:3], device="cuda", generator=g)).to(dtype)
        sdpa_ms: dict[str, float] = {}
        for backend in ["sdpa (causal)", *args.backends]:
            fn, inputs = runs.get(backend), (q, k, f, gamma)
            if backend == "deltaformer":
                try:
                    fn = _deltaformer_solve()
                except ImportError as e:
                    print(f"| {T} | {B} | deltaformer | - | not installed: {e} | - | - | - | - |", flush=True)
                    continue
                inputs = tuple(x.transpose(1, 2).contiguous() for x in inputs)  # (B, T, H, ...)
            for pass_ in args.passes:
                row = {"T": T, "B": B, "heads": H, "d": D, "backend": backend, "pass": pass_}
                row |= _cuda_point(fn, inputs, args.repeats, backward=pass_ == "fwdbwd")
                if "ms" in row:
                    flops = (attention_flops if pass_ == "fwdbwd" else forward_flops)(T, H * D, B)
                    row["tokens_per_s"] = B * T / (row["ms"] / 1e3)
                    row["tflops"] = flops / (row["ms"] / 1e3) / 1e12
                    if backend.startswith("sdpa"):
                        sdpa_ms[pass_] = row["ms"]
                    row["vs_sdpa"] = row["ms"] / sdpa_ms[pass_] if pass_ in sdpa_ms else None
                    cells = [f"{row['ms']:.2f}", f"{row['tokens_per_s']:.3g}", f"{row['tflops']:.1f}"]
                    cells += [f"{row['peak_gib']:.2f}", f"{row['vs_sdpa']:.2f}x" if row["vs_sdpa"] else "-"]
                else:
                    cells = [row["error"], "-", "-", "-", "-"]
                print(f"| {T} | {B} | {backend} | {pass_} | " + " | ".join(cells) + " |", flush=True)
                rows.append(row)
        del q, k, f, gamma
    args.json.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": name, "dtype": args.dtype, "tokens": args.tokens, "heads": H, "d_model": D}
    meta |= {"torch": torch.__version__, "block": args.chunk_size, "repeats": args.repeats}
    args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.json}")


def _cuda_point(fn, inputs, repeats: int, backward: bool) -> dict:
    """Median time (CUDA events) of ``repeats`` runs after one warm-up, and the peak memory above
    what was allocated before; forward only (no autograd graph) unless ``backward``."""
    import torch

    leaves = [x.detach().requires_grad_(backward) for x in inputs]

    def step() -> None:
        if backward:
            fn(*leaves).float().square().mean().backward()
            for x in leaves:
                x.grad = None
        else:
            with torch.no_grad():
                fn(*leaves)

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    try:
        step()  # compile / autotune / warm-up
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(max(1, repeats)):
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    except torch.OutOfMemoryError:
        return {"error": "out of memory"}
    except Exception as e:  # a backend that cannot run this shape (a compile error, say): one cell
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]}
    return {"ms": statistics.median(times), "peak_gib": (torch.cuda.max_memory_allocated() - base) / 2**30}


def run_point(args: argparse.Namespace, backend: str, T: int, documents: int = 1) -> dict:
    cmd = [sys.executable, __file__, "--worker", backend, "--T", str(T), "--d-model", str(args.d_model)]
    cmd += ["--n-heads", str(args.n_heads), "--batch", str(args.batch), "--chunk-size", str(args.chunk_size)]
    cmd += ["--repeats", str(args.repeats), "--scope", args.scope, "--documents", str(documents)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or [f"exit code {out.returncode}"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return 8.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scope", choices=["layer", "solve"], default="layer")
    p.add_argument("--T", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--chunk-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-gib", type=float, default=None, help="skip the reference beyond this (default: 60%% of free)")
    p.add_argument("--json", type=Path, default=Path("runs/bench_feedback.json"))
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="--device cuda only")
    p.add_argument(
        "--backends",
        nargs="+",
        default=["triton", "triton-graphs", "chunked"],
        help="--device cuda only",
        choices=["triton", "triton-graphs", "chunked", "reference", "deltaformer"],
    )
    p.add_argument("--tokens", type=int, default=0, help="--device cuda: B = tokens // T (0: --batch)")
    p.add_argument("--heads", type=int, default=1, help="--device cuda: feedback heads of width --d-model")
    p.add_argument("--passes", nargs="+", choices=["fwd", "fwdbwd"], default=["fwd", "fwdbwd"], help="--device cuda")
    p.add_argument("--documents", type=int, nargs="+", default=[1], help="equal documents per sample (CPU)")
    p.add_argument("--blocks", type=int, nargs="+", help="sweep the chunked solve's block size (CPU, --scope solve)")
    p.add_argument("--widths", type=int, nargs="+", help="head widths of the block sweep (default: --d-model)")
    p.add_argument("--worker", choices=["reference", "chunked"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if any(n < 1 for n in args.documents):
        p.error(f"--documents must be >= 1, got {args.documents}")
    for name in ("d_model", "n_heads", "batch", "chunk_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.repeats < 0 or any(t < 1 for t in args.T):
        p.error(f"--T values must be >= 1 and --repeats >= 0, got T={args.T} repeats={args.repeats}")
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda: no CUDA device is visible")
        if args.chunk_size not in (16, 32, 64):
            args.chunk_size = 64  # the triton backend's block (the CPU default 128 is the chunked one's)
        cuda_table(args)
        return

    import torch

    limit_gib = args.max_gib if args.max_gib is not None else 0.6 * available_gib()
    what = "one SessaLayer" if args.scope == "layer" else "feedback solve (1 head)"
    meta = {
        "scope": args.scope,
        "d_model": args.d_model,
        "n_heads": args.n_heads,
        "batch": args.batch,
        "chunk_size": args.chunk_size,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cores": os.cpu_count(),
        "machine": platform.machine(),
    }
    print(f"# {what} fwd+bwd, fp32, " + ", ".join(f"{k}={v}" for k, v in meta.items() if k != "scope"))
    if args.documents != [1]:
        documents_table(args, meta)
        return
    if args.blocks:
        if args.scope != "solve" or min(args.blocks) < 1:
            p.error(f"--blocks needs --scope solve and blocks >= 1, got --scope {args.scope} {args.blocks}")
        blocks_table(args, meta)
        return
    columns = ["T", "reference time (s)", "reference peak (MiB)", "chunked time (s)", "chunked peak (MiB)"]
    columns += ["speed-up", "memory ratio"]
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    rows, last_ref = [], None
    for T in sorted(args.T):
        predicted = None if last_ref is None else last_ref[1] * (T / last_ref[0]) ** 2 / 1024
        if predicted is not None and predicted > limit_gib:
            ref = {"skipped": f"skipped: predicted {predicted:.1f} GiB > {limit_gib:.1f} GiB"}
        else:
            ref = run_point(args, "reference", T)
            if "peak_mib" in ref:
                last_ref = (T, ref["peak_mib"])
        ch = run_point(args, "chunked", T)
        rows.append({"T": T, "reference": ref, "chunked": ch})
        both = "time_s" in ref and "time_s" in ch
        speed = f"{ref['time_s'] / ch['time_s']:.2f}x" if both else "-"
        mem = f"{ref['peak_mib'] / ch['peak_mib']:.1f}x" if both else "-"
        cells = [_cell(ref, "time_s", ".3f"), _cell(ref, "peak_mib", ".0f")]
        cells += [_cell(ch, "time_s", ".3f"), _cell(ch, "peak_mib", ".0f"), speed, mem]
        print(f"| {T} | " + " | ".join(cells) + " |", flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.json}")


def documents_table(args: argparse.Namespace, meta: dict) -> None:
    """The chunked solve at each documents-per-sample count: blocks before a row's document are skipped."""
    print("| T | documents | chunked time (s) | chunked peak (MiB) | time vs 1 document |\n|---|---|---|---|---|")
    rows = []
    for T in sorted(args.T):
        one = None
        for n in args.documents:
            point = run_point(args, "chunked", T, n)
            one = point if n == args.documents[0] else one
            ratio = f"{point['time_s'] / one['time_s']:.2f}x" if "time_s" in point and "time_s" in one else "-"
            cells = [_cell(point, "time_s", ".3f"), _cell(point, "peak_mib", ".0f"), ratio]
            print(f"| {T} | {n} | " + " | ".join(cells) + " |", flush=True)
            rows.append({"T": T, "documents": n, "chunked": point})
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta | {"documents": args.documents}, "rows": rows}, indent=1))
    print(f"wrote {args.json}")


def blocks_table(args: argparse.Namespace, meta: dict) -> None:
    """The chunked solve at each block size, per (T, width): the fastest block is the default."""
    print("| T | width | " + " | ".join(f"block {b} time (s) | peak (MiB)" for b in args.blocks) + " | fastest |")
    print("|---|---|" + "---|---|" * len(args.blocks) + "---|")
    rows, best = [], []
    for T in sorted(args.T):
        for width in args.widths or [args.d_model]:
            points = {}
            for block in args.blocks:
                point = run_point(argparse.Namespace(**{**vars(args), "d_model": width, "chunk_size": block}),
                                  "chunked", T)  # fmt: skip
                points[block] = point
                rows.append({"T": T, "width": width, "block": block, "chunked": point})
            timed = {b: p["time_s"] for b, p in points.items() if "time_s" in p}
            # the fastest, or a smaller block within 3% of it (less memory, and not a coin toss)
            fastest = min(b for b in timed if timed[b] <= 1.03 * min(timed.values())) if timed else None
            best.append({"T": T, "width": width, "block": fastest})
            cells = [f"{_cell(p, 'time_s', '.3f')} | {_cell(p, 'peak_mib', '.0f')}" for p in points.values()]
            print(f"| {T} | {width} | " + " | ".join(cells) + f" | {fastest} |", flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta | {"blocks": args.blocks}, "rows": rows, "best": best}, indent=1))
    print(f"wrote {args.json}")


def _cell(point: dict, key: str, fmt: str) -> str:
    return format(point[key], fmt) if key in point else point.get("skipped") or point.get("error", "?")


if __name__ == "__main__":
    main()
