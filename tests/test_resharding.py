"""Layout-free training state: a run stopped at step 3 under one parallel layout goes on under
another with the same weights, AdamW moments, schedule and global batches, so its steps 4-6
equal the uninterrupted run's up to floating-point reduction order.

Each layout is a real trainer subprocess (torchrun, gloo, fp32) on a small model; the runs under
the first layout (6 steps, a checkpoint every 3) are shared through a fixture.

Why the weights can differ at all: the key half of each feedback projection's bias has a zero
gradient in exact arithmetic (softmax does not change when every key score moves by the same
q . b), so its gradient is rounding noise, and AdamW scales noise to updates of about the
learning rate. Another layout sums in another order, so those entries move differently; the
other weights agree to ~1e-7. The learning rate (1e-3) keeps three such steps within 1e-5.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from sessa_train.checkpoint import read_weights
from tests.helpers import HANG_GUARD_S
from tests.trainer import ENV, REPO, command, train

pytestmark = pytest.mark.slow

LAYOUTS = {
    "dp1": (1, []),
    "dp2-zero1": (2, ["parallel.zero_stage=1"]),
    "dp2-zero2": (2, ["parallel.zero_stage=2"]),
    "dp1-zero0": (1, ["parallel.zero_stage=0"]),
    "dp2-zero3": (2, ["parallel.zero_stage=3"]),
    "tp2-pp2": (4, ["parallel.tensor=2", "parallel.pipeline=2", "parallel.zero_stage=1"]),
    "dp2-tp2-no-sp": (4, ["parallel.tensor=2", "parallel.zero_stage=1", "parallel.sequence_parallel=false"]),
    "cp2-tp2": (4, ["parallel.context=2", "parallel.tensor=2"]),
    "dp4": (4, ["parallel.zero_stage=2"]),
    "dp1-bf16": (1, ["parallel.precision=bf16"]),
    "dp2-zero1-bf16": (2, ["parallel.zero_stage=1", "parallel.precision=bf16"]),
}
PAIRS = [
    ("dp1", "dp2-zero1"),
    ("dp2-zero2", "dp1-zero0"),
    ("dp2-zero3", "dp1"),
    ("tp2-pp2", "dp2-tp2-no-sp"),  # sequence parallelism (on by default with TP) switched off
    ("cp2-tp2", "dp1"),
    ("dp2-zero2", "tp2-pp2"),  # ZeRO-2 partitions into stages (TP2 x PP2 into DP4: the kill test below)
    ("dp1", "dp2-zero3"),  # beyond the issue's six: into ZeRO-3's padded partitions
]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Shards of 32-token samples (context parallelism splits them in two), 16 per shard."""
    from pydoc_data.topics import topics

    from sessa_train.data import train_tokenizer, write_shards

    root = tmp_path_factory.mktemp("reshard_data")
    docs = [topics[name][:1500] for name in sorted(topics)][:40]
    model = train_tokenizer(docs, root / "tok.model", vocab_size=400)
    write_shards(docs, model, root / "shards", seq_len=32, samples_per_shard=16, val_fraction=0.0)
    return root / "shards"


def config(path: Path, shards: Path, run: Path) -> Path:
    path.write_text(f"""
model: {{vocab_size: 400, d_model: 32, n_layers: 2, n_heads: 2}}
data: {{path: "{shards}", micro_batch_size: 2}}
schedule: {{train_steps: 6, warmup_steps: 2, global_batch_size: 8}}
optimizer: {{lr: 1.0e-3, min_lr: 1.0e-4}}
checkpoint: {{dir: "{run}/ckpt", every_steps: 3, keep_last: 5}}
logging: {{dir: "{run}/tb", every_steps: 1, eval_every_steps: 0, sample_ids: true}}
""")
    return path


def run_layout(data: Path, run: Path, layout: str, *extra: str) -> subprocess.CompletedProcess:
    nproc, overrides = LAYOUTS[layout]
    return train(config(run.parent / f"{run.name}.yaml", data, run), *overrides, *extra, nproc=nproc)


def rows(run: Path) -> dict[int, dict]:
    """metrics.jsonl step rows by step (each step once: a resume drops the rows after its checkpoint)."""
    out = {}
    for line in (run / "tb" / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "train/loss" in row:
            assert row["step"] not in out, f"step {row['step']} logged twice"
            out[row["step"]] = row
    return out


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory) -> dict[str, Path]:
    """Each first layout's 6 steps, checkpoints at steps 3 and 6 (run once, on demand)."""
    runs: dict[str, Path] = {}

    def get(layout: str) -> Path:
        if layout not in runs:
            runs[layout] = tmp_path_factory.mktemp(layout) / "run"
            run_layout(data, runs[layout], layout)
        return runs[layout]

    return get


def resume_from_step_3(data: Path, source: Path, run: Path, layout: str) -> subprocess.CompletedProcess:
    """Layout ``layout`` resumed (``--resume auto``) from a copy of ``source``'s step-3 checkpoint."""
    (run / "ckpt").mkdir(parents=True)
    shutil.copytree(source / "ckpt" / "step_00000003", run / "ckpt" / "step_00000003")
    return run_layout(data, run, layout, "--resume", "auto")


