"""Hostile probes, round 4 (issue "Reliability round 4"): one test per bug found on the surfaces
added last. Each is named after what must hold; the number in its docstring is the bug's.

Data loss (1-4), code from data and secrets (5-8), silent wrong results (9-14), hangs, memory and
crashes (15-18), one line where one is promised (19-26), misleading messages (27-28).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sessa_train.data.cli import train_tokenizer_main, write_shards_main
from sessa_train.errors import DataError, SessaError
from tests.helpers import HANG_GUARD_S, script
from tests.servers import http_server
from tests.trainer import ENV, REPO, command, train, write_config

STEPS = ["schedule.train_steps=2", "checkpoint.every_steps=2", "logging.eval_every_steps=0"]


def cli_error(main, argv: list[str], capsys) -> str:
    """The one error line of a data command run in-process (exit status 2, no traceback)."""
    capsys.readouterr()
    try:
        code = main(argv)  # bad input the library finds: the status returned
    except SystemExit as done:  # bad arguments: argparse's exit
        code = done.code
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def one_line(out: subprocess.CompletedProcess, *phrases: str) -> str:
    """The one error line of a command that refused its input (exit status 2, no traceback)."""
    assert out.returncode == 2, (out.returncode, out.stdout[-1500:], out.stderr[-3000:])
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    errors = [line for line in out.stderr.strip().splitlines() if "error:" in line]
    assert len(errors) == 1, out.stderr[-3000:]
    for phrase in phrases:
        assert phrase in errors[0], errors[0]
    return errors[0]


def run_cmd(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    env = ENV | kw.pop("env", {})
    kw.setdefault("cwd", REPO)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=HANG_GUARD_S, **kw)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A small JSONL corpus in 4 files (40 pydoc topics)."""
    from pydoc_data.topics import topics

    folder = tmp_path_factory.mktemp("corpus") / "docs"
    folder.mkdir()
    names = sorted(topics)[:40]
    for i in range(4):
        rows = "".join(json.dumps({"text": topics[n][:1500]}) + "\n" for n in names[i * 10 : i * 10 + 10])
        (folder / f"part{i}.jsonl").write_text(rows)
    return folder


