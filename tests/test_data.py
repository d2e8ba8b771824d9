"""Data pipeline: tokenizer, shards, index, and the resumable distributed loader."""

from __future__ import annotations

import itertools
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
import webdataset as wds

from sessa_train.data import PackedTokenLoader, ShardError, Tokenizer, merge_states, train_tokenizer, write_shards
from sessa_train.data.cli import train_tokenizer_main, write_shards_main
from sessa_train.data.documents import iter_documents

SEQ_LEN = 31  # samples hold 32 tokens


def small_documents() -> list[str]:
    """Real English text shipped with Python (reference-manual topics, cut), about 60 kB."""
    from pydoc_data.topics import topics

    docs = [topics[name][:1500] for name in sorted(topics)][:40]
    return [*docs, "short doc\n\twith a tab", "Unicode: é 漢字 😀 — done."]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("data")
    docs = small_documents()
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    model = train_tokenizer(docs, root / "tok.model", vocab_size=400)
    index = write_shards(docs, model, root / "shards", seq_len=SEQ_LEN, samples_per_shard=40, val_fraction=0.1)
    return {"root": root, "docs": docs, "model": model, "dir": root / "shards", "index": index}


def loader(corpus, **kwargs) -> PackedTokenLoader:
    return PackedTokenLoader(corpus["dir"], **{"micro_batch_size": 8, "seed": 7, **kwargs})


def ids_of(batches) -> list[int]:
    return [i for b in batches for i in b["sample_ids"].tolist()]


def test_round_trip_text_to_shards_to_text(corpus):
    tok = Tokenizer(corpus["model"])
    index = corpus["index"]
    for split, info in index["splits"].items():
        docs = [d for d in corpus["docs"] if (split == "val") == _is_val(d)]
        assert info["documents"] == len(docs)
        stream = np.concatenate([np.array([*tok.encode(d), tok.eos_id]) for d in docs])
        batches = list(loader(corpus, split=split, shuffle=False, max_epochs=1))
        tokens = torch.cat([b["tokens"] for b in batches]).flatten().numpy()
        assert ids_of(batches) == list(range(info["samples"]))  # unshuffled: file order
        assert len(tokens) == info["tokens"] == info["samples"] * (SEQ_LEN + 1)
        assert len(stream) - len(tokens) == info["dropped_tokens"] < SEQ_LEN + 1  # only the tail is dropped
        assert np.array_equal(tokens, stream[: len(tokens)])
        pieces = np.split(tokens, np.flatnonzero(tokens == tok.eos_id) + 1)[:-1]
        assert [tok.decode(p[:-1].tolist()) for p in pieces] == docs[: len(pieces)]
        assert sum(s["tokens"] for s in info["shards"]) == info["tokens"]


def _is_val(doc: str) -> bool:
    from sessa_train.data.shards import is_validation

    return is_validation(doc, 0.1)


def test_shards_and_tokenizer_load_with_the_plain_libraries(corpus):
    shard = corpus["index"]["splits"]["train"]["shards"][1]
    plain = list(wds.WebDataset(str(corpus["dir"] / shard["name"]), shardshuffle=False).decode())
    ours = loader(corpus, shuffle=False, max_epochs=1).read(1)
    assert len(plain) == len(ours) == shard["samples"]
    assert all(
        np.array_equal(p["tokens.npy"], o) and p["tokens.npy"].dtype == np.uint16
        for p, o in zip(plain, ours, strict=True)
    )
    sp = spm.SentencePieceProcessor(model_file=str(corpus["model"]))
    text = corpus["docs"][-1]
    assert sp.encode(text) == Tokenizer(corpus["model"]).encode(text) and sp.decode(sp.encode(text)) == text


def test_parallel_writing_gives_identical_shards(corpus, tmp_path):
    index = write_shards(
        corpus["docs"],
        corpus["model"],
        tmp_path,
        seq_len=SEQ_LEN,
        samples_per_shard=40,
        val_fraction=0.1,
        num_workers=1,
        docs_per_task=3,
    )
    assert index == corpus["index"]
    for shard in index["splits"]["train"]["shards"]:
        assert (tmp_path / shard["name"]).read_bytes() == (corpus["dir"] / shard["name"]).read_bytes()


