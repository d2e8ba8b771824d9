"""Ahead-of-time compile every Triton feedback-kernel variant for A100 (sm_80) and H100 (sm_90).

No GPU is needed: ``triton.compile`` with a ``GPUTarget`` runs the whole pipeline down to a
cubin (ptxas included). Prints one row per variant with its static shared memory and writes
JSON; exits 1 if a variant fails to compile or needs more shared memory than the target has.

    python tools/compile_kernels.py [--json out.json] [--jobs 2]

Run it without ``TRITON_INTERPRET`` (the interpreter never compiles).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

# Largest shared memory one block may use (opt-in), bytes: CUDA C Programming Guide, compute capabilities.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
DTYPES = ("float32", "bfloat16", "float16")


def variants() -> list[tuple[int, str, int, str, int]]:
    """(capability, dtype, block, kernel name, num_warps): every kernel for every dtype and block
    with the first autotune config, and every further autotune config at the default block."""
    from sessa_train.ops.feedback import DEFAULT_CHUNK_SIZE, TRITON_BLOCK_SIZES
    from sessa_train.ops.feedback_triton import NUM_WARPS, kernel_variants

    out = []
    for cc in SHARED_LIMIT:
        for dtype in DTYPES:
            for block in TRITON_BLOCK_SIZES:
                warps = NUM_WARPS if block == DEFAULT_CHUNK_SIZE["triton"] and dtype != "float16" else NUM_WARPS[:1]
                for name, *_ in kernel_variants(block, _torch_dtype(dtype)):
                    out.extend((cc, dtype, block, name, w) for w in warps)
    return out


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def compile_one(job: tuple[int, str, int, str, int]) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    from sessa_train.ops.feedback_triton import kernel_variants

    cc, dtype, block, name, num_warps = job
    row = {"capability": cc, "dtype": dtype, "block": block, "kernel": name, "num_warps": num_warps}
    (kernel, signature, constexprs) = next(v[1:] for v in kernel_variants(block, _torch_dtype(dtype)) if v[0] == name)
    start = time.perf_counter()
    try:
        source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        compiled = triton.compile(
            source, target=GPUTarget("cuda", cc, 32), options={"num_warps": num_warps, "num_stages": 2}
        )
    except Exception as exc:  # reported per variant, the run fails below
        return row | {"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    shared = int(compiled.metadata.shared)
    return row | {
        "ok": shared <= SHARED_LIMIT[cc],
        "shared_bytes": shared,
        "cubin_bytes": len(compiled.asm["cubin"]),
        "seconds": round(time.perf_counter() - start, 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("compile_kernels: unset TRITON_INTERPRET (the interpreter compiles nothing)", file=sys.stderr)
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    jobs = variants()
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        rows = list(pool.map(compile_one, jobs))
    print(f"{'sm':>3} {'dtype':>9} {'block':>5} {'kernel':<20} {'warps':>5} {'shared (B)':>10} {'limit (B)':>9}  ok")
    for r in rows:
        shared = r.get("shared_bytes", "-")
        line = (
            f"{r['capability']:>3} {r['dtype']:>9} {r['block']:>5} {r['kernel']:<20} {r['num_warps']:>5} {shared:>10}"
        )
        verdict = "yes" if r["ok"] else "NO " + r.get("error", "over limit")
        print(f"{line} {SHARED_LIMIT[r['capability']]:>9}  {verdict}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"shared_limit": SHARED_LIMIT, "variants": rows}, fh, indent=1)
    failed = [r for r in rows if not r["ok"]]
    print(f"{len(rows) - len(failed)}/{len(rows)} variants compiled within the shared-memory limit")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
