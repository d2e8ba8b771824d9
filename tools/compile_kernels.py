"""Ahead-of-time compile every Triton feedback-kernel variant for A100 (sm_80) and H100 (sm_90),
and read each cubin's resources: registers per thread, stack bytes (spills) and occupancy.

No GPU is needed: ``triton.compile`` with a ``GPUTarget`` runs the whole pipeline down to a
cubin (ptxas included), and ``cuobjdump -res-usage`` (shipped with Triton) reads its registers
and stack frame. Prints one row per variant and writes JSON; exits 1 if a variant fails to
compile, needs more shared memory than the target has, or is a default launch configuration
(the first autotune config, used without autotuning) of a bf16/fp16 kernel that spills.

    python tools/compile_kernels.py [--json out.json] [--jobs 2] [--triton 3.4.0]

``--triton VERSION`` runs the same check with that Triton release (installed once into
~/.cache/sessa-train/triton-VERSION with pip), e.g. the oldest one pyproject.toml allows. Run
it without ``TRITON_INTERPRET`` (the interpreter never compiles).

Records. A compile is a pure function of the kernel sources, this script and the Triton release
(Triton bundles its ptxas), so its report is kept: ``--record`` writes it to
``docs/kernel_compile/triton-VERSION.json`` with ``key``, a sha256 of those sources and the
release; ``--reuse`` reports from the record when its key is today's, and compiles (without
writing) when it is not. The suite uses ``--reuse``: unchanged kernels cost nothing, changed ones
are compiled for real until ``--record`` is run again.

    python tools/compile_kernels.py --record && python tools/compile_kernels.py --triton 3.4.0 --record
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DTYPES = ("float32", "bfloat16", "float16")
# per streaming multiprocessor (CUDA C Programming Guide, compute capabilities 8.0 and 9.0)
SM = {
    80: {"registers": 65536, "threads": 2048, "blocks": 32, "shared": 164 * 1024, "shared_block": 163 * 1024},
    90: {"registers": 65536, "threads": 2048, "blocks": 32, "shared": 228 * 1024, "shared_block": 227 * 1024},
}
SHARED_LIMIT = {cc: s["shared_block"] for cc, s in SM.items()}
RECORDS = REPO / "docs" / "kernel_compile"
# what a compile's result depends on, besides the Triton release
KEY_FILES = ("sessa_train/ops/feedback_triton.py", "sessa_train/ops/feedback.py", "tools/compile_kernels.py")


def key(triton_version: str, root: Path = REPO) -> str:
    """sha256 of the kernel sources, this script and the Triton release: a record's validity."""
    digest = hashlib.sha256(triton_version.encode())
    for name in KEY_FILES:
        digest.update(name.encode() + b"\0" + (root / name).read_bytes())
    return digest.hexdigest()


def reused(triton_version: str) -> dict | None:
    """The record of ``triton_version`` if its key is today's, else None."""
    path = RECORDS / f"triton-{triton_version}.json"
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    return report if report.get("key") == key(triton_version) else None


def occupancy(cc: int, registers: int, warps: int, shared: int) -> dict:
    """Resident blocks per SM and the fraction of the SM's warp slots they fill. Registers are
    allocated per warp in units of 256 (8 per thread); each block reserves 1 KiB of shared memory."""
    sm = SM[cc]
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    limits = {
        "registers": sm["registers"] // per_warp // warps,
        "threads": sm["threads"] // (32 * warps),
        "shared": sm["shared"] // (shared + 1024),
        "blocks": sm["blocks"],
    }
    blocks = min(limits.values())
    return {
        "blocks_per_sm": blocks,
        "limited_by": min(limits, key=limits.get),
        "occupancy": blocks * warps * 32 / sm["threads"],
    }


def variants() -> list[tuple[int, str, int, str, int]]:
    """(capability, dtype, block, kernel name, num_warps): every kernel for every dtype and block the
    target takes (``block_fits``) with the default (first autotune) config, and every further
    autotune config at the default block; and the packed-documents variants (``name+docs``) at
    the default block with the default config."""
    from sessa_train.ops.feedback import BACKENDS
    from sessa_train.ops.feedback_triton import block_fits, kernel_variants, num_warps

    triton = BACKENDS["triton"]
    default = triton.default_block(4096, 1024)
    out = []
    for cc in SM:
        for dtype in DTYPES:
            for block in (b for b in triton.blocks if block_fits(b, _torch_dtype(dtype), cc)):
                warps = num_warps(block) if block == default else num_warps(block)[:1]
                for name, *_ in kernel_variants(block, _torch_dtype(dtype)):
                    out.extend((cc, dtype, block, name, w) for w in warps)
                if block == default:
                    docs = kernel_variants(block, _torch_dtype(dtype), docs=True)
                    out.extend((cc, dtype, block, name, num_warps(block)[0]) for name, *_ in docs)
    return out


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def _resources(cubin: bytes) -> dict:
    import triton

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(cuobjdump), "-res-usage", f.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", text)
    if not found:
        raise RuntimeError(f"cuobjdump -res-usage printed no resources: {text[:200]!r}")
    return {"registers": int(found[1]), "stack_bytes": int(found[2])}