@pytest.fixture
def sleeper():
    """A live process of this host (its pid holds a lock as another job would)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield proc
    proc.kill()
    proc.wait()


def parts(corpus: Path, tok: Path, out: Path, capsys) -> None:
    for i in (1, 2):
        argv = ["--input", str(corpus), "--tokenizer", str(tok), "--out", str(out), "--seq-len", "31"]
        assert write_shards_main([*argv, "--part", f"{i}/2", "--no-progress", "--workers", "1"]) == 0
    capsys.readouterr()


# -- data loss -----------------------------------------------------------------------------------


def test_a_refused_merge_deletes_no_part(corpus, shards, tmp_path, capsys):
    """1: --merge refused because --out holds another file leaves every part as it was."""
    out = tmp_path / "out"
    parts(corpus, shards.parent / "tok.model", out, capsys)
    (out / "tokenizer.model").write_text("the user's file")
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    line = cli_error(write_shards_main, ["--out", str(out), "--merge"], capsys)
    assert f"--out {out} is not empty (it holds tokenizer.model)" in line
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
    (out / "tokenizer.model").unlink()
    assert write_shards_main(["--out", str(out), "--merge", "--no-progress"]) == 0
    assert (out / "index.json").is_file() and not (out / "parts").exists()


def test_a_lock_of_another_job_with_torchruns_default_run_id_is_not_taken_over(tmp_path, sleeper, monkeypatch):
    """2: every job launched with a fixed rendezvous has TORCHELASTIC_RUN_ID=none: that names no
    job, so a live holder on this host is another run, not a restart of this one."""
    from sessa_train.files import RunLock

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    lock = tmp_path / ".lock"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": sleeper.pid, "job": "none", "started": "now"}))
    refusal = RunLock(tmp_path).acquire()
    assert refusal is not None and f"pid {sleeper.pid}" in refusal and str(lock) in refusal
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-17")  # a real id of this same job: a restart
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": sleeper.pid, "job": "job-17", "started": "x"}))
    assert RunLock(tmp_path).acquire() is None


def test_a_second_writer_into_one_output_is_refused_and_touches_nothing(corpus, shards, tmp_path, sleeper, capsys):
    """3: one sessa-write-shards per --out: a second is refused in one line, leaving the first's
    .partial folder alone."""
    out = tmp_path / "out"
    partial = tmp_path / "out.partial"
    partial.mkdir()
    (partial / "train-000000.tar").write_bytes(b"the first writer's work")
    (tmp_path / "out.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": sleeper.pid, "job": ""}))
    argv = ["--input", str(corpus), "--tokenizer", str(shards.parent / "tok.model"), "--out", str(out)]
    line = cli_error(write_shards_main, [*argv, "--no-progress"], capsys)
    assert f"{out} is in use by another sessa-write-shards (pid {sleeper.pid}" in line
    assert (partial / "train-000000.tar").read_bytes() == b"the first writer's work" and not out.exists()


def test_exporting_again_keeps_the_files_the_export_did_not_write(zero2_run, tmp_path):
    """4: a README and evaluation results in an export folder survive a new export into it."""
    from sessa_train.export import export_checkpoint

    out = export_checkpoint(zero2_run / "ckpt", tmp_path / "export")
    (out / "README.md").write_text("# my model")
    (out / "lm_eval.json").write_text("{}")
    export_checkpoint(zero2_run / "ckpt", out, dtype="bfloat16")
    assert (out / "README.md").read_text() == "# my model" and (out / "lm_eval.json").read_text() == "{}"
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


# -- code from data, files outside where they belong, secrets -------------------------------------


def test_names_in_a_remote_index_never_leave_their_folder(shards, tmp_path, monkeypatch):
    """5 and 8: tokenizer_file '../../x.py' and shard names with '..' or an absolute path are
    refused; nothing is written or read outside the data folder and the tokenizer cache."""
    from sessa_train.data.shards import find_tokenizer, load_index

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    served = tmp_path / "served"
    shutil.copytree(shards, served / "shards")
    (served / "x.py").write_text("print('code')")
    index = json.loads((served / "shards" / "index.json").read_text())
    index["tokenizer_file"] = "../../../../x.py"
    index["tokenizer_sha256"] = __import__("hashlib").sha256(b"print('code')").hexdigest()
    (served / "shards" / "index.json").write_text(json.dumps(index))
    with (
        http_server(served) as (base, _),
        pytest.raises(DataError, match=r"tokenizer_file '\.\./\.\./\.\./\.\./x\.py'"),
    ):
        find_tokenizer(f"{base}/shards", index, None)
    assert not any((tmp_path / "home").rglob("*.py")) and not (tmp_path / "x.py").exists()
    for name in ("../served/shards/train-000000.tar", "/etc/passwd", "sub/train-000000.tar"):
        index = json.loads((shards / "index.json").read_text())
        index["splits"]["train"]["shards"][0]["name"] = name
        folder = tmp_path / f"bad{abs(hash(name))}"
        shutil.copytree(shards, folder)
        (folder / "index.json").write_text(json.dumps(index))
        with pytest.raises(DataError, match="is not a file name in"):
            load_index(folder)


def test_evaluation_runs_none_of_the_export_folders_code(exported, tmp_path):
    """6: sessa-eval on an export with a planted configuration_sessa.py: our classes evaluate it;
    the planted code never runs."""
    from tests.test_tools import write_tasks

    folder = tmp_path / "export"
    shutil.copytree(exported, folder)
    marker = tmp_path / "planted-code-ran"
    for name in ("configuration_sessa.py", "modeling_sessa.py", "tokenization_sessa.py"):
        plant = f"open({str(marker)!r}, 'w').write('ran')\n"
        (folder / name).write_text(plant + ((folder / name).read_text() if (folder / name).exists() else ""))
    tasks = write_tasks(tmp_path / "tasks", [{"question": "The", "choices": [" a", " b"], "label": 0}],
                        [{"prompt": "The", "answer": " x"}])  # fmt: skip
    out = run_cmd([sys.executable, "-m", "sessa_train.evaluation.harness", str(folder), "--tasks", str(tasks[0]),
                   "--batch-size", "2"], env={"HF_MODULES_CACHE": str(tmp_path / "modules")})  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert not marker.exists()
    assert "acc,none" in json.loads((folder / "lm_eval.json").read_text())["results"]["sessa_mc"]


def test_credentials_in_a_url_are_never_recorded_or_printed(tiny_shards_folder, tmp_path):
    """7: a data.path with user:password@ trains; the password is in no checkpoint file, metrics
    row or line printed, and an error about the URL shows it as ***."""
    with http_server(tiny_shards_folder.parent) as (base, _):
        url = base.replace("http://", "http://alice:s3cret@") + f"/{tiny_shards_folder.name}"
        cfg = write_config(tmp_path / "c.yaml", tiny_shards_folder, tmp_path / "run")
        out = train(cfg, f"data.path={url}", *STEPS)
        bad = run_cmd(command(cfg, f"data.path={url}/nothing", *STEPS, f"checkpoint.dir={tmp_path}/other"))
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert files and not any(b"s3cret" in p.read_bytes() for p in files)
    assert "s3cret" not in out.stdout + out.stderr
    line = one_line(bad, "http://***@127.0.0.1")
    assert "s3cret" not in bad.stdout + bad.stderr and "alice" not in line


@pytest.fixture(scope="module")
def tiny_shards_folder(shards) -> Path:
    return shards


# -- silent wrong results ------------------------------------------------------------------------


def test_a_tokenizer_numbering_its_ids_past_65535_gets_wide_shards(tmp_path, capsys):
    """9: a tokenizer.json with 4 tokens whose ids reach 65541: its shards hold the ids it emits."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    from sessa_train.data.shards import read_shard
    from sessa_train.data.storage import Storage
    from sessa_train.data.tokenizer import Tokenizer

    vocab = {"<|endoftext|>": 0, "[UNK]": 1, "the": 65541, "cat": 70000}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.add_special_tokens(["<|endoftext|>"])
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))
    assert Tokenizer(path).vocab_size == 70001
    text = tmp_path / "docs.jsonl"
    text.write_text("".join(json.dumps({"text": "the cat the"}) + "\n" for _ in range(20)))
    out = tmp_path / "shards"
    argv = ["--input", str(text), "--tokenizer", str(path), "--out", str(out), "--seq-len", "7", "--val-fraction", "0"]
    assert write_shards_main([*argv, "--no-progress", "--workers", "1"]) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["dtype"] == "uint32" and index["vocab_size"] == 70001
    entry = index["splits"]["train"]["shards"][0]
    samples = read_shard(Storage(out), entry, 8, "uint32", 70001)
    assert set(np.concatenate(samples).tolist()) == {0, 65541, 70000}