def test_shard_bytes_limit_is_respected(corpus, tmp_path):
    limit = 3 * 10240
    index = write_shards(corpus["docs"], corpus["model"], tmp_path, seq_len=SEQ_LEN, shard_bytes=limit)
    sizes = [(tmp_path / s["name"]).stat().st_size for s in index["splits"]["train"]["shards"]]
    assert len(sizes) > 3 and max(sizes) <= limit
    assert sorted(sizes)[-2] > limit - 10240  # shards are filled, not just split small


def test_two_ranks_two_workers_cover_one_epoch_exactly_once(corpus):
    n = corpus["index"]["splits"]["train"]["samples"]
    runs = []
    for _ in range(2):
        per_rank = [ids_of(loader(corpus, rank=r, world_size=2, num_workers=2, max_epochs=1)) for r in range(2)]
        runs.append(per_rank)
        everything = per_rank[0] + per_rank[1]
        assert sorted(everything) == list(range(n))
    assert runs[0] == runs[1]  # same seed, same order
    other_seed = ids_of(loader(corpus, rank=0, world_size=2, num_workers=2, max_epochs=1, seed=8))
    assert other_seed != runs[0][0]


def run_ranks(corpus, world, workers, steps, state=None):
    """Lock-step data-parallel consumption; returns (batches per rank, merged state)."""
    loaders = [loader(corpus, rank=r, world_size=world, num_workers=workers) for r in range(world)]
    if state is not None:
        for ld in loaders:
            ld.load_state_dict(state)
    iters = [iter(ld) for ld in loaders]
    batches = [[next(it) for it in iters] for _ in range(steps)]
    return batches, merge_states([ld.state_dict() for ld in loaders])


@pytest.mark.parametrize(("world", "workers"), [(1, 0), (1, 2), (2, 2)])
def test_resume_continues_with_exactly_the_next_batches(corpus, world, workers):
    n = corpus["index"]["splits"]["train"]["samples"]
    total = (2 * n) // (8 * world) + 3  # runs past the first epoch boundary
    full, _ = run_ranks(corpus, world, workers, total)
    for k in (1, 5, total - 4):
        head, state = run_ranks(corpus, world, workers, k)
        state = json.loads(json.dumps(state))  # as stored in a checkpoint
        tail, _ = run_ranks(corpus, world, workers, total - k, state)
        assert [[b["sample_ids"].tolist() for b in step] for step in head + tail] == [
            [b["sample_ids"].tolist() for b in step] for step in full
        ]
        assert all(
            torch.equal(a["tokens"], b["tokens"])
            for sa, sb in zip(head + tail, full, strict=True)
            for a, b in zip(sa, sb, strict=True)
        )


@pytest.mark.parametrize(("before", "after"), [((2, 2), (3, 1)), ((1, 2), (2, 0)), ((3, 1), (1, 0))])
def test_resharding_to_another_layout_neither_repeats_nor_skips(corpus, before, after):
    n = corpus["index"]["splits"]["train"]["samples"]
    head, state = run_ranks(corpus, *before, steps=3)
    seen = [i for step in head for b in step for i in b["sample_ids"].tolist()]
    world, workers = after
    rest = []
    for r in range(world):
        ld = loader(corpus, rank=r, world_size=world, num_workers=workers, max_epochs=1)
        ld.load_state_dict(state)
        rest += ids_of(ld)
    assert sorted(seen + rest) == list(range(n))


def test_state_from_another_run_or_missing_ranks_is_refused(corpus):
    _, state = run_ranks(corpus, 2, 0, steps=2)
    with pytest.raises(ValueError, match="seed=7, this loader has seed=9"):
        loader(corpus, seed=9).load_state_dict(state)
    one_rank = loader(corpus, rank=0, world_size=2)
    with pytest.raises(ValueError, match="holds 1 of 2 ranks"):
        loader(corpus).load_state_dict(one_rank.state_dict())


def copy_shards(corpus, tmp_path) -> Path:
    target = tmp_path / "shards"
    shutil.copytree(corpus["dir"], target)
    return target


