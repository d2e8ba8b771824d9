"""Real corpora in: every input format gives the same shards, parts of a corpus merge into one
set, damaged inputs are named in one line, reading is bounded in memory, a Hugging Face
tokenizer works end to end, and shards stream from a real S3-compatible server (moto) and an
HTTP server on 127.0.0.1 with exactly the losses of a local run."""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sessa_train.data import PackedTokenLoader, train_tokenizer
from sessa_train.data.cli import train_tokenizer_main, write_shards_main
from sessa_train.errors import DataError
from tests.helpers import HANG_GUARD_S
from tests.servers import S3_ENV, http_server, s3_server, upload
from tests.trainer import ENV, REPO, losses, train, write_config


def documents() -> list[str]:
    """60 documents: reference-manual text, non-ASCII text, an empty one, newlines inside."""
    from pydoc_data.topics import topics

    docs = [topics[name][:1200] for name in sorted(topics)][:56]
    docs += ["naïve café — 日本語のテキスト\n\nzweite Zeile ✓", "", "tabs\tand\r\nCRLF lines\r\n", "emoji 🚀🐍 end"]
    return docs


def write_jsonl(path: Path, docs: list[str]) -> Path:
    lines = "".join(json.dumps({"id": i, "text": d}, ensure_ascii=False) + "\n" for i, d in enumerate(docs))
    data = lines.encode("utf-8")
    if path.name.endswith(".gz"):
        data = gzip.compress(data)
    elif path.name.endswith(".zst"):
        import zstandard

        data = zstandard.ZstdCompressor(level=3).compress(data)
    path.write_bytes(data)
    return path


def write_parquet(path: Path, docs: list[str], row_group_size: int = 7) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), path, row_group_size=row_group_size)
    return path


def write_txt(folder: Path, docs: list[str]) -> Path:
    folder.mkdir(parents=True)
    for i, d in enumerate(docs):
        (folder / f"doc-{i:04d}.txt").write_bytes(d.encode("utf-8"))
    return folder


def write_dataset(folder: Path, docs: list[str]) -> Path:
    import datasets

    datasets.Dataset.from_dict({"id": list(range(len(docs))), "text": docs}).save_to_disk(str(folder))
    return folder


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    return train_tokenizer(documents(), tmp_path_factory.mktemp("tok") / "tok.model", vocab_size=500)


SHARD_ARGS = ["--seq-len", "31", "--samples-per-shard", "8", "--val-fraction", "0.1", "--workers", "1"]


def shards_of(inputs: list[Path], tokenizer: Path, out: Path, *extra: str) -> dict[str, bytes]:
    argv = ["--input", *map(str, inputs), "--tokenizer", str(tokenizer), "--out", str(out), *SHARD_ARGS]
    assert write_shards_main([*argv, "--no-progress", *extra]) == 0
    return files_of(out)


@pytest.fixture(scope="module")
def reference_shards(tokenizer, tmp_path_factory) -> dict[str, bytes]:
    root = tmp_path_factory.mktemp("reference")
    return shards_of([write_jsonl(root / "docs.jsonl", documents())], tokenizer, root / "out")


FORMATS = {
    "txt files": lambda root, docs: [write_txt(root / "txt", docs)],
    "jsonl.gz": lambda root, docs: [write_jsonl(root / "docs.jsonl.gz", docs)],
    "jsonl.zst": lambda root, docs: [write_jsonl(root / "docs.jsonl.zst", docs)],
    "parquet": lambda root, docs: [write_parquet(root / "docs.parquet", docs)],
    "datasets folder": lambda root, docs: [write_dataset(root / "ds", docs)],
    "parquet + jsonl.zst + datasets folder": lambda root, docs: [
        write_parquet(root / "a.parquet", docs[:20]),
        write_jsonl(root / "b.jsonl.zst", docs[20:40]),
        write_dataset(root / "c", docs[40:]),
    ],
}


@pytest.mark.parametrize("kind", list(FORMATS))
def test_the_same_documents_in_any_format_give_byte_identical_shards(kind, tokenizer, reference_shards, tmp_path):
    inputs = FORMATS[kind](tmp_path, documents())
    got = shards_of(inputs, tokenizer, tmp_path / "out")
    assert got.keys() == reference_shards.keys()
    assert [name for name in got if got[name] != reference_shards[name]] == []


