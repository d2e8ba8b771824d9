"""Data pipeline: tokenizer, shards, index, and the resumable distributed loader."""

from __future__ import annotations

import collections
import itertools
import json
import logging
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
import webdataset as wds

from sessa_train.data import (
    BlendedLoader,
    PackedTokenLoader,
    ShardError,
    StopRequestedError,
    Tokenizer,
    merge_loader_states,
    merge_states,
    train_tokenizer,
    write_shards,
)
from sessa_train.data.cli import train_tokenizer_main, write_shards_main
from sessa_train.data.documents import iter_documents
from sessa_train.errors import DataError

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
    ours = loader(corpus, shuffle=False, max_epochs=1).read(1, set())
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


def test_two_ranks_cover_one_epoch_exactly_once(corpus):
    n = corpus["index"]["splits"]["train"]["samples"]
    runs = []
    for _ in range(2):
        per_rank = [ids_of(loader(corpus, rank=r, world_size=2, max_epochs=1)) for r in range(2)]
        runs.append(per_rank)
        everything = per_rank[0] + per_rank[1]
        assert sorted(everything) == list(range(n))
    assert runs[0] == runs[1]  # same seed, same order
    other_seed = ids_of(loader(corpus, rank=0, world_size=2, max_epochs=1, seed=8))
    assert other_seed != runs[0][0]


G, SLOTS = 16, 8  # the loader tests' global batch and reader slots


def run_ranks(corpus, world, workers, steps, state=None, slots=SLOTS):
    """``steps`` steps of lock-step data-parallel training on ``world`` ranks: (per step, every
    rank's micro-batches in rank order), and the job's loader state after them."""
    micro = G // world if world > 2 else 4
    loaders = [
        loader(corpus, micro_batch_size=micro, global_batch_size=G, slots=slots, rank=r, world_size=world,
               num_workers=workers)
        for r in range(world)
    ]  # fmt: skip
    if state is not None:
        for ld in loaders:
            ld.load_state_dict(state)
    iters = [iter(ld) for ld in loaders]
    steps_out = []
    for _ in range(steps):
        step = []
        for ld, it in zip(loaders, iters, strict=True):
            step += [next(it) for _ in range(ld.micro_per_step)]
            ld.advance()
        steps_out.append(step)
    return steps_out, merge_states([ld.state_dict() for ld in loaders])


def global_batches(steps) -> list[list[int]]:
    """Each step's sample ids, as a sorted list (the global batch as a set)."""
    return [sorted(ids_of(step)) for step in steps]


STEPS = 2 * 913 // G + 3  # past the second epoch boundary


@pytest.fixture(scope="module")
def reference_batches(corpus):
    assert corpus["index"]["splits"]["train"]["samples"] == 913
    return global_batches(run_ranks(corpus, 1, 0, STEPS)[0])


@pytest.mark.parametrize(("world", "workers"), [(1, 2), (2, 0), (2, 2), (4, 1), (8, 0)])
def test_global_batches_do_not_depend_on_data_parallel_size_or_workers(corpus, reference_batches, world, workers):
    steps, _ = run_ranks(corpus, world, workers, STEPS)
    assert global_batches(steps) == reference_batches
    seen = collections.Counter(i for b in reference_batches for i in b)
    assert len(seen) == 913 and max(seen.values()) <= 3  # 2.05 epochs: every sample, none far ahead


def test_each_rank_reads_only_its_share(corpus, monkeypatch):
    """Four ranks together read each shard as often as one rank alone (no shard is read by two
    ranks for the same samples), a quarter each."""
    reads = collections.Counter()
    real = PackedTokenLoader.read

    def spy(self, shard, skipped):
        reads[self.world_size, self.rank] += 1
        return real(self, shard, skipped)

    monkeypatch.setattr(PackedTokenLoader, "read", spy)
    run_ranks(corpus, 1, 0, STEPS)
    run_ranks(corpus, 4, 0, STEPS)
    alone, each = reads[1, 0], [reads[4, r] for r in range(4)]
    assert sum(each) == alone > 2 * 23
    assert max(each) - min(each) <= 2