def test_a_merge_checks_every_part_against_its_files(corpus, shards, tmp_path, capsys):
    """10: a short stream, an odd size, a wrong dtype or a malformed part.json: one line each,
    nothing merged."""
    clean = tmp_path / "clean"
    parts(corpus, shards.parent / "tok.model", clean, capsys)
    part = "parts/part-2-of-2"

    def broken(name: str, damage) -> str:
        out = tmp_path / name
        shutil.copytree(clean, out)
        damage(out / part)
        line = cli_error(write_shards_main, ["--out", str(out), "--merge", "--no-progress"], capsys)
        assert not (out / "index.json").exists() and (out / part / "part.json").exists()
        return line

    def shorten(folder: Path) -> None:
        data = (folder / "train.tokens").read_bytes()
        (folder / "train.tokens").write_bytes(data[:-200])

    def odd(folder: Path) -> None:
        with open(folder / "train.tokens", "ab") as fh:
            fh.write(b"\0")

    def rewrite(change):
        def apply(folder: Path) -> None:
            record = json.loads((folder / "part.json").read_text())
            (folder / "part.json").write_text(json.dumps(change(record)))

        return apply

    assert "the part is incomplete or damaged" in broken("short", shorten)
    assert "the part is incomplete or damaged" in broken("odd", odd)
    assert "dtype 'float64' is not uint16 or uint32" in broken("dtype", rewrite(lambda r: r | {"dtype": "float64"}))
    assert "not a part record" in broken("list", rewrite(lambda r: [r]))
    assert "must be counts" in broken(
        "counts", rewrite(lambda r: r | {"splits": r["splits"] | {"val": {"tokens": 1.5}}})
    )
    flipped = broken(
        "flip", lambda f: (f / "train.tokens").write_bytes(bytes(reversed((f / "train.tokens").read_bytes())))
    )
    assert "checksum differs from part.json's" in flipped


