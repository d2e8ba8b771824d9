"""Hostile but realistic input, round 3: every item is a one-line error (exit status 2, no
traceback) where one is promised, or leaves the weights as they were where weights are at stake.

Checkpoints and exports: no pickle is ever loaded, only files the manifest lists are read, any
damage to a manifest or meta is a damaged checkpoint, one run per checkpoint folder (a lock), a
full disk, exports checked before they are built. Data: index.json and input text checked. Config,
CLI and signals: impossible sizes, bad folders and seeds, the generator's limits, which rank a
signal came from, a changed schedule on resume, a clean exit after the error.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sessa_train.checkpoint import read_weights
from tests.helpers import HANG_GUARD_S, script
from tests.trainer import ENV, REPO, command, losses, train, write_config

pytestmark = pytest.mark.slow
STEPS = ["schedule.train_steps=4", "checkpoint.every_steps=2", "checkpoint.keep_last=5", "logging.eval_every_steps=0"]


def run_cmd(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=ENV | kw.pop("env", {}),
                          timeout=HANG_GUARD_S, **kw)  # fmt: skip


def one_line(out: subprocess.CompletedProcess, *expected: str) -> str:
    """The one error line of a command that refused its input, holding every ``expected`` phrase."""
    assert out.returncode == 2, (out.returncode, out.stdout[-1500:], out.stderr[-3000:])
    assert "Traceback" not in out.stderr and "terminate called" not in out.stderr, out.stderr[-3000:]
    lines = [line for line in out.stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1, out.stderr[-3000:]
    for phrase in expected:
        assert phrase in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def run(shards, tmp_path_factory) -> Path:
    """4 steps in one process, checkpoints at 2 and 4."""
    root = tmp_path_factory.mktemp("reliability") / "run"
    train(write_config(root.parent / "c.yaml", shards, root), *STEPS)
    return root


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory) -> Path:
    from sessa_train.export import export_checkpoint

    return export_checkpoint(run / "ckpt", tmp_path_factory.mktemp("exported") / "export")


def copy_checkpoint(run: Path, to: Path, step: int = 4) -> Path:
    shutil.copytree(run / "ckpt" / f"step_{step:08d}", to / f"step_{step:08d}")
    return to / f"step_{step:08d}"


# -- checkpoints and exports ----------------------------------------------------------------


def test_no_pickle_runs_from_a_folder_of_the_earlier_format(run, shards, tmp_path):
    """A folder with DeepSpeed's module file (a planted __reduce__ payload) and no meta.json: the
    export and a resume refuse it in one line, and the payload never runs."""
    import pickle

    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = tmp_path / "ckpt" / "step_00000004"
    folder.mkdir(parents=True)
    (folder / "mp_rank_00_model_states.pt").write_bytes(pickle.dumps(Payload()))
    one_line(run_cmd([*script("sessa-export"), str(folder), str(tmp_path / "out")]),
             "is not a complete checkpoint (no meta.json)")  # fmt: skip
    cfg = write_config(tmp_path / "c.yaml", shards, tmp_path / "again")
    one_line(run_cmd(command(cfg, *STEPS, "--resume", str(folder))), "manifest.json is missing")
    assert not marker.exists()


def test_only_the_files_the_manifest_lists_are_read(run, tmp_path):
    """A stale extra shard and a differently named one beside the real shards: the weights read
    for export (and resume) are the checkpoint's own."""
    from safetensors.torch import load_file, save_file

    step = copy_checkpoint(run, tmp_path)
    real = sorted((step / "model").glob("*.safetensors"))[0]
    zeros = {k: torch.zeros_like(v) for k, v in load_file(real).items()}
    save_file(zeros, str(step / "model" / "tp0-pp0-1.safetensors"))  # a stale part of an earlier save
    save_file(zeros, str(step / "model" / "leftover.safetensors"))
    got, _ = read_weights(step)
    want, _ = read_weights(run / "ckpt" / "step_00000004")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def test_any_damage_to_a_manifest_or_meta_is_a_damaged_checkpoint(run, tmp_path):
    """A flipped bit anywhere in manifest.json or meta.json (keys included) makes verification
    name the problem instead of raising; --resume auto then falls back (below)."""
    step = copy_checkpoint(run, tmp_path)
    checked = 0
    for name in ("manifest.json", "meta.json"):
        original = (step / name).read_bytes()
        for at in range(0, len(original), max(1, len(original) // 60)):
            for bit in (0x01, 0x20):
                flipped = bytearray(original)
                flipped[at] ^= bit
                (step / name).write_bytes(bytes(flipped))
                assert _verify(step), f"{name} byte {at} ^ {bit:#x} went unnoticed"
                checked += 1
        (step / name).write_bytes(original)
    assert _verify(step) is None and checked > 200


_VERIFIER: dict = {}


def _verify(step: Path) -> str | None:
    """``CheckpointManager.verify`` of a folder, in one long-lived process with a one-rank group
    (verify is a collective; starting a process per flipped bit would be slow)."""
    if "proc" not in _VERIFIER:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        loop = (
            "import sys, torch.distributed as dist\nfrom pathlib import Path\n"
            "from sessa_train.checkpoint import CheckpointManager\n"
            f"dist.init_process_group('gloo', init_method='tcp://127.0.0.1:{port}', rank=0, world_size=1)\n"
            "for line in sys.stdin:\n"
            "    p = Path(line.strip())\n"
            "    print(repr(CheckpointManager(p.parent, 5, 0, 1, print).verify(p)), flush=True)\n"
        )
        _VERIFIER["proc"] = subprocess.Popen([sys.executable, "-c", loop], stdin=subprocess.PIPE,
                                             stdout=subprocess.PIPE, text=True, cwd=REPO, env=ENV)  # fmt: skip
    proc = _VERIFIER["proc"]
    proc.stdin.write(f"{step}\n")
    proc.stdin.flush()
    return eval(proc.stdout.readline())  # the repr of our own str or None


def test_resume_auto_falls_back_past_a_flipped_bit_in_a_manifest_key(run, shards, tmp_path):
    folder = tmp_path / "ckpt"
    copy_checkpoint(run, folder, 2)
    newest = copy_checkpoint(run, folder, 4)
    (folder / "latest").write_text(newest.name)
    text = (newest / "manifest.json").read_text().replace('"bytes"', '"byt%s"', 1)
    (newest / "manifest.json").write_text(text)
    cfg = write_config(tmp_path / "c.yaml", shards, tmp_path)
    out = run_cmd(command(cfg, *STEPS, "--resume", "auto"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "skipping checkpoint step_00000004" in out.stdout and "at step 2" in out.stdout
    assert (folder / "damaged").is_dir()


def test_a_second_run_into_the_same_folder_is_refused(shards, tmp_path):
    """A live run holds the folder: a second one stops in one line naming it, touching nothing;
    a lock left by a process that is gone is taken over."""
    cfg = write_config(tmp_path / "c.yaml", shards, tmp_path / "run")
    long = command(cfg, "schedule.train_steps=100000", "logging.eval_every_steps=0")
    first = subprocess.Popen(long, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lock = tmp_path / "run" / "ckpt" / ".lock"
    try:
        deadline = time.time() + HANG_GUARD_S
        while not (lock.exists() and (tmp_path / "run" / "tb" / "metrics.jsonl").exists()) and time.time() < deadline:
            time.sleep(0.2)
        holder = json.loads(lock.read_text())
        assert holder["pid"] == first.pid
        second = run_cmd(command(cfg, *STEPS))
        one_line(second, f"is in use by another run (pid {first.pid} on {socket.gethostname()}", str(lock))
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=HANG_GUARD_S)
    assert not lock.exists()  # released at the end of the run
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": 2**22 + 17, "job": "", "started": "then"}))
    out = run_cmd(command(cfg, *STEPS, "--resume", "auto"))
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux) for a small tmpfs")
def test_a_full_disk_during_a_save_is_one_line_and_loses_nothing(shards, tmp_path):
    """The checkpoint folder on a tmpfs of 2 MiB (a user and mount namespace of the test's own):
    the saves that fit are intact and verify; the one that does not is one line naming the folder
    and the free space, and no partial folder is left."""
    folder = tmp_path / "small"
    folder.mkdir()
    cfg = write_config(tmp_path / "c.yaml", shards, tmp_path / "run")
    trainer = command(cfg, "schedule.train_steps=8", "checkpoint.every_steps=1", "checkpoint.keep_last=10",
                      "logging.eval_every_steps=0", f"checkpoint.dir={folder}")  # fmt: skip
    script = f"mount -t tmpfs -o size=2m tmpfs {folder} && exec {' '.join(trainer)}"
    out = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, cwd=REPO, env=ENV,
                         timeout=HANG_GUARD_S)  # fmt: skip
    if "mount" in out.stderr and "permission" in out.stderr.lower():
        pytest.skip(f"no tmpfs in a user namespace here: {out.stderr.strip()}")
    line = one_line(out, f"into {folder} failed on rank 0: No space left on device", "MiB free there")
    saved = [s for s in out.stdout.splitlines() if s.startswith("saved ")]
    assert saved, out.stdout[-2000:]
    assert "the checkpoints before it are intact" in line


def test_exports_are_checked_before_anything_is_built(exported, shards, tmp_path):
    from safetensors.torch import load_file, save_file

    from sessa_train.errors import CheckpointError
    from sessa_train.export import load_pretrained

    def broken(name: str, change) -> Path:
        folder = tmp_path / name
        shutil.copytree(exported, folder)
        change(folder)
        return folder

    def tensors(change):
        def apply(folder: Path) -> None:
            t = load_file(folder / "model.safetensors")
            change(t)
            save_file(t, str(folder / "model.safetensors"), metadata={"format": "pt"})

        return apply

    def config(change):
        def apply(folder: Path) -> None:
            c = json.loads((folder / "config.json").read_text())
            change(c)
            (folder / "config.json").write_text(json.dumps(c))

        return apply

    cases = {
        "dtype": (tensors(lambda t: t.update({"norm.weight": t["norm.weight"].half()})), "is F16, config.json says"),
        "shape": (tensors(lambda t: t.update({"norm.weight": t["norm.weight"][:-1]})), "has shape [31]"),
        "truncated": (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:-64]),
                      "cannot be read"),
        "absurd": (config(lambda c: c["model"].update({"d_model": 10**9, "n_heads": 10**6})), "has shape"),
        "not-a-model": (config(lambda c: c["model"].update({"d_model": "wide"})), "does not describe a model"),
    }  # fmt: skip
    for name, (change, message) in cases.items():
        folder = broken(name, change)
        with pytest.raises(CheckpointError, match=re.escape(message)):
            load_pretrained(folder)
        cfg = write_config(tmp_path / f"{name}.yaml", shards, tmp_path / f"run-{name}")
        one_line(run_cmd(command(cfg, *STEPS, f"checkpoint.init_from={folder}")), "checkpoint.init_from", message)


