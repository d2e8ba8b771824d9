"""The DeepSpeed trainer: exact resume (1 and 2 processes), crash-safe checkpoints, CLI errors.

Each run is a real subprocess (`python -m sessa_train.train`, or torchrun for 2 ranks).
"""

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
from tests.trainer import ENV, REPO, command, losses, train, write_config

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(("nproc", "zero_stage"), [(1, 0), (2, 2), (2, 3)])
def test_resumed_run_equals_uninterrupted_run(shards, tmp_path, nproc, zero_stage):
    """The uninterrupted run's step-4 checkpoint, resumed on its own, goes on bit for bit."""
    zero = f"parallel.zero_stage={zero_stage}"
    full, split = tmp_path / "full", tmp_path / "split"
    train(write_config(tmp_path / "full.yaml", shards, full), zero, "checkpoint.every_steps=4", nproc=nproc)
    (split / "ckpt").mkdir(parents=True)
    shutil.copytree(full / "ckpt" / "step_00000004", split / "ckpt" / "step_00000004")
    second = train(write_config(tmp_path / "split.yaml", shards, split), zero, "--resume", "auto", nproc=nproc)
    assert "resumed from" in second.stdout and "at step 4" in second.stdout
    assert [s for s, _ in losses(split)] == list(range(5, 9))
    assert losses(split) == losses(full)[4:]  # bitwise: JSON keeps every digit of a float
    a, b = (read_weights(run / "ckpt")[0] for run in (full, split))
    assert {"embed.weight", "norm.weight"} <= a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(full)[-1][1] < losses(full)[0][1]


def test_sigkill_during_checkpoint_save_resumes_from_previous_complete_one(shards, tmp_path):
    run = tmp_path / "run"
    # a model large enough that writing a checkpoint takes a while, saved at every step
    cfg = write_config(tmp_path / "c.yaml", shards, run, d_model=256, n_layers=4, n_heads=4)
    cmd = command(cfg, "checkpoint.every_steps=1", "schedule.train_steps=1000", "logging.eval_every_steps=0")
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    caught = None
    try:
        while time.monotonic() < deadline and caught is None:
            partial = sorted((run / "ckpt").glob("step_*.partial")) if (run / "ckpt").is_dir() else []
            if partial and len(sorted((run / "ckpt").glob("step_????????"))) >= 2:
                # freeze the trainer, then kill it only if the save is still unfinished
                os.kill(proc.pid, signal.SIGSTOP)
                while Path(f"/proc/{proc.pid}/stat").read_text().split(") ")[1][0] != "T":
                    time.sleep(0.001)
                if partial[-1].is_dir():
                    os.kill(proc.pid, signal.SIGKILL)
                    caught = partial[-1]
                else:
                    os.kill(proc.pid, signal.SIGCONT)
            time.sleep(0.001)
    finally:
        proc.kill()
        proc.wait()
    assert caught is not None, "never saw a checkpoint being written"
    killed_step = int(caught.name[5:13])
    latest = (run / "ckpt" / "latest").read_text().strip()
    assert int(latest[5:]) < killed_step  # the pointer never names the interrupted save
    out = train(
        cfg,
        "--resume",
        "auto",
        "schedule.train_steps=1000",
        "schedule.stop_after_steps=1",
        "logging.eval_every_steps=0",
    )
    assert f"resumed from {run / 'ckpt' / latest} at step {int(latest[5:])}" in out.stdout
    assert not list((run / "ckpt").glob("*.partial"))  # leftovers were cleared


def test_sigterm_saves_and_stops(shards, tmp_path):
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", shards, run)
    cmd = command(cfg, "schedule.train_steps=100000", "logging.eval_every_steps=0")
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    metrics = run / "tb" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=HANG_GUARD_S)
    assert proc.returncode == 0, stdout[-2000:]
    last_step = losses(run)[-1][0]
    assert 3 <= last_step < 100000
    assert (run / "ckpt" / "latest").read_text().strip() == f"step_{last_step:08d}"
    assert f"stopping at step {last_step} on SIGTERM received by rank 0: saving" in stdout