def test_init_from_an_export_of_another_tokenizer_is_refused(exported, corpus, tmp_path, capsys):
    """11: checkpoint.init_from an export whose tokenizer is not the one this run's data was
    written with stops in one line naming both."""
    from pydoc_data.topics import topics

    other = tmp_path / "other.jsonl"  # other text: another tokenizer of the same size
    other.write_text("".join(json.dumps({"text": topics[n][:1500]}) + "\n" for n in sorted(topics)[40:80]))
    tok = tmp_path / "other.model"
    assert train_tokenizer_main(["--input", str(other), "--model", str(tok), "--vocab-size", "400"]) == 0
    out = tmp_path / "shards"
    argv = ["--input", str(other), "--tokenizer", str(tok), "--out", str(out), "--seq-len", "31"]
    assert write_shards_main([*argv, "--no-progress", "--workers", "1"]) == 0
    cfg = write_config(tmp_path / "c.yaml", out, tmp_path / "run", n_heads=2, feedback_heads=2)
    line = one_line(run_cmd(command(cfg, *STEPS, f"checkpoint.init_from={exported}")), "was trained with tokenizer")
    assert "its token ids would mean other tokens" in line


@pytest.mark.parametrize(("eos", "message"), [(None, "has eos_id null"), ("2", "eos_id must be null or an id"),
                                              (10**6, "eos_id must be null or an id below vocab_size")])  # fmt: skip
