"""Checkpoint I/O: our format against raw safetensors and torch.distributed.checkpoint (the 125m
preset's fp32 weights and moments, 1 process), how long a save blocks the training step, in the
background and not (125m, 1 process), and what each rank reads on resume, by layout (4 ranks).

    python tools/bench_checkpoint.py                    # both parts
    python tools/bench_checkpoint.py --parts reads --json runs/bench_checkpoint.json

For each saving layout (TP2 x DP2 ZeRO-1, DP4 ZeRO-3, TP2 x PP2) a short run saves a checkpoint
at step 2; it is then resumed under the same layout and under another one. The resume records
(metrics.jsonl's resume event, from ``checkpoint/model.py``'s load) the largest rank's and all
ranks' bytes of model tensors read, the largest ratio of a rank's reads to the fp32 weight and
moment bytes it holds, and the slowest rank's seconds. Fair share: the checkpoint's model
tensors (counted from its files) over the ranks; a rank of a pipeline stage holding more than
that (the embedding's stage) reads more.

Formats: the same tensors saved and loaded by our checkpoint (the manager's save with its fsyncs
and manifest checksums; verified load: every block's sha256, then each tensor read), by
safetensors' save_file (+ fsync) / load_file, and by DCP's save / load; the page cache is
dropped before each load when the machine allows it (root), otherwise loads read from memory.
Five rounds, the order of the three rotating from round to round; medians (and every round in
the JSON).

Saving: configs/125m.yaml (fp32 weights + AdamW moments, 1.5 GB) on one process, micro-batch 1,
6 steps with a checkpoint at step 3 (and the run's last, always synchronous, at 6), with
``checkpoint.async_save`` true and false; the trainer's "blocking the step" seconds of the step-3
save and the background write's seconds. Prints tables, writes JSON.
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


def _train(data: Path, run: Path, layout: str, *extra: str) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "--master-port",
           str(29600 + os.getpid() % 300), "-m", "sessa_train.train", "--config", str(REPO / "configs" / "tiny.yaml"),
           "model.d_model=256", "data.micro_batch_size=2", f"data.path={data / 'shards'}",
           f"data.tokenizer={data / 'tokenizer.model'}",
           f"checkpoint.dir={run / 'ckpt'}", f"logging.dir={run / 'tb'}", "logging.eval_every_steps=0",
           "checkpoint.every_steps=2", "schedule.train_steps=3", "schedule.warmup_steps=1", *LAYOUTS[layout],
           *extra]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if out.returncode:
        errors = [line for line in out.stderr.splitlines() if "error" in line][:3]
        sys.exit(f"bench_checkpoint: {layout} failed:\n{out.stdout[-2000:]}" + "\n".join(errors))
    return out.stdout


def _save_seconds(stdout: str) -> tuple[float, float]:
    """(blocking the step, writing in the background) of a run's first background save, from its log."""
    import re

    blocking = re.findall(r"\(([\d.]+) s blocking the step", stdout)
    writing = re.findall(r"\(([\d.]+) s writing in the background\)", stdout)
    return float(blocking[0]), float(writing[0])


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
               "schedule.global_batch_size=1", "schedule.train_steps=6", "schedule.warmup_steps=1",
               f"checkpoint.dir={run / 'ckpt'}", f"logging.dir={run / 'tb'}", "logging.eval_every_steps=0",
               "checkpoint.every_steps=3", f"checkpoint.async_save={background}", "logging.every_steps=1"]  # fmt: skip
        out = subprocess.run(cmd, cwd=REPO, env=os.environ | {"OMP_NUM_THREADS": "2"}, capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"bench_checkpoint: 125m save failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
        blocking = [float(x) for x in re.findall(r"\(([\d.]+) s blocking the step", out.stdout)][:1]
        writing = [float(x) for x in re.findall(r"\(([\d.]+) s writing in the background\)", out.stdout)][:1]
        metrics = [json.loads(line) for line in (run / "tb" / "metrics.jsonl").read_text().splitlines()]
        step_s = {r["step"]: r["perf/step_time_s"] for r in metrics if "perf/step_time_s" in r}
        rows.append({"async_save": background == "true", "blocking_s": blocking, "background_writing_s": writing,
                     "step_s": step_s})  # fmt: skip
        shutil.rmtree(run)
    return rows


FORMATS = """
import json, os, shutil, sys, time
import torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
from safetensors.torch import load_file, save_file
from sessa_train.checkpoint import MODEL, CheckpointManager, DataIdentity, Layout, ParamReader, RunRecord, shard_files
from sessa_train.config import load_config
from sessa_train.files import fsync
from sessa_train.parallel.layout import stage_splits
root, out = sys.argv[2], {}
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[3])
dist.init_process_group("gloo", rank=0, world_size=1)
cfg = load_config([sys.argv[1] + "/configs/125m.yaml"]).model
names = [n for n in stage_splits(cfg) if not (cfg.tie_embeddings and n == "lm_head.weight")]
with torch.device("meta"):
    from sessa_train.models import SessaLM
    shapes = {n: t.shape for n, t in SessaLM(cfg).state_dict().items()}
state = {f"{n}.{w}" if w else n: torch.randn(shapes[n]) for n in names for w in ("", "exp_avg", "exp_avg_sq")}
size = sum(t.numel() * 4 for t in state.values())

class Weights:  # the model part's tensors as one shard, as ModelState writes them on one process
    def state_dict(self): return {}
    def load_state_dict(self, s): pass
    def tensors(self): return {"tp0-pp0-0": state}
def timed(f):
    t = time.perf_counter(); f(); return time.perf_counter() - t
def drop_cache():
    os.system("sync; echo 1 > /proc/sys/vm/drop_caches 2>/dev/null")
manager = CheckpointManager(root + "/ours", 1, 0, 1, lambda m: None)
layout, data = Layout(1, 1, 1, 1, 1, 0), DataIdentity("0" * 64, 1, "0" * 64, "x")
manager.attach({MODEL: Weights()}, RunRecord(layout, data, {"model": {}}, None))
def ours_load():
    path = root + "/ours/step_00000001"
    from pathlib import Path
    start = time.perf_counter()
    assert manager.verify(Path(path)) is None  # every file against its size and digests
    out.setdefault("ours_verify_all", []).append(time.perf_counter() - start)
    reader = ParamReader(shard_files(Path(path), MODEL), cfg, 1, 1)
    [reader.full(n, w) for n in reader.names for w in ("", "exp_avg", "exp_avg_sq")]
def raw_save():
    save_file(state, root + "/raw.safetensors"); fsync(root + "/raw.safetensors")
import torch.distributed.checkpoint as dcp
back = {k: torch.empty_like(v) for k, v in state.items()}
def dcp_save():
    shutil.rmtree(root + "/dcp", ignore_errors=True); dcp.save(state, checkpoint_id=root + "/dcp"); os.sync()
FORMATS = {"ours": (lambda: manager.save(1, 1), ours_load),
           "safetensors": (raw_save, lambda: load_file(root + "/raw.safetensors")),
           "dcp": (dcp_save, lambda: dcp.load(back, checkpoint_id=root + "/dcp"))}
kinds, rounds = list(FORMATS), int(sys.argv[4])
for r in range(rounds):  # the order rotates from round to round: none is always first on the disk
    for name in kinds[r % 3:] + kinds[:r % 3]:
        save, load = FORMATS[name]
        os.sync()
        out.setdefault(name + "_save_all", []).append(timed(save))
        drop_cache()
        out.setdefault(name + "_load_all", []).append(timed(load))
for key in [k for k in out if k.endswith("_all")]:
    out[key.removesuffix("_all")] = sorted(out[key])[len(out[key]) // 2]  # the median
out["gb"] = size / 1e9
dist.destroy_process_group()
print(json.dumps(out))
"""


def _formats(tmp: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", FORMATS, str(REPO), str(tmp), str(29900 + os.getpid() % 90), "5"],
                         capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "2"})  # fmt: skip
    if out.returncode:
        sys.exit(f"bench_checkpoint: formats failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=REPO / "data" / "default", help="sessa-prepare-default-data's folder")
    p.add_argument("--json", type=Path, default=Path("runs/bench_checkpoint.json"))
    p.add_argument("--parts", nargs="+", choices=["formats", "saves", "reads"], default=["formats", "saves", "reads"])
    args = p.parse_args()
    if not (args.data / "shards" / "index.json").is_file():
        sys.exit(f"bench_checkpoint: {args.data} holds no shards/index.json; run sessa-prepare-default-data first")
    rows, saves, formats = [], [], {}
    with tempfile.TemporaryDirectory() as tmp:
        if "formats" in args.parts:
            formats = _formats(Path(tmp))
        if "saves" in args.parts:
            saves = _save_blocking(args.data, Path(tmp))
        saved, writes = {}, []
        for before, after in CASES if "reads" in args.parts else []:
            if before not in saved:
                saved[before] = Path(tmp) / before
                log = _train(args.data, saved[before], before, "schedule.stop_after_steps=2")
                blocking, writing = _save_seconds(log)
                total = _model_bytes(saved[before] / "ckpt" / "step_00000002")
                writes.append({"layout": before, "checkpoint_mib": total / 2**20, "blocking_s": blocking,
                               "writing_s": writing})  # fmt: skip
            run = Path(tmp) / f"{before}-to-{after}"
            shutil.copytree(saved[before] / "ckpt", run / "ckpt")
            _train(args.data, run, after, "--resume", "auto", "schedule.stop_after_steps=1")
            lines = (run / "tb" / "metrics.jsonl").read_text().splitlines()
            read = next(r["read"] for r in map(json.loads, lines) if r.get("event") == "resume")
            total = _model_bytes(saved[before] / "ckpt" / "step_00000002")
            rows.append({"saved": before, "resumed": after, "checkpoint_mib": total / 2**20,
                         "fair_share_mib": total / 4 / 2**20, "largest_mib": read["largest"] / 2**20,
                         "all_ranks_mib": read["total"] / 2**20, "largest_over_fair": read["largest"] / (total / 4),
                         "largest_over_held": read["over_held"],
                         "seconds": read["seconds"]})  # fmt: skip
    print(f"{'saved':>14} {'resumed':>14} {'ckpt MiB':>9} {'fair MiB':>9} {'largest':>9} {'x fair':>7} "
          f"{'x held':>7} {'all':>8} {'s':>6}")  # fmt: skip
    for r in rows:
        print(f"{r['saved']:>14} {r['resumed']:>14} {r['checkpoint_mib']:9.2f} {r['fair_share_mib']:9.2f} "
              f"{r['largest_mib']:9.2f} {r['largest_over_fair']:7.2f} {r['largest_over_held']:7.2f} "
              f"{r['all_ranks_mib']:8.2f} "
              f"{r['seconds']:6.2f}")  # fmt: skip
    for w in writes:
        print(f"saved under {w['layout']:>14} ({w['checkpoint_mib']:.1f} MiB): {w['blocking_s']:.2f} s blocking the "
              f"step (states, the gathering to each tensor's writer, host copies), {w['writing_s']:.2f} s writing "
              "in the background")  # fmt: skip
    if formats:
        print(f"125m fp32 weights + moments ({formats['gb']:.2f} GB), one process, s (GB/s):")
        for what in ("ours", "safetensors", "dcp"):
            save, load = formats[f"{what}_save"], formats[f"{what}_load"]
            print(f"  {what:>12}: save {save:6.2f} ({formats['gb'] / save:5.2f})   load {load:6.2f} "
                  f"({formats['gb'] / load:5.2f})")  # fmt: skip
    for r in saves:
        steps = [r["step_s"].get(k, math.nan) for k in (2, 3, 4, 5)]
        print(f"125m, 1 process, async_save={r['async_save']}: blocking the step "
              f"{', '.join(f'{x:.2f}' for x in r['blocking_s'])} s; written in the background in "
              f"{', '.join(f'{x:.2f}' for x in r['background_writing_s']) or '-'} s; steps 2-5: "
              f"{', '.join(f'{t:.2f}' for t in steps)} s")  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"formats": formats, "reads": rows, "writes": writes, "saves": saves}, indent=1))


if __name__ == "__main__":
    main()