def test_inputs_in_s3_give_the_local_shards(tokenizer, reference_shards, tmp_path):
    """A prefix of parquet and jsonl.zst objects (listed in order) and a single object's URL."""
    docs = documents()
    folder = tmp_path / "objects"
    folder.mkdir()
    write_parquet(folder / "a.parquet", docs[:30])
    write_jsonl(folder / "b.jsonl.zst", docs[30:])
    with s3_server() as (endpoint, client), pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ENDPOINT_URL", endpoint)
        url = upload(client, folder, "corpus", "fineweb/sample")
        assert shards_of([url], tokenizer, tmp_path / "prefix") == reference_shards
        one = shards_of([f"{url}/a.parquet", folder / "b.jsonl.zst"], tokenizer, tmp_path / "mixed")
    assert one == reference_shards


def test_a_text_column_of_another_name_is_taken_with_text_key(tokenizer, reference_shards, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": documents()}), tmp_path / "docs.parquet", row_group_size=9)
    assert shards_of([tmp_path / "docs.parquet"], tokenizer, tmp_path / "out", "--text-key", "content") == (
        reference_shards
    )


def test_parts_written_by_separate_jobs_merge_into_the_single_jobs_shards(tokenizer, tmp_path):
    docs = documents()
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):  # four files: part 1/2 takes the first two, part 2/2 the last two
        write_jsonl(corpus / f"part-{i}.jsonl.gz", docs[i * 15 : (i + 1) * 15])
    single = shards_of([corpus], tokenizer, tmp_path / "single")
    out = tmp_path / "merged"
    for part in ("2/2", "1/2"):  # in any order, e.g. on two nodes
        argv = ["--input", str(corpus), "--tokenizer", str(tokenizer), "--out", str(out), "--part", part]
        assert write_shards_main([*argv, *SHARD_ARGS, "--no-progress"]) == 0
    assert not (out / "index.json").exists()
    assert write_shards_main(["--out", str(out), "--merge", "--no-progress"]) == 0
    merged = files_of(out)
    assert merged.keys() == single.keys()
    assert [name for name in merged if merged[name] != single[name]] == []
    loader = PackedTokenLoader(out, micro_batch_size=4, max_epochs=1)  # the trainer reads it as one set
    assert loader.index["splits"]["train"]["documents"] + loader.index["splits"]["val"]["documents"] == len(docs)


def _truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _parquet_page_damaged(path: Path) -> None:
    import pyarrow.parquet as pq

    column = pq.ParquetFile(path).metadata.row_group(2).column(1)  # row group 2's text column
    data = bytearray(path.read_bytes())
    for i in range(column.data_page_offset, column.data_page_offset + 40):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "docs.jsonl.gz": (_truncated, r"corrupt compressed data after line \d+"),
    "docs.jsonl.zst": (_truncated, r"corrupt compressed data after line \d+"),
    "docs.parquet": (_parquet_page_damaged, r"row group 2 is corrupt"),
}


@pytest.mark.parametrize("name", list(DAMAGE))
def test_a_damaged_input_is_one_line_naming_file_and_position_and_leaves_no_output(name, tokenizer, tmp_path, capsys):
    docs = documents() * 30  # a gzip/zstd stream long enough to break in the middle
    damage, message = DAMAGE[name]
    path = write_parquet(tmp_path / name, docs) if name.endswith("parquet") else write_jsonl(tmp_path / name, docs)
    damage(path)
    out = tmp_path / "out"
    argv = ["--input", str(path), "--tokenizer", str(tokenizer), "--out", str(out), *SHARD_ARGS, "--no-progress"]
    assert write_shards_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert re.fullmatch(rf"sessa-write-shards: error: {re.escape(str(path))}: {message} \(.+\)", err), err
    assert not out.exists() and not out.with_name("out.partial").exists()


@pytest.mark.parametrize("kind", ["jsonl.gz", "parquet", "datasets folder", "parquet + jsonl.zst + datasets folder"])
def test_the_progress_bar_counts_the_input_bytes_to_its_total(kind, tokenizer, tmp_path):
    """The bar's unit is bytes of input (so it has a total and an ETA), and it ends exactly at it."""
    from tqdm import tqdm

    from sessa_train.data.documents import expand_inputs

    inputs = FORMATS[kind](tmp_path, documents() * 10)
    total = sum(s.size for s in expand_inputs(inputs))
    argv = ["--input", *map(str, inputs), "--tokenizer", str(tokenizer), "--out", str(tmp_path / "out"), *SHARD_ARGS]
    cmd = [sys.executable, "-c", "import sys; from sessa_train.data.cli import write_shards_main as m; m(sys.argv[1:])"]
    out = subprocess.run([*cmd, *argv], capture_output=True, text=True, env=ENV, timeout=HANG_GUARD_S)
    assert out.returncode == 0, out.stderr[-2000:]
    last = out.stderr.replace("\r", "\n").strip().splitlines()
    bar = [line for line in last if line.startswith("tokenizing")][-1]
    size = tqdm.format_sizeof(total)
    assert "100%" in bar and f"| {size}/{size} [" in bar, bar


