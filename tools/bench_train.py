"""Training throughput of a preset with the chunked vs the reference feedback solve.

Runs the real trainer (`python -m sessa_train.train`) for --steps steps per backend in a
scratch directory and reports the median tokens/s and step time over the steps after
--warmup (read from its metrics.jsonl).

    python tools/bench_train.py                       # configs/tiny.yaml on data/default
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(config: Path, backend: str, steps: int, extra: list[str]) -> list[dict]:
    with tempfile.TemporaryDirectory() as scratch:
        cmd = [
            sys.executable,
            "-m",
            "sessa_train.train",
            "--config",
            str(config),
            f"compute.feedback_backend={backend}",
            f"schedule.train_steps={steps}",
            "schedule.warmup_steps=1",
            f"checkpoint.dir={scratch}/ckpt",
            "checkpoint.every_steps=0",
            f"logging.dir={scratch}/tb",
            "logging.eval_every_steps=0",
            *extra,
        ]
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"bench_train: training with {backend} failed:\n{out.stderr[-2000:]}")
        return [json.loads(line) for line in (Path(scratch) / "tb" / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=REPO / "configs" / "tiny.yaml")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of the median")
    p.add_argument("--json", type=Path, default=Path("runs/bench_train.json"))
    p.add_argument("overrides", nargs="*", help="key=value passed to the trainer (e.g. data.micro_batch_size=4)")
    args = p.parse_args()
    if not 0 <= args.warmup < args.steps:
        p.error(f"need 0 <= --warmup < --steps, got warmup={args.warmup}, steps={args.steps}")
    results = {}
    for backend in ("chunked", "reference"):
        rows = run(args.config, backend, args.steps, args.overrides)[args.warmup :]
        results[backend] = {
            "tokens_per_s": statistics.median(r["perf/tokens_per_s"] for r in rows),
            "step_time_s": statistics.median(r["perf/step_time_s"] for r in rows),
            "steps_measured": len(rows),
        }
    print(
        f"# {args.config.name} {' '.join(args.overrides)}, {os.cpu_count()} cores, median of "
        f"{args.steps - args.warmup} steps"
    )
    print("| feedback solve | tokens/s | step time (s) |\n|---|---|---|")
    for backend, r in results.items():
        print(f"| {backend} | {r['tokens_per_s']:,.0f} | {r['step_time_s']:.3f} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