def assert_same_trajectory(full: Path, resumed: Path) -> None:
    """Steps 4-6 within 1e-5 relative, the same global batches 1-6, the weights at step 6 within
    1e-5 of their largest entry."""
    a, b = rows(full), rows(resumed)
    assert sorted(a) == list(range(1, 7)) and sorted(b) == [4, 5, 6]
    for step in (4, 5, 6):
        assert abs(a[step]["train/loss"] - b[step]["train/loss"]) <= 1e-5 * a[step]["train/loss"], (
            step,
            a[step]["train/loss"],
            b[step]["train/loss"],
        )
        assert a[step]["sample_ids"] == b[step]["sample_ids"], f"the global batch of step {step} differs"
    wa, wb = (read_weights(r / "ckpt" / "step_00000006")[0] for r in (full, resumed))
    largest = max(w.abs().max().item() for w in wa.values())
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst <= 1e-5 * largest, f"weights at step 6 differ by {worst:.3g} (largest entry {largest:.3g})"


@pytest.mark.parametrize(("before", "after"), PAIRS, ids=[f"{a}->{b}" for a, b in PAIRS])
def test_resume_under_another_layout_follows_the_same_trajectory(data, uninterrupted, tmp_path, before, after):
    full = uninterrupted(before)
    steps_1_3 = [rows(full)[s]["sample_ids"] for s in (1, 2, 3)]
    if before != "dp1":  # the global batches do not depend on the layout from the first step on
        assert steps_1_3 == [rows(uninterrupted("dp1"))[s]["sample_ids"] for s in (1, 2, 3)]
    out = resume_from_step_3(data, full, tmp_path / "resumed", after)
    saved = json.loads((full / "ckpt" / "step_00000003" / "meta.json").read_text())["layout"]
    now = {"tensor": 1, "pipeline": 1, "context": 1, "data": 1, "zero": 0}
    for override in LAYOUTS[after][1]:
        key, value = override.removeprefix("parallel.").split("=")
        key = {"zero_stage": "zero"}.get(key, key)
        if key in now:  # the layout the resume line names (sequence parallelism is not part of it)
            now[key] = int(value)
    now["data"] = LAYOUTS[after][0] // (now["tensor"] * now["pipeline"] * now["context"])
    phrase = ",".join(f"{k}={v}" for k, v in now.items())
    before_phrase = ",".join(f"{k}={saved[k]}" for k in now)
    assert f"resharding step_00000003 from {before_phrase} to {phrase}" in out.stdout
    assert_same_trajectory(full, tmp_path / "resumed")
    assert_each_rank_read_its_share(full / "ckpt" / "step_00000003", tmp_path / "resumed", LAYOUTS[after][0])


def assert_each_rank_read_its_share(step_dir: Path, resumed: Path, ranks: int) -> None:
    """Each rank read at most 1.25 x the fp32 weight and moment bytes it holds (its tensor-parallel
    cut, and of that its ZeRO partition), and all ranks together at most 1.25 x the checkpoint's
    model tensors (counted from its files) plus the tensors no layout cuts (norms, gamma, biases
    of size d_model) once per rank."""
    from safetensors import safe_open

    from sessa_train.checkpoint import read_config
    from sessa_train.config import ModelConfig
    from sessa_train.parallel.layout import stage_splits

    replicated = {n for n, split in stage_splits(ModelConfig.from_dict(read_config(step_dir)["model"])).items()
                  if split is None}  # fmt: skip
    total = small = 0
    for f in (step_dir / "model").glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            for key in fh.keys():  # noqa: SIM118
                size = 4 * torch.Size(fh.get_slice(key).get_shape()).numel()
                total += size
                small += size if key.removesuffix(".exp_avg_sq").removesuffix(".exp_avg") in replicated else 0
    lines = (resumed / "tb" / "metrics.jsonl").read_text().splitlines()
    read = next(row["read"] for row in map(json.loads, lines) if row.get("event") == "resume")
    assert read["over_held"] <= 1.25, read
    assert read["total"] <= 1.25 * total + ranks * small, (read, total, small, ranks)