RSS_PROBE = """
import resource, sys
from sessa_train.data.documents import DocumentStream, expand_inputs
start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
chars = sum(len(t) for t in DocumentStream(expand_inputs(sys.argv[1:])))
print(chars, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start) * 1024)
"""


@pytest.mark.slow
def test_reading_a_large_input_stays_in_bounded_memory(tmp_path):
    """~120 MB of text as .jsonl.zst and as parquet is read with a peak RSS growth of a few MB
    (tools/bench_data.py --rss measures the whole sessa-write-shards on a few hundred MB)."""
    rng = np.random.default_rng(0)
    words = np.array(["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=7)) for _ in range(5000)])
    docs = [" ".join(rng.choice(words, size=1250)) for _ in range(12_000)]  # 10 kB each
    expected = sum(len(d) for d in docs)
    inputs = [write_jsonl(tmp_path / "big.jsonl.zst", docs), write_parquet(tmp_path / "big.parquet", docs, 500)]
    del docs
    for path in inputs:
        out = subprocess.run([sys.executable, "-c", RSS_PROBE, str(path)], capture_output=True, text=True, env=ENV)
        assert out.returncode == 0, out.stderr[-2000:]
        chars, grown = map(int, out.stdout.split())
        assert chars == expected
        assert grown < 64 * 2**20, f"{path.name}: RSS grew by {grown / 2**20:.0f} MiB reading {expected / 1e6:.0f} MB"


# -- a Hugging Face tokenizer -------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_tokenizer(default_data, tmp_path_factory) -> Path:
    """A byte-level BPE (tokenizers) trained by sessa-train-tokenizer on the default corpus."""
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    argv = ["--input", str(default_data / "corpus.jsonl"), "--model", str(path), "--kind", "hf-bpe"]
    assert train_tokenizer_main([*argv, "--vocab-size", "1024"]) == 0
    return path


def test_a_trained_byte_level_bpe_encodes_as_the_tokenizers_library_does(hf_tokenizer, default_data, tmp_path):
    from tokenizers import Tokenizer as HFTokenizer

    from sessa_train.data.documents import read_documents
    from sessa_train.data.shards import read_shard
    from sessa_train.data.storage import Storage
    from sessa_train.data.tokenizer import Tokenizer
    from sessa_train.files import file_sha256

    theirs = HFTokenizer.from_file(str(hf_tokenizer))
    ours = Tokenizer(hf_tokenizer)
    docs = list(read_documents(default_data / "corpus.jsonl"))
    assert ours.vocab_size == theirs.get_vocab_size() == 1024
    assert ours.eos_id == theirs.token_to_id("<|endoftext|>")
    assert ours.encode_batch(docs) == [theirs.encode(d, add_special_tokens=False).ids for d in docs]
    assert all(theirs.decode(theirs.encode(d).ids) == d for d in docs[:50])  # byte-level: lossless

    out = tmp_path / "shards"
    argv = ["--input", str(default_data / "corpus.jsonl"), "--tokenizer", str(hf_tokenizer), "--out", str(out)]
    assert write_shards_main([*argv, "--seq-len", "63", "--val-fraction", "0", "--no-progress"]) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["tokenizer_sha256"] == file_sha256(hf_tokenizer) and index["tokenizer_file"] == "tokenizer.json"
    stream = np.concatenate([[*theirs.encode(d).ids, ours.eos_id] for d in docs])
    shards = index["splits"]["train"]["shards"]
    written = np.concatenate([s for e in shards for s in read_shard(Storage(out), e, 64, index["dtype"], 1024)])
    assert np.array_equal(written, stream[: len(written)]) and len(stream) - len(written) < 64


@pytest.mark.slow
def test_training_and_export_carry_a_tokenizer_json_that_auto_tokenizer_loads(hf_tokenizer, default_data, tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import AutoTokenizer

    from sessa_train.export import export_checkpoint

    shards = tmp_path / "shards"
    argv = ["--input", str(default_data / "corpus.jsonl"), "--tokenizer", str(hf_tokenizer), "--out", str(shards)]
    assert write_shards_main([*argv, "--seq-len", "31", "--no-progress"]) == 0
    cfg = write_config(tmp_path / "c.yaml", shards, tmp_path, vocab_size=1024)
    train(cfg, f"data.tokenizer={hf_tokenizer}", "schedule.train_steps=4", "logging.eval_every_steps=0")
    step = tmp_path / "ckpt" / "step_00000004"
    assert (step / "tokenizer.json").read_bytes() == hf_tokenizer.read_bytes()
    export_checkpoint(tmp_path / "ckpt", tmp_path / "export")
    auto = AutoTokenizer.from_pretrained(tmp_path / "export")
    text = "def f(x):\n    return x  # naïve ✓"
    assert (
        auto(text, add_special_tokens=False)["input_ids"] == HFTokenizer.from_file(str(hf_tokenizer)).encode(text).ids
    )
    assert auto.eos_token == "<|endoftext|>" and auto.decode(auto(text)["input_ids"]) == text


# -- shards from object storage -----------------------------------------------------------


def remote_run(tiny_run, run: Path, path: str, *overrides: str, env: dict | None = None) -> None:
    from tests.conftest import tiny_overrides

    data = tiny_run["data"]
    cfg = REPO / "configs" / "tiny.yaml"
    train(cfg, *tiny_overrides(data, run), f"data.path={path}", "logging.eval_every_steps=0", *overrides,
          threads=2, env=env)  # fmt: skip


@pytest.mark.slow
def test_a_run_reading_shards_from_s3_has_the_local_runs_losses_across_a_resume(tiny_run, tmp_path):
    local = losses(tiny_run["run"])[:8]
    with s3_server() as (endpoint, client):
        url = upload(client, tiny_run["data"] / "shards", "corpus", "default/shards")
        env = S3_ENV | {"AWS_ENDPOINT_URL": endpoint}
        remote_run(tiny_run, tmp_path, url, "schedule.stop_after_steps=4", env=env)
        remote_run(tiny_run, tmp_path, url, "schedule.stop_after_steps=4", "checkpoint.resume=auto", env=env)
    assert losses(tmp_path) == local


@pytest.mark.slow
def test_a_server_failing_every_fifth_request_still_gives_the_local_losses(tiny_run, tmp_path):
    local = losses(tiny_run["run"])[:8]
    with http_server(tiny_run["data"], fail_every=5) as (base, handler):
        remote_run(tiny_run, tmp_path, f"{base}/shards", "schedule.stop_after_steps=8")
        assert handler.failed >= 2  # the index and the first shards were retried
    assert losses(tmp_path) == local


@pytest.mark.slow
def test_a_run_reads_the_index_once(tiny_run, tmp_path):
    """Over HTTP, with validation every 2 of 6 steps: index.json is fetched once, by the training
    loader; validation and the data's recorded identity use what it read."""
    with http_server(tiny_run["data"]) as (base, handler):
        remote_run(tiny_run, tmp_path, f"{base}/shards", "schedule.stop_after_steps=6",
                   "logging.eval_every_steps=2", "logging.eval_batches=1")  # fmt: skip
    assert handler.seen[("GET", "/shards/index.json")] == 1, dict(handler.seen)
    rows = [json.loads(line) for line in (tmp_path / "tb" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val/loss" in r] == [2, 4, 6]


@pytest.mark.slow
def test_a_shard_changed_on_the_server_is_named(default_data, tmp_path):
    import shutil

    shutil.copytree(default_data / "shards", tmp_path / "shards")
    shard = tmp_path / "shards" / "train-000003.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 1  # inside the first sample's tokens: a valid tar, other numbers
    shard.write_bytes(bytes(data))
    with s3_server() as (endpoint, client), pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ENDPOINT_URL", endpoint)
        url = upload(client, tmp_path / "shards", "changed", "shards")
        loader = PackedTokenLoader(url, micro_batch_size=8, max_epochs=1)
        with pytest.raises(DataError, match=rf"^{url}/train-000003.tar: checksum \w+\.\.\. differs from index.json's"):
            sum(1 for _ in loader)


def test_a_server_that_keeps_failing_is_named_after_bounded_retries(default_data, monkeypatch):
    from sessa_train.data import storage

    monkeypatch.setattr(storage, "BACKOFF_S", 0.01)
    with http_server(default_data, fail_every=1) as (base, handler), pytest.raises(DataError) as error:
        PackedTokenLoader(f"{base}/shards", micro_batch_size=8)
    assert handler.failed >= storage.RETRIES + 1
    message = str(error.value)
    assert message.startswith(f"{base}/shards/index.json cannot be read (") and "\n" not in message
    assert message.endswith(f"after {storage.RETRIES} retries")
