"""What a new user tripped over (issue "What a new user still trips over"): one test per item.
Items 1 (generate(use_cache=False)) and 8 (several prompts) are in tests/test_export.py, item 2
(a store that goes away) in tests/test_probes.py's remote-read tests and here."""

from __future__ import annotations

import hashlib
import shutil

from sessa_train.data.cli import write_shards_main
from tests.servers import http_server


def test_the_tokenizer_travels_with_the_shards(shards, tmp_path, monkeypatch, capsys):
    """5: sessa-write-shards puts the tokenizer beside the shards; a run given only the shard
    folder's URL (no data.tokenizer) finds it there, checksum and all."""
    from sessa_train.data.shards import find_tokenizer, load_index

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join('{"text": "%s"}\n' % ("word " * (50 + i)) for i in range(30)))
    tok = shards.parent / "tok.model"
    out = tmp_path / "elsewhere" / "shards"
    argv = ["--input", str(docs), "--tokenizer", str(tok), "--out", str(out), "--seq-len", "15", "--no-progress"]
    assert write_shards_main([*argv, "--workers", "1"]) == 0
    assert (out / "tok.model").read_bytes() == tok.read_bytes()
    site = tmp_path / "site"
    shutil.copytree(out, site / "shards")  # the shard folder alone, as uploaded
    with http_server(site) as (base, _):
        found = find_tokenizer(f"{base}/shards", load_index(f"{base}/shards"), None)
    assert hashlib.sha256(found.read_bytes()).hexdigest() == hashlib.sha256(tok.read_bytes()).hexdigest()
    capsys.readouterr()


def test_the_paper_row_command_runs_from_any_folder(tmp_path):
    """6: the rows file and the configs it names are found from the package, not the working
    directory; a rows file that does not exist is named as missing, not as a format error."""
    import subprocess

    from tests.helpers import script
    from tests.trainer import ENV, REPO

    cmd = [*script("sessa-paper-row"), "tiny", "sessa", "--print-train"]
    out = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"--config {REPO / 'configs' / 'paper' / 'tiny.yaml'}" in out.stdout
    out = subprocess.run([*cmd, "--rows", "nowhere.yaml"], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    missing = "sessa-paper-row: error: nowhere.yaml: no such file (the paper's rows; pass --rows FILE)"
    assert out.returncode == 2 and out.stderr.strip() == missing


def test_evaluation_runs_offline_on_the_shipped_task_and_an_unreachable_hub_is_one_line(
    exported, default_data, tmp_path
):
    """4: the local cloze task sessa-prepare-default-data writes runs with no network, from a
    folder that is not a git checkout, with nothing of git printed; a Hub task with the hub out of
    reach is one line naming the task and the offline ways, within seconds."""
    import json
    import subprocess
    import sys

    from tests.trainer import ENV

    task = default_data / "eval" / "default_cloze.yaml"
    rows = [json.loads(line) for line in (default_data / "eval" / "default_cloze.jsonl").read_text().splitlines()]
    assert len(rows) == 200 and all(len(r["context"].split()) >= 7 and r["target"].isalpha() for r in rows)
    folder = tmp_path / "export"
    shutil.copytree(exported, folder)
    cmd = [sys.executable, "-m", "sessa_train.evaluation.harness", str(folder)]
    env = ENV | {"HF_ENDPOINT": "http://127.0.0.1:1", "HF_HUB_OFFLINE": "", "HF_DATASETS_OFFLINE": ""}
    out = subprocess.run([*cmd, "--tasks", str(task), "--limit", "8"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "fatal: not a git repository" not in out.stderr
    results = json.loads((folder / "lm_eval.json").read_text())["results"]["default_cloze"]
    assert 0 <= results["acc,none"] <= 1 and results["perplexity,none"] > 1
    out = subprocess.run([*cmd, "--tasks", "lambada_openai"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    line = out.stderr.strip()
    assert line.startswith("sessa-eval: error: task lambada_openai needs its dataset from the Hugging Face Hub")
    assert "default_cloze.yaml" in line and "HF_DATASETS_OFFLINE=1" in line and "\n" not in line


def test_a_bad_config_is_refused_before_torch_is_imported(tmp_path):
    """9: sessa-train checks its arguments and config before importing torch or DeepSpeed."""
    import subprocess
    import sys

    from tests.trainer import ENV, REPO

    code = (
        "import sys; from sessa_train.train import main\n"
        "code = main(['--config', 'configs/tiny.yaml', 'model.d_modle=3'])\n"
        "print(code, 'torch' in sys.modules, 'deepspeed' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["2", "False", "False"], out.stderr
    assert out.stderr.startswith("sessa-train: error: config key model.d_modle")


def test_a_data_error_that_ends_a_run_saves_the_last_step_first(shards, tmp_path):
    """2: shards damaged while a run reads them (2 samples per shard, so new ones are read every
    few steps): the run ends with exit status 2 and one line naming the shard and the step it
    saved, after a checkpoint of its last completed step, as a SIGTERM would; with the shards
    repaired, --resume auto goes on to the uninterrupted run's losses."""
    import subprocess
    import time
    from pydoc_data.topics import topics

    from sessa_train.data import write_shards
    from tests.helpers import HANG_GUARD_S
    from tests.trainer import ENV, REPO, command, losses, train, write_config

    docs = [topics[name][:1500] for name in sorted(topics)][:40]
    write_shards(docs, shards.parent / "tok.model", tmp_path / "small", seq_len=31, samples_per_shard=2,
                 val_fraction=0.0)  # fmt: skip
    steps = ["schedule.train_steps=120", "checkpoint.every_steps=1000", "logging.eval_every_steps=0"]
    reference = tmp_path / "reference"
    train(write_config(tmp_path / "r.yaml", tmp_path / "small", reference), *steps)
    originals = {p: p.read_bytes() for p in (tmp_path / "small").glob("train-*.tar")}
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "small", run)
    proc = subprocess.Popen(command(cfg, *steps), cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    metrics, deadline = run / "tb" / "metrics.jsonl", time.monotonic() + HANG_GUARD_S
    while not (metrics.is_file() and metrics.read_text().count("train/loss") >= 3) and time.monotonic() < deadline:
        time.sleep(0.005)
    for path, data in originals.items():  # every shard's bytes changed (its checksum no longer matches)
        path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    stdout, stderr = proc.communicate(timeout=HANG_GUARD_S)
    errors = [line for line in stderr.splitlines() if line.startswith("sessa-train: error:")]
    done = len(losses(run))
    assert proc.returncode == 2 and len(errors) == 1, stderr[-3000:]
    assert "train-" in errors[0] and errors[0].endswith(f"(the run stopped at step {done}, saved in {run / 'ckpt'})")
    assert 3 <= done < 120 and f"stopping at step {done} on a data error: saving" in stdout
    assert (run / "ckpt" / "latest").read_text().strip() == f"step_{done:08d}"
    for path, data in originals.items():
        path.write_bytes(data)
    train(cfg, *steps, "--resume", "auto")
    assert losses(run) == losses(reference)