# -- data --------------------------------------------------------------------------------------


def test_an_index_that_contradicts_itself_is_one_line(shards, tmp_path):
    from sessa_train.data import load_index
    from sessa_train.errors import DataError

    def edited(name: str, change) -> Path:
        folder = tmp_path / name
        shutil.copytree(shards, folder)
        index = json.loads((folder / "index.json").read_text())
        change(index)
        (folder / "index.json").write_text(json.dumps(index))
        return folder

    with pytest.raises(DataError, match="sample_tokens=32 disagrees with seq_len=16"):
        load_index(edited("halved", lambda i: i.update(seq_len=16)))
    with pytest.raises(DataError, match="lacks splits"):
        load_index(edited("nosplits", lambda i: i.pop("splits")))
    bad = tmp_path / "utf8"
    shutil.copytree(shards, bad)
    (bad / "index.json").write_bytes((bad / "index.json").read_bytes().replace(b'"format"', b'"\xff\xfe"', 1))
    with pytest.raises(DataError, match="not UTF-8 at byte"):
        load_index(bad)
    cfg = write_config(tmp_path / "c.yaml", edited("cli", lambda i: i.update(seq_len=16)), tmp_path / "run")
    one_line(run_cmd(command(cfg, *STEPS)), "disagrees with seq_len=16")


