"""Peak memory of building one rank's initial weights, by tensor x pipeline layout.

    python tools/bench_rank_init.py                                # 350m, TP x PP 1x1 2x1 1x2 2x2 4x2
    python tools/bench_rank_init.py --config configs/1.3b.yaml --layouts 1x1 8x1 --json runs/rank_init.json

Each layout runs in a fresh process: ``parallel/layout.rank_initial_state`` for the first
rank (tensor rank 0 of pipeline stage 0, the one with the embedding), which builds one plain
unit at a time and keeps its cut, against ``whole``: the plain ``SessaLM`` that every rank built
before. Peak is the rise of the peak resident set over the resident set after the imports
(glibc maps large blocks on their own, so freed memory leaves it). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(config: Path, layout: str) -> dict:
    import torch

    from sessa_train.config import load_config
    from sessa_train.models import SessaLM
    from sessa_train.parallel.layout import rank_initial_state

    cfg = load_config([config]).model
    base = _rss_mib()
    if layout == "whole":
        torch.manual_seed(0)
        state = SessaLM(cfg).state_dict()
    else:
        tp, pp = map(int, layout.split("x"))
        state = rank_initial_state(cfg, 0, 0, tp, 0, pp)
    held = sum({t.data_ptr(): t.numel() for t in state.values()}.values())  # a tied head counted once
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    return {"peak_mib": peak, "held_mib": held * 4 / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=REPO / "configs" / "350m.yaml")
    p.add_argument("--layouts", nargs="+", default=["1x1", "2x1", "1x2", "2x2", "4x2"], help="TPxPP")
    p.add_argument("--json", type=Path, default=Path("runs/bench_rank_init.json"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.config, args.child)))
        return
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536"}
    results = {}
    for layout in ["whole", *args.layouts]:
        cmd = [sys.executable, __file__, "--config", str(args.config), "--child", layout]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
        if out.returncode:
            raise SystemExit(f"bench_rank_init: {layout} failed:\n{out.stderr[-2000:]}")
        results[layout] = json.loads(out.stdout.splitlines()[-1])
    print(f"{args.config.name}: first rank's initial weights (fp32)")
    print("| layout (TPxPP) | weights held MiB | peak rise MiB |\n|---|---|---|")
    for layout, r in results.items():
        name = "whole model (every rank, before)" if layout == "whole" else layout
        print(f"| {name} | {r['held_mib']:.0f} | {r['peak_mib']:.0f} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"config": str(args.config), **results}))


if __name__ == "__main__":
    main()