# The trainer with its loss turned into NaN on the listed steps (all micro-batches of a step):
# argv = json list of steps, micro-batches per step, then sessa-train's own arguments.
POISONED_TRAINER = """
import json, sys
import sessa_train.models.plan as plan
import sessa_train.train as train
steps, gas = set(json.loads(sys.argv[1])), int(sys.argv[2])
real, calls = plan.ModelPlan.token_loss, [0]
def token_loss(self, logits, targets):
    step = calls[0] // gas + 1
    calls[0] += 1
    loss = real(self, logits, targets)
    return loss * float("nan") if step in steps else loss
plan.ModelPlan.token_loss = token_loss
sys.exit(train.main(sys.argv[3:]))
"""


def weights_at(run: Path, step: int) -> dict[str, torch.Tensor]:
    return read_weights(run / "ckpt" / f"step_{step:08d}")[0]


@pytest.mark.parametrize(("zero_stage", "grad_clip"), [(0, 1.0), (2, 1.0), (2, 0.0), (3, 1.0)])
def test_non_finite_step_is_skipped_and_training_goes_on(shards, tmp_path, zero_stage, grad_clip):
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", shards, run)
    args = ["--config", str(cfg), f"parallel.zero_stage={zero_stage}", f"optimizer.grad_clip={grad_clip}"]
    args += ["checkpoint.every_steps=1"]
    args += ["checkpoint.keep_last=10", "schedule.train_steps=5", "logging.eval_every_steps=0"]
    cmd = [sys.executable, "-c", POISONED_TRAINER, "[3]", "2", *args]  # 8 = 2 micro-batches x 4
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=ENV, timeout=HANG_GUARD_S)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "step 3: loss nan or its gradients not finite: update skipped (1 in a row)" in out.stdout
    rows = [json.loads(line) for line in (run / "tb" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/skipped"] for r in rows] == [0, 0, 1, 0, 0]
    assert all(torch.isfinite(torch.tensor(r["train/loss"])) for i, r in enumerate(rows) if i != 2)
    before, after, later = weights_at(run, 2), weights_at(run, 3), weights_at(run, 4)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the bad step changed nothing
    assert all(torch.isfinite(v).all() for v in later.values())
    assert any(not torch.equal(after[k], later[k]) for k in after)  # and training went on


def test_too_many_non_finite_steps_abort(shards, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", shards, tmp_path / "run")
    args = ["--config", str(cfg), "logging.max_bad_steps=3", "logging.eval_every_steps=0", "checkpoint.every_steps=1"]
    cmd = [sys.executable, "-c", POISONED_TRAINER, "[2, 3, 4, 5, 6, 7, 8]", "2", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=ENV, timeout=HANG_GUARD_S)
    assert out.returncode == 2
    assert "sessa-train: error: 3 consecutive steps with non-finite loss or gradients at step 4" in out.stderr
    assert (tmp_path / "run" / "ckpt" / "latest").read_text().strip() == "step_00000003"


BAD_CONFIGS = [
    (["model.d_modle=64"], "config key model.d_modle (command-line overrides): Key 'd_modle' not in 'ModelConfig'"),
    (["parallel.tensor=2", "parallel.zero_stage=2"],
     "parallel.zero_stage=2 with tensor/pipeline/context parallelism; valid: 0 or 1"),
    (["schedule.global_batch_size=6"], "schedule.global_batch_size=6 is not divisible by data.micro_batch_size=4"),
    (["model.vocab_size=100"], "model.vocab_size=100 is smaller than the tokenizer's vocabulary (400)"),
    (["--resume", "/nonexistent/step_00000001"], "is not a checkpoint folder (step_NNNNNNNN)"),
    (["compute.feedback_backend=triton"], "the triton backend needs CUDA tensors (got device cpu)"),
    (["compute.feedback_chunk_size=-1"], "compute.feedback_chunk_size must be an integer >= 0, got -1"),
]  # fmt: skip
# sessa-train's main once per case, in one process (one import of torch and DeepSpeed for all):
# each case's exit status and what it wrote to stderr, as JSON
EACH_CASE = """
import contextlib, io, json, sys
sys.path.insert(0, sys.argv[1])
from sessa_train.train import main
config, root, cases = sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
for i, overrides in enumerate(cases):
    err = io.StringIO()
    dirs = [f"checkpoint.dir={root}/{i}/ckpt", f"logging.dir={root}/{i}/tb"]
    with contextlib.redirect_stderr(err):
        code = main(["--config", config, *dirs, *overrides])
    print(json.dumps({"code": code, "stderr": err.getvalue()}))
"""


def test_bad_config_exits_with_one_line(shards, tmp_path):
    """Through sessa-train's entry point (``train.main``, what the command line calls), each as
    the user would meet it, in one subprocess: exit status 2 and one error line naming the value.
    (Exit status 2 through the real command line: the subprocess tests in test_checkpoint.py.)"""
    config = write_config(tmp_path / "c.yaml", shards, tmp_path / "r")
    cases = json.dumps([overrides for overrides, _ in BAD_CONFIGS])
    out = subprocess.run([sys.executable, "-c", EACH_CASE, str(REPO), str(config), str(tmp_path / "runs"), cases],
                         capture_output=True, text=True, cwd=REPO, env=ENV | {"OMP_NUM_THREADS": "1"},
                         timeout=HANG_GUARD_S)  # fmt: skip
    results = [json.loads(line) for line in out.stdout.splitlines() if line.startswith('{"code"')]
    assert len(results) == len(BAD_CONFIGS), out.stdout[-2000:] + out.stderr[-2000:]
    for (overrides, message), got in zip(BAD_CONFIGS, results, strict=True):
        errors = [line for line in got["stderr"].splitlines() if line.startswith("sessa-train: error:")]
        assert got["code"] == 2 and len(errors) == 1 and message in errors[0], (overrides, got)


@pytest.mark.slow
def test_tiny_preset_learns_the_default_corpus(tiny_run):
    """configs/tiny.yaml on the offline default corpus: it starts at chance (ln 4096) and within
    150 steps its loss is clearly below the entropy of the corpus's token frequencies (what a
    model that ignores context reaches at best), counted here from the shards: measured 5.43
    against 6.42 nats for the mean of steps 131-150."""
    from sessa_train.data import PackedTokenLoader
    from tests.conftest import TINY_STEPS

    curve = [loss for _, loss in losses(tiny_run["run"])]
    assert len(curve) == TINY_STEPS
    assert abs(curve[0] - torch.log(torch.tensor(4096.0)).item()) < 0.2  # starts at chance
    counts = torch.zeros(4096, dtype=torch.float64)
    for batch in PackedTokenLoader(tiny_run["data"] / "shards", "train", micro_batch_size=8, rank=0, world_size=1,
                                   shuffle=False, max_epochs=1):  # fmt: skip
        counts += torch.bincount(batch["tokens"][:, 1:].flatten(), minlength=4096)
    p = counts[counts > 0] / counts.sum()
    unigram = -(p * p.log()).sum().item()
    final = sum(curve[-20:]) / 20
    assert final < unigram - 0.5, f"mean loss of the last 20 steps {final:.3f} vs unigram entropy {unigram:.3f}"


def test_config_errors_before_start_are_one_line(shards, tmp_path, capsys):
    """Errors met before any process group exists, checked in this process."""
    from sessa_train.config import load_config
    from sessa_train.errors import TrainError
    from sessa_train.train import main
    from sessa_train.trainer.build import initial_weights

    config = write_config(tmp_path / "c.yaml", shards, tmp_path / "r")
    assert main(["--config", str(config), "schedule.train_steps=many"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    want = "sessa-train: error: config key schedule.train_steps (command-line overrides): Value 'many'"
    assert len(errors) == 1 and errors[0].startswith(want), errors
    with pytest.raises(TrainError, match=r"^checkpoint\.init_from: /nonexistent is not a sessa-train export"):
        initial_weights(load_config([config], ["checkpoint.init_from=/nonexistent"]), None)


@pytest.mark.slow
def test_bf16_on_cpu_follows_the_fp32_curve(tiny_run, tmp_path):
    """configs/tiny.yaml with parallel.precision=bf16 (DeepSpeed's bf16 engine, on CPU) for 60 of
    its 300 steps against the fp32 run. Tolerance: bf16 keeps 8 significand bits (rounding
    2^-9 = 0.2% per operation) in activations and module weights, while DeepSpeed keeps fp32
    master weights, so each step differs little, but the two runs are different trajectories and
    drift apart slowly: measured on this machine over 120 steps, at most 2.3% on any step, and
    20-step windows from 0.3% at the start to 1.4% (bf16 lower) by steps 100-120 (0.5% with the
    initial weights of an earlier version: the drift depends on the trajectory). The test allows 3% per step and
    2% per window, and 0.1% at the first step, where only the forward rounding differs."""
    from tests.conftest import tiny_overrides

    run = tmp_path / "bf16"
    train(
        REPO / "configs" / "tiny.yaml",
        *tiny_overrides(tiny_run["data"], run),
        "parallel.precision=bf16",
        "schedule.stop_after_steps=60",
        "logging.eval_every_steps=0",
        threads=2,
    )
    bf16, fp32 = [loss for _, loss in losses(run)], [loss for _, loss in losses(tiny_run["run"])][:60]
    assert len(bf16) == 60
    assert abs(bf16[0] - fp32[0]) <= 1e-3 * fp32[0]
    assert max(abs(a - b) / b for a, b in zip(bf16, fp32, strict=True)) < 0.03
    windows = [(sum(bf16[i : i + 20]), sum(fp32[i : i + 20])) for i in range(0, 60, 20)]
    assert max(abs(a - b) / b for a, b in windows) < 0.02
    assert all(a != b for a, b in zip(bf16[1:], fp32[1:], strict=True))  # it did run in bf16


def test_document_masking_through_the_trainer_under_data_parallelism(shards, tmp_path):
    """data.document_masking: the loader's positions from EOS reach the model; 2 data-parallel
    ranks follow one process, and the run differs from one without masking (EOS joins documents
    in the shards, so masking changes what the model reads)."""
    runs = {}
    for name, nproc, masking in (("one", 1, True), ("two", 2, True), ("off", 1, False)):
        run = tmp_path / name
        cfg = write_config(tmp_path / f"{name}.yaml", shards, run)
        train(cfg, f"data.document_masking={str(masking).lower()}", "logging.eval_every_steps=0", nproc=nproc)
        runs[name] = [loss for _, loss in losses(run)]
    assert all(abs(a - b) <= 1e-5 * a for a, b in zip(runs["one"], runs["two"], strict=True))
    assert max(abs(a - b) for a, b in zip(runs["one"], runs["off"], strict=True)) > 1e-4


@pytest.mark.parametrize(
    ("parallel", "message"),
    [
        (["parallel.context=3"], "sequence length 31 of {shards} is not divisible by parallel.context=3"),
        (["parallel.tensor=2"], "sequence length 31 of {shards} is not divisible by parallel.context=1 x parallel."
                                "tensor=2, as parallel.sequence_parallel=true needs; set parallel.sequence_parallel="
                                "false or write the data with another sequence length"),
        (["parallel.tensor=2", "parallel.sequence_parallel=false"], None),
    ],
)  # fmt: skip
def test_a_sequence_that_does_not_split_over_the_layout_is_refused_in_one_line(shards, tmp_path, parallel, message):
    """Context parallelism splits each sequence over its ranks, and sequence parallelism each
    context rank's block over the tensor-parallel ranks: the data's sequence length must divide."""
    from sessa_train.config import load_config
    from sessa_train.errors import TrainError
    from sessa_train.parallel.state import ParallelState
    from sessa_train.trainer.build import build_loader

    cfg = load_config([write_config(tmp_path / "c.yaml", shards, tmp_path / "r")], parallel)
    par = cfg.parallel
    state = ParallelState(par.tensor, 1, 1, 0, 0, 0, par.context, 0, par.sequence_parallel and par.tensor > 1)
    if message is None:
        assert build_loader(cfg, state).index["seq_len"] == 31
        return
    with pytest.raises(TrainError) as refused:
        build_loader(cfg, state)
    assert str(refused.value) == message.format(shards=shards)