def test_document_masking_needs_a_real_eos(shards, tmp_path, eos, message):
    """12: index.json's eos_id null, not an integer or outside the vocabulary: refused (with
    document masking, or always where it is no id) instead of masking nothing."""
    from sessa_train.data import PackedTokenLoader

    folder = tmp_path / "shards"
    shutil.copytree(shards, folder)
    index = json.loads((folder / "index.json").read_text()) | {"eos_id": eos}
    (folder / "index.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match=message):
        PackedTokenLoader(folder, micro_batch_size=2, document_masking=True)


def test_evaluating_a_copied_checkpoint_writes_beside_the_copy_only(zero2_run, tmp_path):
    """13: sessa-eval on a copy of a checkpoint writes its results beside the copy and appends
    nothing to the metrics of the run it came from."""
    from sessa_train.evaluation.harness import results_path

    copy = tmp_path / "copied"
    shutil.copytree(zero2_run / "ckpt" / "step_00000008", copy / "step_00000008")
    out, run = results_path(copy / "step_00000008")
    assert out == copy / "lm_eval" / "step_00000008.json" and run is None
    out, run = results_path(zero2_run / "ckpt")
    assert run == zero2_run / "tb" and out == zero2_run / "tb" / "lm_eval" / "step_00000008.json"


def test_an_impossible_device_and_a_negative_peak_are_refused(exported, shards, tmp_path):
    """14: sessa-eval --device bogus (or cuda on a machine without) and logging.peak_tflops=-5."""
    from sessa_train.config import ConfigError, load_config

    for device, phrase in (("bogus", "--device bogus: not a device"), ("cuda:0", "--device cuda:0: this machine")):
        if device.startswith("cuda") and torch.cuda.is_available():
            continue
        out = run_cmd([sys.executable, "-m", "sessa_train.evaluation.harness", str(exported), "--tasks", "x.yaml",
                       "--device", device])  # fmt: skip
        one_line(out, phrase)
    cfg = write_config(tmp_path / "c.yaml", shards, tmp_path / "run")
    with pytest.raises(ConfigError, match=r"logging.peak_tflops must be a peak in TFLOP/s \(> 0\) or 0"):
        load_config([cfg], ["logging.peak_tflops=-5"])


# -- hangs, memory, crashes ----------------------------------------------------------------------


def test_a_server_that_never_answers_costs_bounded_time(tmp_path, monkeypatch):
    """15: a server that accepts and sends nothing: each attempt ends after READ_S, then the
    bounded retries, then one line naming the URL."""
    from sessa_train.data import storage

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                held.append(listener.accept()[0])  # accepted, never answered

    threading.Thread(target=accept, daemon=True).start()
    monkeypatch.setattr(storage, "READ_S", 0.5)
    monkeypatch.setattr(storage, "RETRIES", 2)
    monkeypatch.setattr(storage, "BACKOFF_S", 0.01)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/shards"
    try:
        start = time.monotonic()
        with pytest.raises(DataError, match=rf"^{url}/index.json cannot be read \(.*\) after 2 retries$"):
            storage.Storage(url).read("index.json")
        assert time.monotonic() - start < 60  # a hang guard: three 0.5 s attempts, not the library's minutes
    finally:
        stop.set()
        for conn in held:
            conn.close()
        listener.close()


MAKE_BOMB = """
import gzip, sys, zstandard
from pathlib import Path
path = Path(sys.argv[1])
line = b'{"text": "' + b"a" * (100 << 20) + b'"}\\n'
path.write_bytes(gzip.compress(line, 9) if path.suffix == ".gz" else zstandard.ZstdCompressor(level=19).compress(line))
"""
READ_BOMB = """
import json, sys
sys.path.insert(0, {repo!r})
from sessa_train.data.documents import read_documents
from sessa_train.errors import DataError
try:
    list(read_documents(sys.argv[1]))
except DataError as e:
    # VmHWM is this process's own peak: ru_maxrss is carried across exec from the forking parent.
    hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(json.dumps({{"error": str(e), "rss_mib": int(hwm.split()[1]) >> 10}}))
"""


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.zst"])
def test_one_huge_compressed_line_is_refused_in_bounded_memory(tmp_path, suffix):
    """16: a small compressed file holding one 100 MB line: refused at the 64 MiB limit, the
    reader's peak memory bounded (the line limit plus buffers, whatever the ratio), in linear
    time (the hang guard: the earlier reader took minutes)."""
    path = tmp_path / f"bomb{suffix}"
    subprocess.run([sys.executable, "-c", MAKE_BOMB, str(path)], check=True, timeout=120)
    assert path.stat().st_size < 1 << 20
    out = subprocess.run([sys.executable, "-c", READ_BOMB.format(repo=str(REPO)), str(path)], capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    got = json.loads(out.stdout.strip().splitlines()[-1])
    expected = f"{path}: line 1 is longer than 64 MiB; JSONL holds one document per line, each shorter than that"
    assert got["error"] == expected and got["rss_mib"] < 500, got


def test_profile_steps_past_the_end_are_refused_and_a_stop_inside_them_writes_the_trace(shards, tmp_path):
    """17: logging.profile_steps past train_steps is refused in one line; a run stopped inside
    the profiled steps writes their trace and ends cleanly."""
    from sessa_train.config import ConfigError, load_config

    cfg = write_config(tmp_path / "c.yaml", shards, tmp_path / "run")
    for steps in ("[5,6]", "[2,10]"):
        with pytest.raises(ConfigError, match=r"logging.profile_steps=\[\d+, \d+\] ends after schedule.train_steps=3"):
            load_config([cfg], ["schedule.train_steps=3", f"logging.profile_steps={steps}"])
    out = train(cfg, "schedule.train_steps=6", "logging.profile_steps=[2,5]", "schedule.stop_after_steps=3",
                "logging.eval_every_steps=0")  # fmt: skip
    assert out.returncode == 0 and list((tmp_path / "run" / "tb" / "profile").glob("*.pt.trace.json"))


def test_torchruns_grace_before_sigkill_is_sized_to_the_last_save(tmp_path):
    """18: sessa-launch torchrun gives the ranks the time the 1.3b preset's checkpoint takes to
    write (its parameters x 12 bytes over the nodes at --save-gbps, twice, plus a minute), not
    torchrun's 30 s, and says when Slurm's warning must come earlier."""
    from sessa_train.config import load_config
    from tests.test_model import expected_parameter_count

    hosts = tmp_path / "hosts"
    hosts.write_text("a slots=8\nb slots=8\n")
    cmd = [sys.executable, "-m", "sessa_train.launch", "torchrun", "--hostfile", str(hosts), "--dry-run",
           "--save-gbps", "0.1", "--", "--config", "configs/1.3b.yaml"]  # fmt: skip
    out = run_cmd(cmd)
    assert out.returncode == 0, out.stderr
    params = expected_parameter_count(load_config([REPO / "configs" / "1.3b.yaml"]).model)
    grace = int(2 * params * 12 / 2 / 0.1e9 + 60 + 0.999)
    assert f"TORCH_ELASTIC_SHUTDOWN_TIMEOUT={grace} " in out.stdout
    assert f"#SBATCH --signal=B:USR1@{grace}" in out.stdout and grace > 120


# -- one line where one is promised ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda i: i.update(seq_len="256"), "seq_len must be a positive integer, got '256'"),
        (lambda i: i.update(vocab_size=None), "vocab_size must be a positive integer, got None"),
        (lambda i: i["splits"]["train"].update(samples=1.5), "split 'train' samples must be a count, got 1.5"),
        (lambda i: i["splits"]["train"]["shards"][0].pop("name"), "has a shard entry without a name"),
        (lambda i: i["splits"]["train"]["shards"][0].update(tokens="x"), "tokens must be a count, got 'x'"),
    ],
)
def test_an_index_with_wrong_types_is_one_line(shards, tmp_path, change, message):
    """19: index.json values of the wrong type."""
    from sessa_train.data import load_index

    folder = tmp_path / "shards"
    shutil.copytree(shards, folder)
    index = json.loads((folder / "index.json").read_text())
    change(index)
    (folder / "index.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_index(folder)


@pytest.mark.parametrize(("values", "kind"), [([1, 2], "int64"), ([["a"], ["b"]], "list<"), ([b"a", b"b"], "binary")])
def test_a_parquet_text_column_that_is_not_text_is_one_line(shards, tmp_path, capsys, values, kind):
    """20: sessa-write-shards and sessa-train-tokenizer on an int, list or binary column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": values}), path)
    expected = f"{path}: column 'text' holds {kind}"
    argv = ["--input", str(path), "--tokenizer", str(shards.parent / "tok.model"), "--out", str(tmp_path / "o")]
    line = cli_error(write_shards_main, [*argv, "--no-progress", "--workers", "1"], capsys)
    assert expected in line and "not text (string)" in line
    assert expected in cli_error(
        train_tokenizer_main, ["--input", str(path), "--model", str(tmp_path / "t.model")], capsys
    )


def test_a_damaged_datasets_folder_is_one_line(tmp_path, capsys):
    """21: a truncated .arrow file, a state.json that is not JSON."""
    import datasets

    for damage in ("truncated", "state"):
        folder = tmp_path / damage
        datasets.Dataset.from_dict({"text": [f"document {i} " * 50 for i in range(200)]}).save_to_disk(str(folder))
        if damage == "truncated":
            arrow = next(folder.glob("*.arrow"))
            arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 3])
        else:
            (folder / "state.json").write_text("{not json")
        line = cli_error(train_tokenizer_main, ["--input", str(folder), "--model", str(tmp_path / "t.model")], capsys)
        assert str(folder) in line and ("not a readable datasets folder" in line or "cannot be read" in line), line


def test_unsupported_url_schemes_are_one_line_and_file_urls_work(shards, tmp_path, capsys):
    """22: ftp://, zip:// and unknown schemes named with what is valid; file:// is a local path."""
    from sessa_train.data import PackedTokenLoader, load_index

    for url in ("ftp://host/shards", "zip://nothing.zip", "gopher://x/y"):
        with pytest.raises(DataError, match=rf"data.path={url}: the \w+:// scheme is not supported; valid: "):
            load_index(url)
        line = cli_error(write_shards_main, ["--input", url, "--tokenizer", str(shards.parent / "tok.model"),
                                             "--out", str(tmp_path / "o"), "--no-progress"], capsys)  # fmt: skip
        assert f"--input={url}: the" in line and "scheme is not supported" in line
    loader = PackedTokenLoader(f"file://{shards}", micro_batch_size=2, max_epochs=1)
    assert loader.index == load_index(shards)


def test_logging_outputs_that_cannot_start_stop_the_run_before_the_model_is_built(shards, tmp_path):
    """23: wandb online without an API key, and a wandb folder that cannot be made: one line,
    before the model is built (no "sessa LM" line)."""
    cfg = write_config(tmp_path / "c.yaml", shards, tmp_path / "run")
    env = {"HOME": str(tmp_path / "home"), "WANDB_API_KEY": "", "NETRC": str(tmp_path / "none")}
    out = run_cmd(command(cfg, *STEPS, "logging.wandb.project=p", "logging.wandb.mode=online"), env=env)
    one_line(out, "logging.wandb.project=p with mode online needs a wandb API key")
    assert "sessa LM" not in out.stdout
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "wandb").write_text("a file where wandb's folder goes")
    out = run_cmd(command(cfg, *STEPS, f"logging.dir={tmp_path / 'logs'}", "logging.wandb.project=p",
                          "logging.wandb.mode=offline", f"checkpoint.dir={tmp_path}/run2"))  # fmt: skip
    one_line(out, f"logging.dir={tmp_path / 'logs'} cannot be used as a folder")


