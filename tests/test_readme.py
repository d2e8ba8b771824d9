"""The README's commands, as a user would type them after the main job, in a scratch checkout:
each runs (trainer commands stopped after a step or two) or is named here with the reason it
cannot run on this machine. A new README command must be added to one of the two lists."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from tests.helpers import HANG_GUARD_S
from tests.trainer import ENV, REPO

pytestmark = pytest.mark.slow

# commands that cannot run here, by a prefix of their text
NOT_HERE = {
    "bash tools/bootstrap.sh && .venv/bin/python -m pytest": "the test suite itself",
    "bash tools/lock.sh": "refreshes the lock in a throwaway environment (tests/test_lock.py checks the lock)",
    ".venv/bin/sessa-train-tokenizer --kind hf-bpe --input docs.parquet": "a user's corpus (tests/test_corpora.py)",
    ".venv/bin/sessa-write-shards --input docs.parquet": "a user's corpus (tests/test_corpora.py)",
    ".venv/bin/sessa-write-shards ... --part 2/4": "a user's corpus (tests/test_corpora.py)",
}
# multi-process launches: their config and layout are checked as the trainer checks them (its
# own refusals), not run; the same layouts train in tests/test_train.py and test_model_parallel.py
CHECKED_ONLY = ("torchrun ",)


def readme_commands() -> list[str]:
    """The shell commands of the README's indented blocks, continuation lines joined, comments cut."""
    lines, commands, current = (REPO / "README.md").read_text().splitlines(), [], ""
    for line in lines:
        if not line.startswith("    ") or (line.startswith("     ") and not current):
            continue
        text = current + line.strip()
        if text.endswith("\\"):
            current = text[:-1].rstrip() + " "
            continue
        current = ""
        if re.match(r"(\.venv/bin/|bash |torchrun |python tools/)", text):
            commands.append(re.sub(r"\s+#.*$", "", text))
    return commands


def stopped(command: str) -> str:
    """A trainer command cut to a step or two, with everything else as written."""
    if "sessa-train " in command or "sessa_train.train" in command:
        return command + " schedule.stop_after_steps=2 logging.eval_every_steps=0"
    return command


def test_every_readme_command_runs_as_written(tmp_path, default_data):
    commands = readme_commands()
    assert len(commands) >= 10, commands
    scratch = tmp_path / "checkout"
    (scratch / "data").mkdir(parents=True)
    for name in ("configs", "tools", "sessa_train"):
        (scratch / name).symlink_to(REPO / name)
    (scratch / "data" / "default").symlink_to(default_data)  # prepared once for the suite
    env = ENV | {"PATH": f"{REPO / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    ran, checked = [], []
    for command in commands:
        if any(command.startswith(prefix) for prefix in NOT_HERE):
            continue
        command = command.replace("bash tools/bootstrap.sh && ", "")  # set-up is the test suite's own
        # the venv by its own path: through a link its prefix (and so the path of every header in
        # DeepSpeed's comm-op build) would differ, and the next run would rebuild the op
        command = command.replace(".venv/bin/", f"{REPO / '.venv' / 'bin'}/")
        if command.startswith(CHECKED_ONLY):
            checked.append(command)
            continue
        out = subprocess.run(stopped(command), shell=True, cwd=scratch, env=env, capture_output=True, text=True,
                             timeout=HANG_GUARD_S)  # fmt: skip
        assert out.returncode == 0, f"{command}\n{out.stdout[-1500:]}{out.stderr[-1500:]}"
        ran.append(command)
    check = [sys.executable, "-c", CHECK, *(json.dumps(shlex.split(c)) for c in checked)]  # one process for all
    out = subprocess.run(check, cwd=scratch, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert out.returncode == 0 and out.stdout.split() == ["ok"] * len(checked), f"{checked}\n{out.stdout}{out.stderr}"
    assert len(ran) + len(checked) + sum(any(c.startswith(p) for p in NOT_HERE) for c in commands) == len(commands)
    assert checked, "the README's torchrun lines are gone from the check"
    assert (scratch / "runs" / "tiny" / "export" / "model.safetensors").is_file()


# the layout check of torchrun command lines (each argument: one line's words as JSON): its
# config, overrides and world size; "ok" for each
CHECK = """
import json, sys
from sessa_train import train
from sessa_train.parallel.plan import check_layout
for line in sys.argv[1:]:
    argv = json.loads(line)
    world = int(argv[argv.index("--nproc-per-node") + 1])
    trainer = argv[argv.index("sessa_train.train") + 1:]
    check_layout(train.config_of(train.parse_args(trainer)), world)
    print("ok", flush=True)
"""
