"""Checkpoint integrity and resume guards through the real trainer (subprocesses): a damaged
newest checkpoint falls back to the one before, every refusal is one line naming the bad value,
nothing the project loads is a pickle, and repeated kill -9 during saves still ends bit for bit
on the uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sessa_train.checkpoint import read_weights
from tests.helpers import HANG_GUARD_S
from tests.trainer import ENV, REPO, command, final_weights, losses, train, write_config

pytestmark = pytest.mark.slow

STEPS = ["schedule.train_steps=6", "checkpoint.every_steps=2", "checkpoint.keep_last=5", "logging.eval_every_steps=0"]


@pytest.fixture(scope="module")
def full(shards, tmp_path_factory) -> Path:
    """6 steps in one process, checkpoints at 2, 4 and 6, written synchronously (the kill test
    below saves in the background, the default)."""
    run = tmp_path_factory.mktemp("full") / "run"
    train(write_config(run.parent / "c.yaml", shards, run), *STEPS, "checkpoint.async_save=false")
    return run


def copy_run(full: Path, to: Path, upto: int) -> Path:
    """A run folder holding ``full``'s checkpoints up to step ``upto`` and its metrics up to there."""
    (to / "ckpt").mkdir(parents=True)
    (to / "tb").mkdir()
    for step in range(2, upto + 1, 2):
        shutil.copytree(full / "ckpt" / f"step_{step:08d}", to / "ckpt" / f"step_{step:08d}")
    (to / "ckpt" / "latest").write_text(f"step_{upto:08d}")
    lines = (full / "tb" / "metrics.jsonl").read_text().splitlines()
    (to / "tb" / "metrics.jsonl").write_text("".join(f"{x}\n" for x in lines if json.loads(x)["step"] <= upto))
    return to