def test_evaluation_of_bad_input_is_one_line_before_anything_runs(exported, zero2_run, tmp_path):
    """24: a truncated export, a results file that cannot be written (checked before the
    evaluation runs), a checkpoint whose config has no logging section."""
    from sessa_train.evaluation.harness import evaluate, results_path

    bad = tmp_path / "truncated"
    shutil.copytree(exported, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SessaError, match="truncated or not safetensors"):
        evaluate(bad, [])
    blocked = tmp_path / "blocked"
    shutil.copytree(exported, blocked)
    (blocked / "lm_eval.json").mkdir()
    with pytest.raises(SessaError, match=f"cannot write the results to {blocked / 'lm_eval.json'}: a folder"):
        evaluate(blocked, ["no-such-task"])  # refused before lm-eval looks for the task
    copy = tmp_path / "nolog" / "step_00000008"
    shutil.copytree(zero2_run / "ckpt" / "step_00000008", copy)
    config = json.loads((copy / "config.json").read_text())
    config.pop("logging")
    (copy / "config.json").write_text(json.dumps(config))
    assert results_path(copy) == (copy.parent / "lm_eval" / "step_00000008.json", None)


def test_tokenizer_and_model_vocabularies_that_disagree_are_named(exported, shards, tmp_path):
    """25: sessa-generate and sessa-export with a tokenizer larger than the model's vocabulary;
    a model vocabulary padded past the tokenizer's never generates an id it cannot decode."""
    from sessa_train.export import load_pretrained
    from sessa_train.generate import generate

    big = tmp_path / "big"
    shutil.copytree(exported, big)
    config = json.loads((big / "config.json").read_text())
    small = tmp_path / "small"
    shutil.copytree(exported, small)
    model = load_pretrained(exported)
    with torch.no_grad():  # a model of 350 ids where the tokenizer has 400
        cut = {k: v[:350] if k in ("embed.weight", "lm_head.weight") else v for k, v in model.state_dict().items()}
    from safetensors.torch import save_file

    if config["model"].get("tie_embeddings", True):
        cut.pop("lm_head.weight", None)
    save_file(cut, str(small / "model.safetensors"), metadata={"format": "pt"})
    (small / "config.json").write_text(json.dumps(config | {"model": config["model"] | {"vocab_size": 350}}))
    out = run_cmd([*script("sessa-generate"), str(small), "--prompt", "The"])
    one_line(out, "its tokenizer has 400 ids, its model only 350")
    ids = torch.tensor([[5, 6, 7]])
    got = torch.cat(
        list(generate(model, ids, 30, temperature=5.0, vocab=200, generator=torch.Generator().manual_seed(0)))
    )
    assert int(got.max()) < 200