def test_bad_input_text_and_arguments_of_the_data_tools_are_one_line(shards, tmp_path):
    tok = str(shards.parent / "tok.model")
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    txt = tmp_path / "latin.txt"
    txt.write_bytes(b"line one\nna\xefve\n")
    shards_cli = [*script("sessa-write-shards"), "--tokenizer", tok, "--no-progress"]
    tok_cli = [*script("sessa-train-tokenizer"), "--model", str(tmp_path / "t.model")]
    for cli, extra in ((shards_cli, ["--out", str(tmp_path / "o")]), (tok_cli, [])):
        one_line(run_cmd([*cli, *extra, "--input", str(latin)]), f"{latin}: not valid UTF-8 at line 2, byte")
        one_line(run_cmd([*cli, *extra, "--input", str(txt)]), f"{txt}: not valid UTF-8 at byte 11")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n')
    one_line(run_cmd([*tok_cli, "--input", str(empty)]), "holds no text")
    good = tmp_path / "ok.jsonl"
    good.write_text('{"text": "hello"}\n')
    base = [*shards_cli, "--input", str(good), "--out", str(tmp_path / "o")]
    one_line(run_cmd([*base, "--workers", "-1"]), "argument --workers: must be >= 1, got -1")
    one_line(run_cmd([*base, "--samples-per-shard", "0"]), "argument --samples-per-shard: must be >= 1, got 0")
    one_line(run_cmd([*base, "--shard-bytes", "0"]), "argument --shard-bytes: must be >= 10240, got 0")