@pytest.mark.parametrize(("world", "workers"), [(1, 0), (1, 2), (2, 2)])
def test_resume_continues_with_exactly_the_next_batches(corpus, world, workers):
    full, _ = run_ranks(corpus, world, workers, STEPS)
    for k in (1, 5, STEPS - 4):
        head, state = run_ranks(corpus, world, workers, k)
        state = json.loads(json.dumps(state))  # as stored in a checkpoint
        tail, _ = run_ranks(corpus, world, workers, STEPS - k, state)
        assert [ids_of(step) for step in head + tail] == [ids_of(step) for step in full]
        assert all(
            torch.equal(a["tokens"], b["tokens"])
            for sa, sb in zip(head + tail, full, strict=True)
            for a, b in zip(sa, sb, strict=True)
        )


@pytest.mark.parametrize(("before", "after"), [((2, 2), (4, 0)), ((1, 2), (2, 0)), ((4, 1), (1, 0)), ((8, 0), (2, 1))])
def test_resume_under_another_layout_gives_the_same_global_batches(corpus, reference_batches, before, after):
    head, state = run_ranks(corpus, *before, steps=7)
    tail, _ = run_ranks(corpus, *after, steps=STEPS - 7, state=json.loads(json.dumps(state)))
    assert global_batches(head + tail) == reference_batches


def test_state_of_another_run_or_data_is_refused(corpus, tmp_path):
    _, state = run_ranks(corpus, 2, 0, steps=2)
    with pytest.raises(ValueError, match="seed=7; this loader has seed=9"):
        loader(corpus, seed=9, global_batch_size=G, slots=SLOTS).load_state_dict(state)
    with pytest.raises(ValueError, match="slots=8; this loader has slots=4"):
        loader(corpus, global_batch_size=G, slots=4).load_state_dict(state)
    other = copy_shards(corpus, tmp_path)
    index = json.loads((other / "index.json").read_text())
    (other / "index.json").write_text(json.dumps(index, indent=2))  # the same shards, another index file
    with pytest.raises(ValueError, match=r"index_sha256=.*the data \(index.json\) differs"):
        PackedTokenLoader(other, micro_batch_size=8, global_batch_size=G, slots=SLOTS, seed=7).load_state_dict(state)


def test_slots_that_do_not_split_over_the_ranks_name_the_valid_sizes(corpus):
    with pytest.raises(
        ValueError, match=r"8 reader slots .* over 3 data-parallel ranks; valid data-parallel sizes: 1, 2, 4, 8"
    ):
        loader(corpus, micro_batch_size=2, global_batch_size=24, slots=8, world_size=3)


def test_default_slots_fit_the_batch_the_ranks_and_the_shards():
    from sessa_train.data import default_slots

    assert default_slots(512, 10_000, 16) == 64  # at most 64 shards in memory per job...
    assert default_slots(512, 10_000, 128) == 128  # ...unless there are more ranks
    assert default_slots(12, 5, 2) == 4  # divides 12, multiple of 2, at most one per shard
    with pytest.raises(ValueError, match="write at least 4 shards"):
        default_slots(8, 3, 4)


def test_more_slots_than_shards_for_an_endless_stream_is_refused(corpus):
    with pytest.raises(ValueError, match="has 23 shards, fewer than the 32 reader slots"):
        loader(corpus, global_batch_size=32, slots=32)


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


