"""Peak memory and time of one training forward + backward with each activation recomputation.

    python tools/bench_recompute.py                                   # 125m, seq 2048, batch 1
    python tools/bench_recompute.py --config configs/tiny.yaml --seq 256 --batch 8 --json runs/recompute.json

Each ``compute.recompute`` mode (none, selective, full) runs in a fresh process: the preset's
model in fp32 on CPU (the chunked solve), random tokens, the mean token loss, backward. Peak
memory is the rise of the process's peak resident set over its resident set once the weights
exist and a 16-token pass has run; glibc is told to map large blocks on their own, so freed
memory leaves the resident set. It holds the activations kept for the backward, the gradients
and the backward's working memory. Time is the median over ``--repeat`` forward + backward
passes (the first, with ``--compile`` the one that compiles, is left out of the median when
``--repeat`` > 2). Beside it, what ``sessa-plan`` (``sessa_train/sizing.py``) predicts for the same pass:
its activations, backward working set, gradients and solve strips in fp32. Prints a table and
writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODES = ("none", "selective", "full")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(config: Path, mode: str, seq: int, batch: int, repeat: int, compile: bool) -> dict:
    """In this process: one mode's peak memory rise (MiB) and median step time (s)."""
    import torch

    from sessa_train.config import ComputeConfig, load_config
    from sessa_train.models import ModelPlan, SessaLM

    cfg = load_config([config]).model
    torch.manual_seed(0)
    model = SessaLM(cfg, ModelPlan(ComputeConfig(feedback_backend="chunked", recompute=mode, compile=compile)))
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(1))
    model(ids[:1, :17], targets=ids[:1, 1:18]).mean().backward()  # warm-up: code paths, lazy imports
    model.zero_grad(set_to_none=True)
    base = _rss_mib()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        model(ids[:, :-1], targets=ids[:, 1:]).mean().backward()
        times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=False)  # the gradients stay allocated, as in training
    step = statistics.median(times[1:] if len(times) > 2 else times)
    return {"peak_mib": _peak_mib() - base, "step_s": step, "params": model.num_parameters()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=REPO / "configs" / "125m.yaml")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--compile", action="store_true", help="compute.compile: torch.compile each layer")
    p.add_argument("--json", type=Path, default=Path("runs/bench_recompute.json"))
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.config, args.child, args.seq, args.batch, args.repeat, args.compile)))
        return
    common = ["--config", str(args.config), "--seq", str(args.seq), "--batch", str(args.batch)]
    results = {}
    for mode in args.modes:
        cmd = [sys.executable, __file__, *common, "--repeat", str(args.repeat), "--child", mode]
        cmd += ["--compile"] if args.compile else []
        # glibc maps each allocation above 64 KiB on its own and unmaps it on free: the peak
        # resident set is then what was alive at once, not what the heap kept around
        env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536"}
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
        if out.returncode:
            raise SystemExit(f"bench_recompute: {mode} failed:\n{out.stderr[-2000:]}")
        results[mode] = json.loads(out.stdout.splitlines()[-1])
    from sessa_train.config import ComputeConfig, load_config
    from sessa_train.sizing import Job, memory

    cfg = load_config([args.config]).model
    for mode, r in results.items():  # what sessa-plan counts of the same pass: fp32, one process
        job = Job(cfg, ComputeConfig(recompute=mode), args.seq, args.batch, args.batch, bf16=False)
        planned = memory(job)
        items = ("activations", "backward working set", "gradients", "solve strips")
        r["planned_mib"] = sum(planned[i] for i in items) / 2**20
    none = results.get("none")
    compiled = ", torch.compile" if args.compile else ""
    print(f"{args.config.name}, seq {args.seq}, batch {args.batch}, fp32{compiled}, CPU ({os.cpu_count()} cores)")
    print("| recompute | peak rise MiB | sessa-plan MiB | plan / measured | vs none | fwd+bwd s | vs none |")
    print("|---|---|---|---|---|---|---|")
    for mode, r in results.items():
        mem = f"{r['peak_mib'] / none['peak_mib']:.2f}" if none else "-"
        t = f"{r['step_s'] / none['step_s']:.2f}" if none else "-"
        plan = f"{r['planned_mib']:.0f} | {r['planned_mib'] / r['peak_mib']:.2f}"
        print(f"| {mode} | {r['peak_mib']:.0f} | {plan} | {mem} | {r['step_s']:.2f} | {t} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    about = {"config": str(args.config), "seq": args.seq, "batch": args.batch, "compile": args.compile}
    args.json.write_text(json.dumps(about | results))


if __name__ == "__main__":
    main()
