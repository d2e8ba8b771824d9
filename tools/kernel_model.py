"""A roofline model of the Triton feedback solve's launch plan, against a causal SDPA of the same shape.

    python tools/kernel_model.py                       # H100, D = 1024, one feedback head, bf16
    python tools/kernel_model.py --gpu H200 --T 2048 8192 32768 --batch 1 8 --json model.json

For (B, H, T, D, block, dtype, GPU) and a kernel plan (``v1``: the previous release's kernels,
one strip and one solve launch per chunk forward, five per chunk backward; ``v2``: today's,
``sessa_train/ops/feedback_triton.py``), it lists every launch of one forward+backward with its
programs and per-program work, and bounds its time from below:

    per launch   max(compute, memory) + launch latency        (the chunk loop is sequential)
    compute      max(all its work / (peak x the fraction of SMs its programs can occupy),
                     its largest program's work / one SM's peak)
                 (a lone program may use its whole SM: optimistic, hence a lower bound). The
                 occupancy column, from the compile check's registers and shared memory
                 (tools/compile_kernels.py --json), says how far below the peak a launch will sit.
    memory       HBM bytes / HBM bandwidth + strip re-reads / L2 bandwidth (the strip of one chunk
                 step fits in L2)
    latency      per launch: eager 4 us (Python + driver), CUDA-graph replay 1.5 us

The causal SDPA is counted at FlashAttention-3-class efficiency: forward (QK^T, PV over half of
T^2) at 65% of the GPU's dense peak, backward (five such products) at 50%. What it does not
model: cache misses beyond the stated split of HBM and L2 traffic, tail effects within a wave,
tensor-core efficiency of thin tiles, the CPU's launch rate when not replaying a graph, and that
PyTorch's SDPA has no FlashAttention kernel for a 1024-wide head (the comparison assumes one).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

from compile_kernels import occupancy  # noqa: E402

from sessa_train.hardware import GPUS  # noqa: E402

LATENCY = {"eager": 4e-6, "graph": 1.5e-6}
SDPA_EFFICIENCY = {"forward": 0.65, "backward": 0.50}
RESOURCES = {"v1": REPO / "docs" / "kernel_resources_v1.json", "v2": REPO / "docs" / "kernel_resources_v2.json"}


@dataclass
class Launch:
    kernel: str
    programs: int
    flops: float  # of the largest program
    total_flops: float
    hbm: float = 0.0  # bytes
    l2: float = 0.0  # bytes re-read from L2


def _tile(width: int, block: int) -> int:
    return 16 if block == 128 else max(16, min(64, 2 ** math.ceil(math.log2(width))))


def plan(design: str, N: int, T: int, D: int, C: int, elt: int, sms: int) -> list[Launch]:
    """Every launch of one forward + backward of the solve for N sequences of T rows, width D."""
    nb = -(-T // C)
    Tp = nb * C
    BD = BK = _tile(D, C)
    tiles = -(-D // BD)
    gemm = 2 * C * C  # flops per row pair block, per feature
    solve = math.log2(C) * (2 * C * C * BD + 2 * C**3) + 2 * C * C * BD  # Neumann rounds and c = A x, one tile
    strip = C * Tp * elt  # bytes of one chunk's strip
    lse_work = N * gemm * D * nb * (nb + 1) / 2 + (N * nb * gemm * D if design == "v2" else 0)  # v2: + diagonal
    out: list[Launch] = [Launch("lse", N * nb, (nb + 1) * gemm * D, lse_work, N * T * D * elt * 2)]

    def splits(blocks: int, programs: int) -> int:
        return max(1, min(blocks, -(-2 * sms // programs)))

    for c in range(nb):  # forward
        if design == "v1":
            out.append(Launch("strip_mode0", N * (c + 1), gemm * D, N * (c + 1) * gemm * D, l2=0, hbm=strip))
            work = c * gemm * BD + solve
            out.append(Launch("solve_fwd", N * tiles, work, N * tiles * work, l2=N * tiles * c * C * C * 4))
        else:
            if c:
                out.append(Launch("strip", N * c, gemm * D, N * c * gemm * D, hbm=N * c * C * C * elt))
            S = splits(c, N * tiles)
            work = math.ceil(c / S) * gemm * BD
            fix = solve  # the last program: the solve, with A_RR from the lse pass
            out.append(
                Launch(
                    "fwd_step",
                    N * S * tiles,
                    work + fix,
                    N * tiles * (c * gemm * BD + fix),
                    l2=N * tiles * c * C * C * elt,
                )
            )
    if design == "v1":  # backward: the adjoint sweep, dgamma, then the gradient passes
        for c in range(nb - 1, -1, -1):
            later = nb - c - 1
            out.append(Launch("strip_mode0_column", N * (later + 1), gemm * D, N * (later + 1) * gemm * D, hbm=strip))
            work = later * gemm * BD + solve
            out.append(Launch("solve_bwd", N * tiles, work, N * tiles * work, l2=N * tiles * later * C * C * 4))
        out.append(Launch("dgamma", N * T, 2 * D, N * T * 2 * D, hbm=N * T * D * 8))
        for c in range(nb):
            out.append(Launch("strip_mode1", N * (c + 1), 2 * gemm * D, N * (c + 1) * 2 * gemm * D, hbm=strip))
            dq = (c + 1) * gemm * BK
            out.append(Launch("dq", N * tiles, dq, N * tiles * dq, l2=N * tiles * strip))
            out.append(
                Launch("dk", N * (c + 1) * tiles, gemm * BK, N * (c + 1) * tiles * gemm * BK, l2=N * tiles * strip)
            )
        return out
    out.append(Launch("diag", N * nb, gemm * D, N * nb * gemm * D, N * T * D * elt * 2))  # once, for the backward
    for c in range(nb - 1, -1, -1):  # backward: per chunk step, in the code's order
        later = nb - c - 1
        S = splits(later, N * tiles)
        work, total = math.ceil(later / S) * gemm * BD + solve, N * tiles * (later * gemm * BD + solve)
        out.append(Launch("bwd_step", N * S * tiles, work, total, l2=N * tiles * later * C * C * elt))
        column = nb - c if c else 0
        dl = 3 * gemm * D  # QK^T, lam s^T, and dk += L^T q
        total = N * ((c + 1) * dl + column * gemm * D)
        out.append(Launch("bwd_strips", N * (c + 1 + column), dl, total, hbm=N * strip))
        S = splits(c + 1, N * tiles)
        work, total = math.ceil((c + 1) / S) * gemm * BK, N * tiles * (c + 1) * gemm * BK
        out.append(Launch("dq", N * S * tiles, work, total, l2=N * tiles * (c + 1) * C * C * elt))
    return out


def resident(resources: list[dict], kernel: str, cc: int, dtype: str, block: int) -> dict:
    """The default launch's row of the compile check for this kernel (blocks per SM, occupancy)."""
    rows = [r for r in resources if r["kernel"] == kernel and r["capability"] == cc and r["block"] == block]
    rows = [r for r in rows if r["dtype"] == dtype] or rows
    row = next((r for r in rows if r.get("default", True) and "registers" in r), None)
    if row is None:  # a torch op (v1's dgamma): one block of 8 warps, no limit from us
        return {"blocks_per_sm": 8, "occupancy": 1.0, "registers": 0}
    if "blocks_per_sm" not in row:
        row = row | occupancy(cc, row["registers"], row["num_warps"], row["shared_bytes"])
    return row