def compile_one(job: tuple[int, str, int, str, int]) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    from sessa_train.ops.feedback_triton import kernel_variants, num_warps

    cc, dtype, block, name, warps = job
    row = {"capability": cc, "dtype": dtype, "block": block, "kernel": name, "num_warps": warps}
    row["default"] = warps == num_warps(block)[0]
    every = kernel_variants(block, _torch_dtype(dtype), docs=name.endswith("+docs"))
    (kernel, signature, constexprs) = next(v[1:] for v in every if v[0] == name)
    start = time.perf_counter()
    try:
        source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        compiled = triton.compile(
            source, target=GPUTarget("cuda", cc, 32), options={"num_warps": warps, "num_stages": 2}
        )
        shared = int(compiled.metadata.shared)
        row |= {"shared_bytes": shared, "cubin_bytes": len(compiled.asm["cubin"])}
        row |= _resources(compiled.asm["cubin"])
        row |= occupancy(cc, row["registers"], warps, shared)
    except Exception as exc:  # reported per variant, the run fails below
        return row | {"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    row["seconds"] = round(time.perf_counter() - start, 2)
    row["ok"], row["error"] = True, ""
    if shared > SHARED_LIMIT[cc]:
        row["ok"], row["error"] = False, "over the shared-memory limit"
    elif row["default"] and dtype != "float32" and row["stack_bytes"]:
        row["ok"], row["error"] = False, f"default launch spills {row['stack_bytes']} bytes per thread"
    return row


def _with_triton(version: str, argv: list[str]) -> int:
    """Run this check again in a subprocess whose Triton is ``version``."""
    target = Path.home() / ".cache" / "sessa-train" / f"triton-{version}"
    if not (target / "triton" / "__init__.py").is_file():
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target)]
        subprocess.run([*cmd, f"triton=={version}"], check=True)
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(target), str(REPO)])}
    return subprocess.run([sys.executable, __file__, *argv], env=env).returncode


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--triton", help="check with this Triton release instead of the installed one")
    p.add_argument("--record", action="store_true", help="compile and write the record (docs/kernel_compile/)")
    p.add_argument("--reuse", action="store_true", help="report from the record when its key is today's")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("compile_kernels: unset TRITON_INTERPRET (the interpreter compiles nothing)", file=sys.stderr)
        return 2
    version = args.triton or importlib.metadata.version("triton")
    report = reused(version) if args.reuse and not args.record else None
    if report is not None:
        print(f"compile_kernels: the record of Triton {version} has today's key: reported from it, nothing compiled")
        return _report(report, args.json)
    if args.reuse:
        print(f"compile_kernels: no record of Triton {version} with today's key (--record writes one): compiling")
    if args.triton:
        forward = [*(["--json", args.json] if args.json else []), "--jobs", str(args.jobs)]
        return _with_triton(args.triton, forward + (["--record"] if args.record else []))
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton

    jobs = variants()
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        rows = list(pool.map(compile_one, jobs))
    report = {"triton": triton.__version__, "key": key(triton.__version__), "shared_limit": SHARED_LIMIT}
    report["variants"] = rows
    if args.record:
        RECORDS.mkdir(parents=True, exist_ok=True)
        (RECORDS / f"triton-{triton.__version__}.json").write_text(json.dumps(report, indent=1) + "\n")
    return _report(report, args.json)


def _report(report: dict, json_path: str | None) -> int:
    """Print the table of a report, write it to ``json_path``; 1 if a variant failed."""
    rows = report["variants"]
    print(f"Triton {report['triton']}")
    head = f"{'sm':>3} {'dtype':>9} {'block':>5} {'kernel':<19} {'warps':>5} {'regs':>4} {'stack':>5}"
    print(f"{head} {'shared (B)':>10} {'blocks/SM':>9} {'occupancy':>9}  ok")
    for r in rows:
        line = f"{r['capability']:>3} {r['dtype']:>9} {r['block']:>5} {r['kernel']:<19} {r['num_warps']:>5}"
        if "registers" in r:
            line += f" {r['registers']:>4} {r['stack_bytes']:>5} {r['shared_bytes']:>10}"
            line += f" {r['blocks_per_sm']:>9} {r['occupancy']:>9.0%}"
        print(f"{line}  {'yes' if r['ok'] else 'NO ' + r['error']}")
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(report, fh, indent=1)
    failed = [r for r in rows if not r["ok"]]
    print(f"{len(rows) - len(failed)}/{len(rows)} variants: compiled, in shared memory, default bf16/fp16 not spilling")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