def test_export_generate_and_model_arguments_that_cannot_work_are_one_line(zero2_run, exported, tmp_path):
    """26: sessa-export into a file or into '.', a tokenizer_config.json that is a list,
    sessa-generate --seed 2**70, SessaLM with an id past its vocabulary."""
    from sessa_train import SessaLM
    from sessa_train.config import ModelConfig

    afile = tmp_path / "afile"
    afile.write_text("")
    export = [*script("sessa-export"), str(zero2_run / "ckpt")]
    one_line(run_cmd([*export, str(afile)]), f"{afile} is a file, not a folder")
    here = tmp_path / "here"
    here.mkdir()
    (here / "notes.txt").write_text("mine")
    one_line(run_cmd([*export, "."], cwd=here), f"{here} is not empty and holds no export")
    gen = [*script("sessa-generate"), str(exported), "--prompt", "The"]
    one_line(run_cmd([*gen, "--seed", str(2**70)]), f"argument --seed: {2**70} is not in 0 .. 2**63 - 1")
    with pytest.raises(ValueError, match=r"^token id 64 is outside the vocabulary of 64 \(0 \.\. 63\)$"):
        SessaLM(ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2))(torch.tensor([[1, 64]]))
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    from sessa_train.data.tokenizer import Tokenizer

    folder = tmp_path / "tok"
    folder.mkdir()
    HFTokenizer(models.WordLevel({"<|endoftext|>": 0, "[UNK]": 1}, unk_token="[UNK]")).save(
        str(folder / "tokenizer.json")
    )
    (folder / "tokenizer_config.json").write_text("[1, 2]")  # not an object: ignored, the usual EOS names used
    assert Tokenizer(folder / "tokenizer.json").eos_id == 0