def flip_bit(path: Path, bit: int) -> None:
    data = bytearray(path.read_bytes())
    data[bit // 8] ^= 1 << (bit % 8)
    path.write_bytes(bytes(data))


def test_a_flipped_bit_in_token_data_is_caught_by_the_checksum(corpus, tmp_path):
    """#15.1: one bit of one token changed: the shard is still a valid tar of valid arrays."""
    data = copy_shards(corpus, tmp_path)
    bad = data / corpus["index"]["splits"]["train"]["shards"][2]["name"]
    raw = bad.read_bytes()
    at = raw.index(b"\x93NUMPY") + 128 + 10  # inside the first sample's token array
    flip_bit(bad, 8 * at)
    with pytest.raises(ShardError, match=f"{bad}: checksum .* differs from index.json"):
        list(PackedTokenLoader(data, micro_batch_size=4, shuffle=False, max_epochs=1))


def test_a_token_beyond_the_vocabulary_is_named_even_with_a_matching_checksum(corpus, tmp_path):
    """A shard written wrongly (its checksum recorded after the damage) still cannot feed a token
    the embedding does not have: the sample and file are named."""
    from sessa_train.files import file_sha256

    data = copy_shards(corpus, tmp_path)
    entry = corpus["index"]["splits"]["train"]["shards"][2]
    bad = data / entry["name"]
    raw = bytearray(bad.read_bytes())
    at = raw.index(b"\x93NUMPY") + 128 + 10
    raw[at : at + 2] = b"\xff\xff"  # token 65535 in a uint16 array
    bad.write_bytes(bytes(raw))
    index = json.loads((data / "index.json").read_text())
    index["splits"]["train"]["shards"][2]["sha256"] = file_sha256(bad)
    (data / "index.json").write_text(json.dumps(index))
    with pytest.raises(ShardError, match=f"{bad}: sample .* holds token 65535 >= vocab_size 400"):
        list(PackedTokenLoader(data, micro_batch_size=4, shuffle=False, max_epochs=1))


def test_fuzz_single_bit_flips_are_detected_or_harmless(corpus, tmp_path):
    """50 random single-bit flips over a small shard set (3 train shards): each is detected and
    the damaged file named, or the loader gives exactly the clean samples (then training, a
    deterministic function of them, is bitwise the clean run's). Never a silent difference."""
    clean_dir = tmp_path / "clean"
    clean_dir.mkdir()
    index = json.loads((corpus["dir"] / "index.json").read_text())
    shards = index["splits"]["train"]["shards"][:3]
    index["splits"] = {"train": {**index["splits"]["train"], "shards": shards,
                                 "samples": sum(s["samples"] for s in shards),
                                 "tokens": sum(s["tokens"] for s in shards)}}  # fmt: skip
    for s in shards:
        shutil.copy(corpus["dir"] / s["name"], clean_dir / s["name"])
    (clean_dir / "index.json").write_text(json.dumps(index))

    def stream(folder: Path) -> list:
        ld = PackedTokenLoader(folder, micro_batch_size=4, shuffle=False, max_epochs=1)
        return [(b["sample_ids"].tolist(), b["tokens"].tolist()) for b in ld]

    clean = stream(clean_dir)
    rng = np.random.default_rng(15)
    outcomes = {"detected": 0, "identical": 0}
    for trial in range(50):
        work = tmp_path / f"t{trial}"
        shutil.copytree(clean_dir, work)
        victim = work / shards[rng.integers(len(shards))]["name"]
        flip_bit(victim, int(rng.integers(victim.stat().st_size * 8)))
        try:
            got = stream(work)
        except ShardError as e:
            assert str(victim) in str(e)
            outcomes["detected"] += 1
        else:
            assert got == clean
            outcomes["identical"] += 1
        shutil.rmtree(work)
    assert sum(outcomes.values()) == 50 and outcomes["detected"] > 0


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_shard_can_be_skipped_on_request(corpus, tmp_path, caplog, workers):
    data = copy_shards(corpus, tmp_path)
    entry = corpus["index"]["splits"]["train"]["shards"][2]
    (data / entry["name"]).write_bytes(b"not a tar file" * 100)
    ld = PackedTokenLoader(data, micro_batch_size=4, max_epochs=1, skip_corrupt=True)
    with caplog.at_level(logging.WARNING):
        ids = ids_of(ld)
    n = corpus["index"]["splits"]["train"]["samples"]
    assert len(ids) == n - entry["samples"] and ld.skipped == {entry["name"]}
    assert entry["name"] in caplog.text
    # training (an endless stream, here through DataLoader workers): counted in the loader state
    steps, state = run_ranks_on(data, workers, steps=60)
    assert state["skipped"] == [entry["name"]]
    assert all(len(ids_of(step)) == G for step in steps)


def run_ranks_on(data: Path, workers: int, steps: int, **kwargs):
    ld = PackedTokenLoader(data, micro_batch_size=8, global_batch_size=G, slots=SLOTS, seed=7, skip_corrupt=True,
                           num_workers=workers, **kwargs)  # fmt: skip
    it, out = iter(ld), []
    for _ in range(steps):
        out.append([next(it) for _ in range(ld.micro_per_step)])
        ld.advance()
    return out, ld.state_dict()


def test_skipping_stops_once_too_much_data_is_unreadable(corpus, tmp_path):
    """#15.2: with every shard corrupt, skip_corrupt ends with one error instead of looping over
    epochs: past data.max_skipped_fraction, or when an epoch of a slot yields nothing."""
    data = copy_shards(corpus, tmp_path)
    for entry in corpus["index"]["splits"]["train"]["shards"]:
        (data / entry["name"]).write_bytes(b"not a tar file" * 100)

    def endless(signum, frame):
        raise AssertionError("the loader kept looking for readable data")

    signal.signal(signal.SIGALRM, endless)
    signal.alarm(120)  # a loop fails the test rather than hanging the suite
    try:
        too_many = r"2 unreadable shards .* hold \d+ of 913 samples, more than data.max_skipped_fraction=0.05"
        with pytest.raises(DataError, match=too_many):
            run_ranks_on(data, 0, steps=5)
        with pytest.raises(DataError, match=r"reader slot 0 .* found no readable shard in 23 shards in a row"):
            run_ranks_on(data, 0, steps=5, max_skipped_fraction=0.999)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)