def predict(args, design: str, B: int, T: int, resources: list[dict]) -> dict:
    gpu = GPUS[args.gpu]
    dtype = "float32" if args.dtype == "float32" else "bfloat16"
    peak = gpu.tf32 / 3 if dtype == "float32" else gpu.bf16  # tf32x3: three tf32 products per fp32 one
    elt = 4 if dtype == "float32" else 2
    N = B * args.heads
    D = args.d_model // args.heads
    launches = plan(design, N, T, D, args.block, elt, gpu.sms)
    latency = LATENCY["graph" if design == "v2" and args.graphs else "eager"]
    per_sm = peak / gpu.sms
    total_time = total_flops = hbm = l2 = 0.0
    occ = {}
    for la in launches:
        row = resident(resources, la.kernel, gpu.cc, dtype, args.block)
        occ[la.kernel] = row["occupancy"]
        fill = min(1.0, la.programs / gpu.sms)
        compute = max(la.total_flops / (peak * fill), la.flops / per_sm)
        memory = la.hbm / gpu.hbm + la.l2 / gpu.l2
        total_time += max(compute, memory) + latency
        total_flops += la.total_flops
        hbm, l2 = hbm + la.hbm, l2 + la.l2
    sdpa_flops = 2 * B * args.heads * T * T * D  # QK^T and PV over half of T^2: 2 * 2 * T^2 / 2 * D
    sdpa = sdpa_flops / (gpu.bf16 * SDPA_EFFICIENCY["forward"]) + 2.5 * sdpa_flops / (
        gpu.bf16 * SDPA_EFFICIENCY["backward"]
    )
    programs = sorted(la.programs for la in launches)
    return {
        "design": design,
        "gpu": args.gpu,
        "B": B,
        "T": T,
        "D": args.d_model,
        "heads": args.heads,
        "block": args.block,
        "dtype": dtype,
        "launches": len(launches),
        "programs_median": programs[len(programs) // 2],
        "programs_min": programs[0],
        "occupancy": occ,
        "tflop": total_flops / 1e12,
        "hbm_gb": hbm / 1e9,
        "l2_gb": l2 / 1e9,
        "solve_ms": total_time * 1e3,
        "sdpa_ms": sdpa * 1e3,
        "ratio": total_time / sdpa,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", choices=sorted(GPUS), default="H100")
    p.add_argument("--T", type=int, nargs="+", default=[2048, 8192, 32768])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--heads", type=int, default=1, help="feedback heads (the paper: one over the full width)")
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--designs", nargs="+", default=["v1", "v2"], choices=["v1", "v2"])
    p.add_argument("--no-graphs", dest="graphs", action="store_false", help="v2 without CUDA-graph replay")
    p.add_argument("--resources", nargs=2, type=Path, metavar=("V1", "V2"), help="compile-check JSON of each design")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    files = dict(zip(("v1", "v2"), args.resources, strict=True)) if args.resources else RESOURCES
    resources = {d: json.loads(Path(files[d]).read_text())["variants"] for d in args.designs}
    rows = [predict(args, d, B, T, resources[d]) for d in args.designs for B in args.batch for T in args.T]
    print(f"{args.gpu}, D = {args.d_model}, {args.heads} feedback head(s), {args.dtype}, block {args.block}")
    head = "| plan | B | T | launches | programs (median) | TFLOP | HBM GB | L2 GB | solve ms | SDPA ms | ratio |"
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    for r in rows:
        print(
            f"| {r['design']} | {r['B']} | {r['T']} | {r['launches']} | {r['programs_median']} | {r['tflop']:.1f} | "
            f"{r['hbm_gb']:.1f} | {r['l2_gb']:.1f} | {r['solve_ms']:.1f} | {r['sdpa_ms']:.1f} | {r['ratio']:.2f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