# -- misleading messages -------------------------------------------------------------------------


def test_an_empty_lock_file_left_by_a_crash_is_taken_over(tmp_path, monkeypatch):
    """27: an empty .lock (a crash between its creation and its first write) is not "in use by
    pid None": once it is a few seconds old it is stale."""
    from sessa_train.files import RunLock

    lock = tmp_path / ".lock"
    lock.write_text("")
    old = time.time() - 60
    os.utime(lock, (old, old))
    held = RunLock(tmp_path)
    assert held.acquire() is None and json.loads(lock.read_text())["pid"] == os.getpid()
    held.release()


def test_an_input_url_answering_500_is_not_called_missing(tmp_path, capsys, shards):
    """28: an --input URL whose server answers 5xx is named with the server's status, not as
    "input not found"; a 404 still is not found."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "docs.jsonl").write_text('{"text": "hello"}\n')
    tok = str(shards.parent / "tok.model")
    with http_server(tmp_path / "site", fail_every=1) as (base, _):
        line = cli_error(write_shards_main, ["--input", f"{base}/docs.jsonl", "--tokenizer", tok, "--out",
                                             str(tmp_path / "o"), "--no-progress"], capsys)  # fmt: skip
        assert "input not found" not in line and f"{base}/docs.jsonl cannot be read" in line, line
    with http_server(tmp_path / "site") as (base, _):
        line = cli_error(write_shards_main, ["--input", f"{base}/missing.jsonl", "--tokenizer", tok, "--out",
                                             str(tmp_path / "o"), "--no-progress"], capsys)  # fmt: skip
        assert line.endswith(f"input not found: {base}/missing.jsonl"), line