def test_bf16_state_resumes_bit_for_bit_and_reshards(data, uninterrupted, tmp_path):
    """bf16 keeps its fp32 master weights in DeepSpeed's wrapper (flat per group without ZeRO,
    partitioned with it): the checkpoint holds them and the moments, so the same layout resumes
    bit for bit, and ZeRO-1 over 2 ranks goes on within bf16's rounding of the gradients."""
    full = uninterrupted("dp1-bf16")
    resume_from_step_3(data, full, tmp_path / "same", "dp1-bf16")
    a, b = rows(full), rows(tmp_path / "same")
    assert [b[s]["train/loss"] for s in (4, 5, 6)] == [a[s]["train/loss"] for s in (4, 5, 6)]
    wa, wb = (read_weights(r / "ckpt" / "step_00000006")[0] for r in (full, tmp_path / "same"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    fp32 = rows(uninterrupted("dp1"))
    assert (
        max(abs(a[s]["train/loss"] - fp32[s]["train/loss"]) / fp32[s]["train/loss"] for s in (1, 2, 3)) > 1e-6
    )  # really bf16
    resume_from_step_3(data, full, tmp_path / "zero1", "dp2-zero1-bf16")
    c = rows(tmp_path / "zero1")
    for s in (4, 5, 6):  # bf16 rounds each micro-batch's gradients: 8 bits of significand
        assert abs(c[s]["train/loss"] - a[s]["train/loss"]) <= 1e-2 * a[s]["train/loss"]
        assert c[s]["sample_ids"] == a[s]["sample_ids"]


def edit_checkpoint(step_dir: Path, change) -> None:
    """Apply ``change(step_dir)`` and write the manifest again, as a faulty converter would."""
    from sessa_train.files import file_sha256

    change(step_dir)
    manifest = json.loads((step_dir / "manifest.json").read_text())
    for name in manifest["files"]:
        f = step_dir / name
        manifest["files"][name] = {"bytes": f.stat().st_size, "sha256": file_sha256(f)}
    (step_dir / "manifest.json").write_text(json.dumps(manifest))


def test_the_comparison_catches_lost_moments_and_a_data_order_taken_from_the_layout(data, uninterrupted, tmp_path):
    """The two mutations the issue names, made to a step-3 checkpoint: AdamW moments dropped in
    the conversion, and the data order re-derived from the new data-parallel size (2 reader slots
    for DP=2 instead of the run's own). Each makes the DP1 -> DP2 comparison above fail."""
    from safetensors.torch import load_file, save_file

    full = uninterrupted("dp1")

    def drop_moments(step_dir: Path) -> None:
        for f in (step_dir / "model").glob("*.safetensors"):
            t = load_file(f)
            save_file({k: torch.zeros_like(v) if k.endswith(("exp_avg", "exp_avg_sq")) else v for k, v in t.items()}, f)

    def slots_from_dp(step_dir: Path) -> None:
        meta = json.loads((step_dir / "meta.json").read_text())
        meta["parts"]["loader"]["slots"] = 2
        (step_dir / "meta.json").write_text(json.dumps(meta))

    for name, mutation in (("moments", drop_moments), ("order", slots_from_dp)):
        run = tmp_path / name
        (run / "ckpt").mkdir(parents=True)
        shutil.copytree(full / "ckpt" / "step_00000003", run / "ckpt" / "step_00000003")
        edit_checkpoint(run / "ckpt" / "step_00000003", mutation)
        run_layout(data, run, "dp2-zero1", "--resume", "auto")
        with pytest.raises(AssertionError):
            assert_same_trajectory(full, run)


def test_kill_during_resharding_then_resume_again(data, uninterrupted, tmp_path):
    """kill -9 while a DP4 job loads a TP2 x PP2 checkpoint: the source is only read, never
    converted in place, so a second ``--resume auto`` goes on exactly as if nothing happened."""

    full = uninterrupted("tp2-pp2")
    run = tmp_path / "run"
    (run / "ckpt").mkdir(parents=True)
    shutil.copytree(full / "ckpt" / "step_00000003", run / "ckpt" / "step_00000003")
    before = {p.name: p.read_bytes() for p in (run / "ckpt" / "step_00000003").rglob("*") if p.is_file()}
    nproc, overrides = LAYOUTS["dp4"]
    cfg = config(tmp_path / "run.yaml", data, run)
    marker = tmp_path / "reading"  # written by a rank inside the load (tests/paused_train.py), which then waits
    entry = [str(REPO / "tests" / "paused_train.py"), str(marker)]
    cmd = command(cfg, *overrides, "--resume", "auto", nproc=nproc, entry=entry)
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + HANG_GUARD_S
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    import os

    import psutil

    job = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for member in job:  # torchrun and every rank (its workers run in sessions of their own)
        member.kill()
    psutil.wait_procs(job, timeout=60)
    proc.wait()
    assert marker.exists()  # the kill landed inside the load, after its first read
    holder = json.loads((run / "ckpt" / ".lock").read_text())["pid"]  # the killed job's lock stays behind
    while time.monotonic() < deadline:  # until its rank 0 is gone (then the lock is stale)
        try:
            os.kill(holder, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    assert not (run / "tb" / "metrics.jsonl").is_file() or not rows(run)
    after = {p.name: p.read_bytes() for p in (run / "ckpt" / "step_00000003").rglob("*") if p.is_file()}
    assert after == before
    run_layout(data, run, "dp4", "--resume", "auto")
    b = rows(run)
    assert sorted(b) == [4, 5, 6]
    full_rows = rows(full)
    for step in (4, 5, 6):
        assert abs(full_rows[step]["train/loss"] - b[step]["train/loss"]) <= 1e-5 * full_rows[step]["train/loss"]
