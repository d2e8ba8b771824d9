"""Checkpoint I/O: what each rank reads on resume, by layout (4 ranks, gloo, CPU), and how long a
save blocks the training step, in the background and not (the 125m preset, 1 process).

    python tools/bench_checkpoint.py                    # both parts
    python tools/bench_checkpoint.py --parts reads --json runs/bench_checkpoint.json

For each saving layout (TP2 x DP2 ZeRO-1, DP4 ZeRO-3, TP2 x PP2) a short run saves a checkpoint
at step 2; it is then resumed under the same layout and under another one. The resume records
(metrics.jsonl's resume event, from ``trainer/state.py``'s load) the largest rank's and all
ranks' bytes of model tensors read and the slowest rank's seconds. Fair share: the checkpoint's
model tensors (counted from its files) over the ranks.

Saving: configs/125m.yaml (fp32 weights + AdamW moments, 1.5 GB) on one process, micro-batch 1,
a checkpoint after each of 3 steps, with ``checkpoint.async_save`` true and false; the trainer's
"blocking the step" seconds of the first two saves (the last one is always synchronous) and
the background write's seconds. Prints tables, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LAYOUTS = {
    "tp2-dp2-zero1": ["parallel.tensor=2", "parallel.zero_stage=1"],
    "dp4-zero3": ["parallel.zero_stage=3"],
    "tp2-pp2": ["parallel.tensor=2", "parallel.pipeline=2", "parallel.zero_stage=1"],
}
CASES = [  # (saved under, resumed under)
    ("tp2-dp2-zero1", "tp2-dp2-zero1"),
    ("tp2-dp2-zero1", "dp4-zero3"),
    ("dp4-zero3", "dp4-zero3"),
    ("dp4-zero3", "tp2-pp2"),
    ("tp2-pp2", "tp2-pp2"),
    ("tp2-pp2", "tp2-dp2-zero1"),
]


def _train(data: Path, run: Path, layout: str, *extra: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "--master-port",
           str(29600 + os.getpid() % 300), "-m", "sessa_train.train", "--config", str(REPO / "configs" / "tiny.yaml"),
           "model.d_model=256", f"data.path={data / 'shards'}", f"data.tokenizer={data / 'tokenizer.model'}",
           f"checkpoint.dir={run / 'ckpt'}", f"logging.dir={run / 'tb'}", "logging.eval_every_steps=0",
           "checkpoint.every_steps=2", "schedule.train_steps=3", *LAYOUTS[layout], *extra]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"bench_checkpoint: {layout} failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")


def _model_bytes(step_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in (step_dir / "model").glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            for key in fh.keys():  # noqa: SIM118
                shape = fh.get_slice(key).get_shape()
                total += 4 * math.prod(shape)
    return total


def _save_blocking(data: Path, tmp: Path) -> list[dict]:
    import re

    rows = []
    for background in ("true", "false"):
        run = tmp / f"save-{background}"
        cmd = [sys.executable, "-m", "sessa_train.train", "--config", str(REPO / "configs" / "125m.yaml"),
               f"data.path={data / 'shards'}", f"data.tokenizer={data / 'tokenizer.model'}", "data.micro_batch_size=1",
               "schedule.global_batch_size=1", "schedule.train_steps=3", "schedule.warmup_steps=1",
               f"checkpoint.dir={run / 'ckpt'}", f"logging.dir={run / 'tb'}", "logging.eval_every_steps=0",
               "checkpoint.every_steps=1", f"checkpoint.async_save={background}"]  # fmt: skip
        out = subprocess.run(cmd, cwd=REPO, env=os.environ | {"OMP_NUM_THREADS": "2"}, capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"bench_checkpoint: 125m save failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
        blocking = [float(x) for x in re.findall(r"\(([\d.]+) s blocking the step\)", out.stdout)][:2]
        writing = [float(x) for x in re.findall(r"\(([\d.]+) s writing in the background\)", out.stdout)][:2]
        rows.append({"async_save": background == "true", "blocking_s": blocking, "background_writing_s": writing})
        shutil.rmtree(run)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=REPO / "data" / "default", help="sessa-prepare-default-data's folder")
    p.add_argument("--json", type=Path, default=Path("runs/bench_checkpoint.json"))
    p.add_argument("--parts", nargs="+", choices=["reads", "saves"], default=["reads", "saves"])
    args = p.parse_args()
    if not (args.data / "shards" / "index.json").is_file():
        sys.exit(f"bench_checkpoint: {args.data} holds no shards/index.json; run sessa-prepare-default-data first")
    rows, saves = [], []
    with tempfile.TemporaryDirectory() as tmp:
        if "saves" in args.parts:
            saves = _save_blocking(args.data, Path(tmp))
        saved = {}
        for before, after in CASES if "reads" in args.parts else []:
            if before not in saved:
                saved[before] = Path(tmp) / before
                _train(args.data, saved[before], before, "schedule.stop_after_steps=2")
            run = Path(tmp) / f"{before}-to-{after}"
            shutil.copytree(saved[before] / "ckpt", run / "ckpt")
            _train(args.data, run, after, "--resume", "auto", "schedule.stop_after_steps=1")
            lines = (run / "tb" / "metrics.jsonl").read_text().splitlines()
            read = next(r["read"] for r in map(json.loads, lines) if r.get("event") == "resume")
            total = _model_bytes(saved[before] / "ckpt" / "step_00000002")
            rows.append({"saved": before, "resumed": after, "checkpoint_mib": total / 2**20,
                         "fair_share_mib": total / 4 / 2**20, "largest_mib": read["largest"] / 2**20,
                         "all_ranks_mib": read["total"] / 2**20, "largest_over_fair": read["largest"] / (total / 4),
                         "seconds": read["seconds"]})  # fmt: skip
    print(f"{'saved':>14} {'resumed':>14} {'ckpt MiB':>9} {'fair MiB':>9} {'largest':>9} {'x fair':>7} "
          f"{'all':>8} {'s':>6}")  # fmt: skip
    for r in rows:
        print(f"{r['saved']:>14} {r['resumed']:>14} {r['checkpoint_mib']:9.2f} {r['fair_share_mib']:9.2f} "
              f"{r['largest_mib']:9.2f} {r['largest_over_fair']:7.2f} {r['all_ranks_mib']:8.2f} "
              f"{r['seconds']:6.2f}")  # fmt: skip
    for r in saves:
        print(f"125m, 1 process, async_save={r['async_save']}: blocking the step "
              f"{', '.join(f'{x:.2f}' for x in r['blocking_s'])} s; written in the background in "
              f"{', '.join(f'{x:.2f}' for x in r['background_writing_s']) or '-'} s")  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"reads": rows, "saves": saves}, indent=1))


if __name__ == "__main__":
    main()