def one_error_line(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    return errors[0]


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(full, shards, tmp_path):
    """#15.4: a truncated file in the newest checkpoint: --resume auto says which and why, sets it
    aside (not deleted, not pruned in its place), resumes the one before, and ends on the
    uninterrupted run's losses and weights, bit for bit."""
    run = copy_run(full, tmp_path / "run", 6)
    part = sorted((run / "ckpt" / "step_00000006" / "model").glob("*.safetensors"))[0]
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    size = part.stat().st_size
    out = train(write_config(tmp_path / "c.yaml", shards, run), *STEPS, "--resume", "auto")
    assert f"skipping checkpoint step_00000006: {part} has {size} bytes, the manifest says" in out.stdout
    assert "resumed from" in out.stdout and "at step 4" in out.stdout
    assert list((run / "ckpt" / "damaged").glob("*/step_00000006"))
    assert losses(run) == losses(full)
    a, b = final_weights(full), final_weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("damage", ["missing", "flipped", "manifest"])
def test_an_explicit_checkpoint_that_does_not_verify_is_one_line_naming_the_file(full, shards, tmp_path, damage):
    run = copy_run(full, tmp_path / "run", 4)
    step = run / "ckpt" / "step_00000004"
    victim = {"missing": step / "rng" / "rank00000.safetensors", "flipped": step / "meta.json"}.get(
        damage, step / "manifest.json"
    )
    if damage == "missing":
        victim.unlink()
    elif damage == "flipped":
        victim.write_text(victim.read_text().replace('"step": 4', '"step": 5'))
    else:
        victim.write_text(victim.read_text()[:40])
    out = train(write_config(tmp_path / "c.yaml", shards, run), *STEPS, "--resume", str(step), check=False)
    error = one_error_line(out)
    assert error.startswith(f"sessa-train: error: checkpoint.resume={step}: {victim}")
    assert {"missing": "is missing", "flipped": "does not match its checksum", "manifest": "is not a manifest"}[
        damage
    ] in error


def test_resuming_an_older_checkpoint_is_refused_unless_asked_and_keeps_the_newer(full, shards, tmp_path):
    run = copy_run(full, tmp_path / "run", 6)
    cfg = write_config(tmp_path / "c.yaml", shards, run)
    older = run / "ckpt" / "step_00000002"
    error = one_error_line(train(cfg, *STEPS, "--resume", str(older), check=False))
    assert "is older than step_00000006 in the same folder" in error and "checkpoint.resume_older=true" in error
    out = train(cfg, *STEPS, "--resume", str(older), "checkpoint.resume_older=true")
    assert "moved step_00000004, step_00000006 to" in out.stdout
    aside = sorted((run / "ckpt" / "superseded").glob("*"))[0]
    assert sorted(p.name for p in aside.iterdir()) == ["step_00000004", "step_00000006"]
    assert losses(run) == losses(full)  # steps 3-6 again, each once


def test_resume_with_other_data_names_the_differing_key(full, shards, tmp_path):
    """#15.3: shards of the same names written at another sequence length."""
    from pydoc_data.topics import topics

    from sessa_train.data import write_shards

    other = tmp_path / "other"

    docs = [topics[name][:1500] for name in sorted(topics)][:40]
    write_shards(docs, shards.parent / "tok.model", other, seq_len=15, samples_per_shard=80, val_fraction=0.1)
    run = copy_run(full, tmp_path / "run", 4)
    out = train(write_config(tmp_path / "c.yaml", other, run), *STEPS, "--resume", "auto", check=False)
    error = one_error_line(out)
    assert "step_00000004 was trained on other data: its index_sha256=" in error
    assert f"data.path={other}" in error


def test_a_model_change_on_resume_names_the_keys_before_anything_loads(full, shards, tmp_path):
    run = copy_run(full, tmp_path / "run", 4)
    cfg = write_config(tmp_path / "c.yaml", shards, run)
    error = one_error_line(train(cfg, *STEPS, "--resume", "auto", "model.d_model=48", "model.n_layers=3", check=False))
    assert (
        "holds a model with d_model=32 (this run: model.d_model=48), n_layers=2 (this run: model.n_layers=3)" in error
    )


def test_an_unwritable_checkpoint_folder_fails_at_start(shards, tmp_path):
    """#15.5: found before the first step, not at the first save."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cfg = write_config(tmp_path / "c.yaml", shards, tmp_path / "run")
    out = train(cfg, *STEPS, f"checkpoint.dir={blocker}/ckpt", check=False)
    error = one_error_line(out)
    assert error == f"sessa-train: error: checkpoint.dir={blocker}/ckpt is not writable (Not a directory)"
    assert not (tmp_path / "run" / "tb" / "metrics.jsonl").exists() or not losses(tmp_path / "run")


def test_resume_writes_each_step_once_with_a_marker(full, shards, tmp_path):
    """metrics.jsonl of a job that died after step 5 (rows 5 written, checkpoint 4): the resumed
    job drops row 5, marks the resume, and writes 5 and 6 again."""
    run = copy_run(full, tmp_path / "run", 4)
    lines = (full / "tb" / "metrics.jsonl").read_text().splitlines()
    (run / "tb" / "metrics.jsonl").write_text("".join(f"{x}\n" for x in lines if json.loads(x)["step"] <= 5))
    train(write_config(tmp_path / "c.yaml", shards, run), *STEPS, "--resume", "auto")
    rows = [json.loads(x) for x in (run / "tb" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 4, 5, 6]
    assert rows[4]["event"] == "resume" and rows[4]["checkpoint"].endswith("step_00000004")
    assert losses(run) == losses(full)


def test_skipped_shards_are_counted_in_metrics_tensorboard_and_the_checkpoint(shards, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sessa_train.data.loader import _shard_order

    data = tmp_path / "shards"
    shutil.copytree(shards, data)
    index = json.loads((data / "index.json").read_text())
    train_shards = index["splits"]["train"]["shards"]
    first = _shard_order(len(train_shards), 1234, 0, True)[:2]  # what the two reader slots read first
    victims = sorted(train_shards[i]["name"] for i in first)
    for name in victims:
        (data / name).write_bytes(b"damaged" * 100)
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", data, run)
    train(cfg, *STEPS, "data.skip_corrupt=true", "data.max_skipped_fraction=0.2", "data.reader_slots=2")
    rows = [json.loads(x) for x in (run / "tb" / "metrics.jsonl").read_text().splitlines()]
    assert [r["data/skipped_shards"] for r in rows] == [2] * 6
    meta = json.loads((run / "ckpt" / "step_00000006" / "meta.json").read_text())
    assert meta["parts"]["loader"]["skipped"] == victims
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    assert [e.value for e in events.Scalars("data/skipped_shards")] == [2.0] * 6
    out = train(cfg, *STEPS, "data.reader_slots=2", f"checkpoint.dir={tmp_path}/other", check=False)
    assert str(data / victims[0]) in one_error_line(out) or str(data / victims[1]) in one_error_line(out)


def test_nothing_the_project_loads_is_a_pickle(full, shards, tmp_path):
    """#15.8: every file of a checkpoint is JSON, safetensors or the sentencepiece model, and a
    resume and an export run with torch.load (which unpickles) disabled."""
    from safetensors import safe_open

    step = full / "ckpt" / "step_00000006"
    for f in step.rglob("*"):
        if f.suffix == ".json":
            json.loads(f.read_text())
        elif f.suffix == ".safetensors":
            with safe_open(str(f), "pt") as fh:
                assert list(fh.keys())
        elif f.is_file():
            assert f.name == "tokenizer.model", f
    run = copy_run(full, tmp_path / "run", 4)
    no_pickle = (
        "import sys, torch\n"
        "def refuse(*a, **k):\n    raise AssertionError('torch.load called')\n"
        "torch.load = refuse\n"
        "from sessa_train.{module} import {main} as main\nsys.exit(main(sys.argv[1:]))\n"
    )
    cfg = write_config(tmp_path / "c.yaml", shards, run)
    resume = [
        sys.executable,
        "-c",
        no_pickle.format(module="train", main="main"),
        "--config",
        str(cfg),
        *STEPS,
        "--resume",
        "auto",
    ]
    out = subprocess.run(resume, capture_output=True, text=True, cwd=REPO, env=ENV, timeout=HANG_GUARD_S)
    assert out.returncode == 0 and "at step 4" in out.stdout, out.stderr[-2000:]
    export = [
        sys.executable,
        "-c",
        no_pickle.format(module="cli", main="export_main"),
        str(run / "ckpt"),
        str(tmp_path / "export"),
    ]
    out = subprocess.run(export, capture_output=True, text=True, cwd=REPO, env=ENV, timeout=HANG_GUARD_S)
    assert out.returncode == 0, out.stderr[-2000:]


def test_kill_9_again_and_again_during_saves_still_ends_bit_for_bit(full, shards, tmp_path):
    """Three jobs killed with SIGKILL while a checkpoint is being written (a save every step),
    each resumed with --resume auto, then a last one to the end: the losses and weights are the
    uninterrupted run's, bit for bit."""
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", shards, run, d_model=128, n_layers=4, n_heads=4)
    steps = [
        "schedule.train_steps=12",
        "checkpoint.every_steps=1",
        "checkpoint.keep_last=3",
        "logging.eval_every_steps=0",
    ]
    reference = tmp_path / "reference"
    train(write_config(tmp_path / "r.yaml", shards, reference, d_model=128, n_layers=4, n_heads=4), *steps)
    kills = 0
    while kills < 3:
        proc = subprocess.Popen(command(cfg, *steps, "--resume", "auto"), cwd=REPO, env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        start_count = len(list((run / "ckpt").glob("step_????????"))) if (run / "ckpt").is_dir() else 0
        deadline, caught = time.monotonic() + 240, False
        while time.monotonic() < deadline and proc.poll() is None and not caught:
            saving = (run / "ckpt").is_dir() and any((run / "ckpt").glob("*.partial"))
            if saving and (kills == 0 or len(list((run / "ckpt").glob("step_????????"))) > start_count):
                os.kill(proc.pid, signal.SIGKILL)  # a save after the first of this job is under way
                caught = True
            time.sleep(0.002)
        proc.kill()
        proc.wait()
        assert caught, "the job ended before a save could be interrupted"
        kills += 1
    train(cfg, *steps, "--resume", "auto")
    assert losses(run) == losses(reference)
    a, b = final_weights(reference), final_weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    latest = (run / "ckpt" / "latest").read_text().strip()
    assert latest == "step_00000012" and read_weights(run / "ckpt")[1]["step"] == 12


def test_a_blend_logs_its_shares_and_resumes_under_another_layout(shards, tmp_path):
    """data.blend 0.75 / 0.25 of a global batch of 8: every step takes 6 samples of the first set
    and 2 of the second, metrics.jsonl counts each set's tokens, and the step-2 checkpoint
    resumed by 2 ranks gives the same batches and losses; other weights are refused in one line."""
    from pydoc_data.topics import topics

    from sessa_train.data import write_shards

    second = tmp_path / "second"
    docs = [topics[name][1500:3000] for name in sorted(topics)[40:46]]
    write_shards(docs, shards.parent / "tok.model", second, seq_len=31, samples_per_shard=10, val_fraction=0.0)
    blend = f"data.blend=[0.75,{shards},0.25,{second}]"
    common = [blend, "logging.sample_ids=true", "schedule.train_steps=4", *STEPS[1:]]
    full = tmp_path / "full"
    train(write_config(tmp_path / "f.yaml", shards, full), *common)
    rows = {r["step"]: r for r in map(json.loads, (full / "tb" / "metrics.jsonl").read_text().splitlines())}
    base = json.loads((shards / "index.json").read_text())["splits"]["train"]["samples"]
    for step in range(1, 5):
        ids = rows[step]["sample_ids"]
        assert sum(i < base for i in ids) == 6 and sum(i >= base for i in ids) == 2
    assert list(rows[4]["source_tokens"].values()) == [4 * 6 * 32, 4 * 2 * 32]
    resumed = copy_run(full, tmp_path / "resumed", 2)
    train(write_config(tmp_path / "r.yaml", shards, resumed), *common, "--resume", "auto", nproc=2)
    again = {r["step"]: r for r in map(json.loads, (resumed / "tb" / "metrics.jsonl").read_text().splitlines())}
    for step in (3, 4):
        assert again[step]["sample_ids"] == rows[step]["sample_ids"]
        assert abs(again[step]["train/loss"] - rows[step]["train/loss"]) <= 1e-5 * rows[step]["train/loss"]
    assert again[4]["source_tokens"] == rows[4]["source_tokens"]
    other = [f"data.blend=[0.5,{shards},0.5,{second}]", *common[1:], "--resume", "auto"]
    out = train(write_config(tmp_path / "o.yaml", shards, resumed), *other, check=False)
    assert "was read from a blend with weights [0.75, 0.25]; this run has data.blend with weights [0.5, 0.5]" in (
        one_error_line(out)
    )