# -- config, CLI, signals ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.d_model=1000000000", "needs"),
        ("data.seed=-1", "data.seed must be >= 0"),
    ],
)
def test_impossible_config_is_one_line_before_anything_is_built(shards, tmp_path, override, message):
    cfg = write_config(tmp_path / "c.yaml", shards, tmp_path / "run")
    start = time.perf_counter()
    line = one_line(run_cmd(command(cfg, *STEPS, override)), message)
    if override.startswith("model.d_model"):
        assert "GiB per rank for weights, gradients and AdamW state alone" in line
        assert time.perf_counter() - start < 120  # refused from the plan, not after allocating


def test_a_logging_dir_that_is_a_file_and_a_checkpoint_dir_that_is_a_file_end_cleanly(shards, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", shards, tmp_path / "run")
    afile = tmp_path / "afile"
    afile.write_text("")
    one_line(run_cmd(command(cfg, *STEPS, f"logging.dir={afile}")), f"logging.dir={afile} cannot be used as a folder")
    for _ in range(4):  # it once aborted with "terminate called without an active exception" after its line
        one_line(run_cmd(command(cfg, *STEPS, f"checkpoint.dir={afile}")), f"checkpoint.dir={afile} is not writable")


def test_generate_refuses_what_it_cannot_do_in_one_line(exported):
    gen = [*script("sessa-generate"), str(exported), "--prompt", "The"]
    one_line(run_cmd([*gen, "--max-new-tokens", "1000000000000"]), "GiB of decode state", "lower --max-new-tokens")
    one_line(run_cmd([*gen, "--temperature", "nan"]), "argument --temperature: 'nan': need a finite number")
    one_line(run_cmd([*gen, "--top-p", "0"]), "argument --top-p: 0.0 is not in (0, 1]")


def test_sigterm_to_rank_1_is_named_by_rank_0(shards, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", shards, tmp_path / "run")
    proc = subprocess.Popen(command(cfg, "schedule.train_steps=100000", "logging.eval_every_steps=0",
                                    "logging.dir=" + str(tmp_path / "run" / "tb"), nproc=2),
                            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    metrics = tmp_path / "run" / "tb" / "metrics.jsonl"
    deadline = time.time() + HANG_GUARD_S
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2) and time.time() < deadline:
        time.sleep(0.2)
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    ranks = {}
    for pid in children:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        rank = next((e.split(b"=")[1] for e in env if e.startswith(b"RANK=")), None)
        if rank is not None:
            ranks[int(rank)] = int(pid)
    os.kill(ranks[1], signal.SIGTERM)
    out, _ = proc.communicate(timeout=HANG_GUARD_S)
    assert proc.returncode == 0, out[-3000:]
    step = losses(tmp_path / "run")[-1][0]
    assert f"stopping at step {step} on SIGTERM received by rank 1: saving" in out


def test_export_of_a_root_without_latest_names_the_folders_to_pass(run, tmp_path):
    root = tmp_path / "ckpt"
    copy_checkpoint(run, root, 2)
    copy_checkpoint(run, root, 4)
    one_line(run_cmd([*script("sessa-export"), str(root), str(tmp_path / "out")]),
             f"{root} holds checkpoints but no 'latest' file", f"newest: {root / 'step_00000004'}")  # fmt: skip


def test_a_changed_schedule_on_resume_is_said(run, shards, tmp_path):
    folder = tmp_path / "run" / "ckpt"
    copy_checkpoint(run, folder, 2)
    (folder / "latest").write_text("step_00000002")
    cfg = write_config(tmp_path / "c.yaml", shards, tmp_path / "run")
    out = run_cmd(command(cfg, *STEPS, "optimizer.lr=1.0e-3", "schedule.train_steps=6", "--resume", "auto"))
    assert out.returncode == 0, out.stderr[-2000:]
    line = next(s for s in out.stdout.splitlines() if s.startswith("resuming with"))
    assert "optimizer.lr 0.003 -> 0.001" in line and "schedule.train_steps 4 -> 6" in line
    assert "the learning rate at step 2 goes from" in line and "ends at step 6" in line