def test_a_stop_request_ends_the_stream_between_samples(corpus):
    calls = []

    def stop() -> bool:
        calls.append(1)
        return len(calls) > 20

    ld = loader(corpus, global_batch_size=G, slots=SLOTS, stop=stop)
    with pytest.raises(StopRequestedError):
        for _ in ld:
            pass
    assert len(calls) == 21


def test_index_counts_are_checked(corpus, tmp_path):
    """A sample count in index.json that the intact shard contradicts is an error naming the
    index (the shard is not dropped); token counts are checked when the index is read."""
    data = copy_shards(corpus, tmp_path)
    index = json.loads((data / "index.json").read_text())
    entry = index["splits"]["train"]["shards"][2]
    entry["samples"] -= 1
    entry["tokens"] -= SEQ_LEN + 1
    index["splits"]["train"]["samples"] -= 1
    index["splits"]["train"]["tokens"] -= SEQ_LEN + 1
    (data / "index.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match=f"index.json says {entry['name']} holds samples=39, the shard .* holds 40"):
        list(PackedTokenLoader(data, micro_batch_size=4, shuffle=False, max_epochs=1, skip_corrupt=True))
    entry["tokens"] += 1
    (data / "index.json").write_text(json.dumps(index))
    with pytest.raises(ShardError, match=f"{entry['name']} has tokens=1249, but 39 samples of 32 tokens make 1248"):
        PackedTokenLoader(data, micro_batch_size=4)


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
    not_sp = tmp_path / "tokenizer.json"
    not_sp.write_text('{"model": {"type": "BPE"}}')
    with pytest.raises(DataError, match=f"tokenizer {not_sp} is not a Hugging Face tokenizer.json"):
        PackedTokenLoader(corpus["dir"], micro_batch_size=4, tokenizer_path=not_sp)


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
        (["--seq-len", "0"], "argument --seq-len: must be >= 1, got 0"),
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
    try:
        code = write_shards_main([*itertools.chain.from_iterable(base.items()), "--no-progress"])
    except SystemExit as done:  # an argument argparse refuses
        code = done.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.fixture(scope="module")
def second_set(corpus) -> Path:
    """Another shard set with the same tokenizer and sequence length (other documents)."""
    from pydoc_data.topics import topics

    docs = [topics[name][1500:3000] for name in sorted(topics)[40:46]]
    out = corpus["root"] / "second"
    write_shards(docs, corpus["model"], out, seq_len=SEQ_LEN, samples_per_shard=10, val_fraction=0.0)
    return out


def blend_steps(corpus, second, world, steps, state=None, micro=5, weights=(0.6, 0.4)):
    """``steps`` lock-step steps of a blend on ``world`` ranks (global batch 10): each step's
    sample ids over every rank, the blend's sample-id base of the second set, the job's state."""
    sources = [(weights[0], corpus["dir"]), (weights[1], second)]
    loaders = [
        BlendedLoader(sources, micro_batch_size=micro, global_batch_size=10, rank=r, world_size=world, seed=7,
                      slots=state["slots"] if state else None)
        for r in range(world)
    ]  # fmt: skip
    for ld in loaders if state else ():
        ld.load_state_dict(state)
    iters = [iter(ld) for ld in loaders]
    out = []
    for _ in range(steps):
        out.append(
            sorted(i for it in iters for _ in range(10 // world // micro) for i in next(it)["sample_ids"].tolist())
        )
        for ld in loaders:
            ld.advance()
    return out, loaders[0].base[1], merge_loader_states([ld.state_dict() for ld in loaders]), loaders[0]


def test_a_blend_takes_fixed_shares_of_every_global_batch_and_counts_its_tokens(corpus, second_set):
    """Weights 0.7 / 0.3 of a global batch of 10: every step takes exactly 7 samples of the first
    set and 3 of the second (so the run's proportions are exact, not just within a tolerance),
    over more than an epoch of the second set; the per-source token counts say the same."""
    from sessa_train.data.blend import apportion

    assert apportion([1, 1, 1], 8) == [3, 3, 2] and apportion([0.5, 0.25, 0.25], 9) == [5, 2, 2]
    steps, base, _, ld = blend_steps(corpus, second_set, 1, 30, weights=(0.7, 0.3))
    second_total = ld.loaders[1].total_samples
    assert second_total < 30 * 3  # the second set wraps into its next epoch
    for ids in steps:
        assert sum(i < base for i in ids) == 7 and sum(i >= base for i in ids) == 3
    assert len({i for ids in steps for i in ids if i >= base}) == second_total  # all of it, then again
    tokens = list(ld.source_tokens().values())
    assert tokens == [30 * 7 * (SEQ_LEN + 1), 30 * 3 * (SEQ_LEN + 1)]


def test_a_blend_gives_the_same_batches_under_any_dp_size_and_resumes_exactly(corpus, second_set):
    """Weights 0.6 / 0.4: 6 and 4 samples a step, 3 and 2 per rank at DP=2."""
    whole, _, _, _ = blend_steps(corpus, second_set, 1, 8, micro=10)
    assert blend_steps(corpus, second_set, 2, 8)[0] == whole
    first, _, state, _ = blend_steps(corpus, second_set, 1, 3, micro=10)
    rest, _, _, ld = blend_steps(corpus, second_set, 2, 5, state=state)
    assert first + rest == whole
    assert ld.source_tokens()[str(corpus["dir"])] == 8 * 6 * (SEQ_LEN + 1)  # counted across the resume


def test_a_blend_refuses_what_it_cannot_split_or_mix(corpus, second_set, tmp_path):
    with pytest.raises(DataError, match=r"gives .*shards \(weight 0.7\) 7 of the 10 samples .* 2 data-parallel"):
        BlendedLoader([(0.7, corpus["dir"]), (0.3, second_set)], micro_batch_size=5, global_batch_size=10, world_size=2)
    other = tmp_path / "other"
    write_shards(small_documents(), corpus["model"], other, seq_len=15, samples_per_shard=40, val_fraction=0.0)
    with pytest.raises(DataError, match=r"seq_len=15.*must share the tokenizer and sequence length"):
        BlendedLoader([(1, corpus["dir"]), (1, other)], micro_batch_size=5, global_batch_size=10)
    _, _, state, _ = blend_steps(corpus, second_set, 1, 1, micro=10)
    other_weights = BlendedLoader([(0.5, corpus["dir"]), (0.5, second_set)], micro_batch_size=5, global_batch_size=10)
    with pytest.raises(DataError, match=r"blended with weights \[0.6, 0.4\]; this run has \[0.5, 0.5\]"):
        other_weights.load_state_dict(state)


# -- scored samples: their own targets travel with the tokens ------------------------------


def _scored_set(folder: Path, n: int, seed: int, scored: bool = True) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` samples of 9 ids, each scored at 2 random targets (never the first) that are not
    the next tokens (ids 50-59, outside the tokens' 0-49)."""
    from sessa_train.data.shards import write_sample_shards

    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        targets = np.full(9, -1)
        targets[1 + rng.choice(8, 2, replace=False)] = rng.integers(50, 60, 2)
        rows.append((rng.integers(0, 50, 9), targets))
    samples = rows if scored else [t for t, _ in rows]
    write_sample_shards({"train": samples, "val": samples[:2]}, folder, seq_len=8, vocab_size=60, eos_id=0,
                        samples_per_shard=4, scored=scored)  # fmt: skip
    return rows


def test_scored_samples_reach_the_batch_as_their_targets_and_loss_mask(tmp_path):
    """Every batch's targets and loss_mask are its samples' own, shifted onto the predictions
    (targets[j + 1] scores the prediction made at j), matched to the right sample through any
    shuffle; a blend with an unscored set gives that set's next tokens, every one scored."""
    rows = _scored_set(tmp_path / "scored", 12, 0)
    loader = PackedTokenLoader(tmp_path / "scored", micro_batch_size=3, seed=1, max_epochs=1)
    seen = 0
    for batch in loader:
        for tokens, targets, mask in zip(batch["tokens"], batch["targets"], batch["loss_mask"], strict=True):
            want = next(t for x, t in rows if np.array_equal(x, tokens.numpy()))[1:]
            assert mask.dtype == torch.float32 and mask.tolist() == (want >= 0).tolist()
            assert targets.tolist() == np.maximum(want, 0).tolist()
            seen += 1
    assert seen == 12
    _scored_set(tmp_path / "plain", 8, 1, scored=False)
    assert "loss_mask" not in next(iter(PackedTokenLoader(tmp_path / "plain", micro_batch_size=2, max_epochs=1)))
    blend = BlendedLoader([(1, tmp_path / "scored"), (1, tmp_path / "plain")], micro_batch_size=4, global_batch_size=4)
    batch = next(iter(blend))
    assert batch["loss_mask"][:2].sum(1).tolist() == [2.0, 2.0] and batch["loss_mask"][2:].eq(1).all()
    assert batch["targets"][2:].equal(batch["tokens"][2:, 1:]) and batch["targets"][:2].max() >= 50


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        (np.array([5, -1, -1, -1, -1, -1, -1, -1, -1]), "the first -1"),
        (np.array([-1, 60, -1, -1, -1, -1, -1, -1, -1]), r"targets in \[0, 60\) or -1"),
        (np.full(8, -1), "need 9 targets"),
    ],
)
def test_bad_targets_are_refused_in_one_line(tmp_path, targets, message):
    from sessa_train.data.shards import write_sample_shards

    with pytest.raises(DataError, match=message) as e:
        write_sample_shards({"train": [(np.arange(9), targets)]}, tmp_path / "x", seq_len=8, vocab_size=60, eos_id=0,
                            samples_per_shard=4, scored=True)  # fmt: skip
    assert "\n" not in str(e.value) and not (tmp_path / "x").exists()


def test_an_index_that_says_scored_needs_targets_in_every_sample(tmp_path):
    _scored_set(tmp_path / "plain", 4, 2, scored=False)
    index = json.loads((tmp_path / "plain" / "index.json").read_text())
    (tmp_path / "plain" / "index.json").write_text(json.dumps(index | {"scored": "yes"}))
    with pytest.raises(ShardError, match="scored must be true or false, got 'yes'"):
        PackedTokenLoader(tmp_path / "plain", micro_batch_size=2, max_epochs=1)
    (tmp_path / "plain" / "index.json").write_text(json.dumps(index | {"scored": True}))
    with pytest.raises(ShardError, match=r"train-000000.tar: unreadable shard \(KeyError: 'targets.npy'\)"):
        next(iter(PackedTokenLoader(tmp_path / "plain", micro_batch_size=2, max_epochs=1)))