def test_corrupt_or_truncated_shard_names_the_file(corpus, tmp_path):
    data = copy_shards(corpus, tmp_path)
    bad = data / corpus["index"]["splits"]["train"]["shards"][2]["name"]
    whole = bad.read_bytes()
    for damaged in (whole[: len(whole) // 2], b"\x00garbage" * 300, whole[:512] + b"x" * (len(whole) - 512)):
        bad.write_bytes(damaged)
        with pytest.raises(ShardError, match=str(bad)):
            list(PackedTokenLoader(data, micro_batch_size=4, shuffle=False, max_epochs=1))


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_shard_can_be_skipped_on_request(corpus, tmp_path, caplog, workers):
    data = copy_shards(corpus, tmp_path)
    entry = corpus["index"]["splits"]["train"]["shards"][2]
    (data / entry["name"]).write_bytes(b"not a tar file" * 100)
    ld = PackedTokenLoader(data, micro_batch_size=4, max_epochs=1, skip_corrupt=True, num_workers=workers)
    with caplog.at_level(logging.WARNING):
        ids = ids_of(ld)
    n = corpus["index"]["splits"]["train"]["samples"]
    assert len(ids) == n - entry["samples"] and ld.skipped_shards == [entry["name"]]
    if workers == 0:  # records logged in worker processes do not reach caplog
        assert entry["name"] in caplog.text


def test_missing_shard_and_wrong_tokenizer_are_named(corpus, tmp_path):
    data = copy_shards(corpus, tmp_path)
    missing = data / corpus["index"]["splits"]["train"]["shards"][0]["name"]
    missing.unlink()
    with pytest.raises(ShardError, match=f"missing: {missing}"):
        PackedTokenLoader(data, micro_batch_size=4)
    other = train_tokenizer(corpus["docs"], tmp_path / "other.model", vocab_size=450)
    with pytest.raises(ShardError, match=f"tokenizer {other}"):
        PackedTokenLoader(corpus["dir"], micro_batch_size=4, tokenizer_path=other)
    PackedTokenLoader(corpus["dir"], micro_batch_size=4, tokenizer_path=corpus["model"])  # the right one is fine


def test_too_many_readers_for_an_endless_stream_is_refused(corpus):
    n_shards = len(corpus["index"]["splits"]["train"]["shards"])
    with pytest.raises(ValueError, match=f"has {n_shards} shards, fewer than"):
        loader(corpus, world_size=n_shards, num_workers=2)


def test_cli_tokenizer_and_shards_round_trip(corpus, tmp_path, capsys):
    jsonl = corpus["root"] / "docs.jsonl"
    model = str(tmp_path / "t.model")
    assert train_tokenizer_main(["--input", str(jsonl), "--model", model, "--vocab-size", "400"]) == 0
    argv = [
        "--input",
        str(jsonl),
        "--tokenizer",
        model,
        "--out",
        str(tmp_path / "s"),
        "--seq-len",
        str(SEQ_LEN),
        "--samples-per-shard",
        "40",
        "--val-fraction",
        "0.1",
        "--no-progress",
    ]
    assert write_shards_main(argv) == 0
    assert json.loads((tmp_path / "s" / "index.json").read_text())["splits"] == corpus["index"]["splits"]
    assert list(iter_documents([jsonl])) == corpus["docs"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--seq-len", "0"], "seq_len must be >= 1, got 0"),
        (["--val-fraction", "1.5"], "val_fraction must be in [0, 1), got 1.5"),
        (["--input", "/nonexistent/dir"], "input not found: /nonexistent/dir"),
        (["--tokenizer", "/nonexistent.model"], "tokenizer model not found: /nonexistent.model"),
    ],
)
def test_cli_bad_input_is_one_line_error(corpus, tmp_path, capsys, argv, message):
    base = {
        "--input": str(corpus["root"] / "docs.jsonl"),
        "--tokenizer": str(corpus["model"]),
        "--out": str(tmp_path / "out"),
    }
    base.update(dict(zip(argv[::2], argv[1::2], strict=True)))
    with pytest.raises(SystemExit) as exit_info:
        write_shards_main([*itertools.chain.from_iterable(base.items()), "--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
