"""The checkpoint module saves and loads any set of parts, knowing nothing of what they hold; the
torch-free name tuples of the config match the records they name."""

from __future__ import annotations

import json
import socket

import pytest
import torch
import torch.distributed as dist

from sessa_train.checkpoint import CheckpointManager, DataIdentity, Layout, Meta, RunRecord, read_meta


@pytest.fixture(scope="module")
def one_process_group():
    """A gloo group of one process: the manager's collectives then run as in a 1-rank job."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


class Counter:
    """A part with a JSON state: what a new field of the checkpoint needs, and nothing else."""

    def __init__(self, value: int = 0) -> None:
        self.value = value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


class Weights(Counter):
    """A part with tensors of its own (one shard) besides its JSON state."""

    def __init__(self, value: int = 0, tensor: torch.Tensor | None = None) -> None:
        super().__init__(value)
        self.tensor = tensor

    def tensors(self) -> dict:
        return {"only": {"w": self.tensor}}

    def load_tensors(self, shards, meta: Meta) -> None:
        self.tensor = shards["only"].get_tensor("w")


LAYOUT = Layout(ranks=1, tensor=1, pipeline=1, context=1, data=1, zero=0)
DATA = DataIdentity(index_sha256="abc", seq_len=8, tokenizer_sha256=None, path="/data")
RECORD = RunRecord(LAYOUT, DATA, {"model": {}}, None)


def test_parts_round_trip_through_the_checkpoint_module(one_process_group, tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2, rank=0, world=1, log=print)
    w = torch.arange(6.0).reshape(2, 3)
    manager.attach({"counter": Counter(3), "weights": Weights(5, w)}, RECORD)
    path = manager.save(7, 700)
    assert json.loads((path / "manifest.json").read_text())["files"].keys() == {
        "config.json", "meta.json", "weights/only.safetensors",
    }  # fmt: skip
    back = {"counter": Counter(), "weights": Weights()}
    manager.attach(back, RECORD)
    meta = manager.load(path)
    assert (meta.step, meta.tokens, meta.layout, meta.data) == (7, 700, LAYOUT, DATA)
    assert back["counter"].value == 3 and back["weights"].value == 5
    assert torch.equal(back["weights"].tensor, w)


def test_a_background_save_holds_the_tensors_as_they_were_once_copied(one_process_group, tmp_path, monkeypatch):
    """In the background the host tensors are copied by the save's thread; once ``copied`` returns
    (what the next optimizer step waits for) the originals may change and the checkpoint still
    holds them as they were at the save. The write is held back until they have changed."""
    import threading

    from sessa_train.checkpoint import manager as manager_module

    changed, write = threading.Event(), manager_module.write_shard
    monkeypatch.setattr(manager_module, "write_shard", lambda *a: changed.wait(30) and write(*a))
    manager = CheckpointManager(tmp_path, keep_last=2, rank=0, world=1, log=print, background=True)
    w = torch.arange(1 << 20, dtype=torch.float32)
    manager.attach({"weights": Weights(5, w)}, RECORD)
    path = manager.save(3, 30)
    manager.copied()
    w.add_(1.0)  # the next step's update
    changed.set()
    manager.wait()
    back = {"weights": Weights()}
    manager.attach(back, RECORD)
    manager.load(path)
    assert torch.equal(back["weights"].tensor, torch.arange(1 << 20, dtype=torch.float32))


def test_a_shard_the_manifest_does_not_list_is_never_read(one_process_group, tmp_path):
    """#30: a stale extra file in a part's folder is ignored, whatever it holds."""
    from safetensors.torch import save_file

    manager = CheckpointManager(tmp_path, keep_last=2, rank=0, world=1, log=print)
    manager.attach({"weights": Weights(0, torch.ones(2))}, RECORD)
    path = manager.save(1, 10)
    save_file({"w": torch.zeros(2)}, str(path / "weights" / "stale.safetensors"))
    save_file({"x": torch.zeros(2)}, str(path / "weights" / "other-name.safetensors"))
    back = {"weights": Weights()}
    manager.attach(back, RECORD)
    manager.load(path)
    assert torch.equal(back["weights"].tensor, torch.ones(2))


def test_a_record_of_the_previous_format_is_upgraded(tmp_path):
    """A v2 meta.json (each part's fields at the top level) reads as the same record."""
    v2 = {
        "format": "sessa-checkpoint-v2", "step": 4, "tokens": 40, "optimizer_steps": 4, "scheduler_steps": 4,
        "engine": {"global_steps": 4, "global_samples": 32, "skipped_steps": 0}, "layout": vars(LAYOUT),
        "data": vars(DATA), "loader": {"version": 2, "position": 8},
    }  # fmt: skip
    (tmp_path / "meta.json").write_text(json.dumps(v2))
    meta = read_meta(tmp_path)
    assert meta.parts["model"] == {"optimizer_steps": 4, "scheduler_steps": 4, **v2["engine"]}
    assert meta.parts["loader"] == v2["loader"] and meta.layout == LAYOUT and meta.step == 4


def test_config_names_match_the_records():
    from sessa_train.config import ARCHITECTURES, FEEDBACK_BACKENDS
    from sessa_train.models.registry import RECORDS
    from sessa_train.ops.feedback import BACKENDS

    assert ("auto", *BACKENDS) == FEEDBACK_BACKENDS
    assert set(ARCHITECTURES) == set(RECORDS)


def test_the_solver_is_chosen_once_per_plan(monkeypatch):
    """The plan resolves the backend at its first use (set-up) and keeps it: the environment is not
    read again on every layer forward."""
    from sessa_train.config import ComputeConfig
    from sessa_train.models import ModelPlan
    from sessa_train.ops import feedback

    calls = []
    real = feedback.resolve_backend
    monkeypatch.setattr(feedback, "resolve_backend", lambda *a: calls.append(a) or real(*a))
    plan = ModelPlan(ComputeConfig())
    for _ in range(3):
        plan.solver(torch.device("cpu"))
    assert len(calls) == 1


def test_file_digests_read_ahead_and_equal_hashlib(tmp_path, monkeypatch):
    """The pipelined digest (the next block read while one is hashed) is sha256 of the whole file,
    and the per-block digests (any number of threads) are sha256 of each block, at every size
    around the read's and the block's."""
    import hashlib

    from sessa_train import files

    monkeypatch.setattr(files, "BLOCK", 7)
    paths, data = [], {}
    for size in (0, 1, 6, 7, 8, 14, 15, 100):
        data[size] = bytes(range(size % 256)) * (size // 256) + bytes(range(size % 256))
        paths.append(tmp_path / f"f{size}")
        paths[-1].write_bytes(data[size])
        assert files.file_sha256(paths[-1]) == hashlib.sha256(data[size]).hexdigest(), size
    for threads in (1, 3):
        for block in (5, 7, 14):
            got = files.block_sha256(paths, block, threads)
            for size, path in zip(data, paths, strict=True):
                want = [hashlib.sha256(data[size][a : a + block]).hexdigest() for a in range(0, size, block)]
                assert got[path] == (want or [hashlib.sha256().hexdigest()]), (size, block, threads)
    assert files.while_flushing(paths[-1], lambda: 42) == 42


def test_checking_more_files_than_the_process_may_open_at_once(tmp_path):
    """A whole checkpoint checked by one process (an export of a 1,024-rank job) has more files
    than a usual limit of open descriptors; each block opens its file only while it is read."""
    import hashlib
    import resource

    from sessa_train import files

    paths = []
    for i in range(300):
        paths.append(tmp_path / f"shard{i}")
        paths[-1].write_bytes(i.to_bytes(2, "little"))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (128, hard))
    try:
        got = files.block_sha256(paths, 8, 4)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert all(got[p] == [hashlib.sha256(p.read_bytes()).hexdigest()] for p in paths)


def test_the_manifest_checks_every_block_and_reads_the_whole_file_digests_of_v3(tmp_path, monkeypatch):
    """A changed byte in any block of any file fails the check, naming the file; a v3 record (one
    sha256 of the whole file) still verifies and still catches one; a v4 record whose digests do
    not cover its size, or a block size not a power of two, is a damaged manifest."""
    import hashlib

    from sessa_train.checkpoint import format as fmt

    monkeypatch.setattr(fmt, "DIGEST_BLOCK", 8)
    folder = tmp_path / "step"
    (folder / "model").mkdir(parents=True)
    paths = [folder / "model" / "a.safetensors", folder / "meta.json"]
    paths[0].write_bytes(bytes(range(45)))
    paths[1].write_bytes(b"{}")
    records = fmt.file_records(paths, folder)
    assert [len(r["sha256_blocks"]) for r in records.values()] == [6, 1]

    def write(files: dict) -> None:
        (folder / "manifest.json").write_text(json.dumps({"files": files}))

    write(records)
    assert fmt.check_files(folder) is None
    assert [fmt.check_files(folder, rank, 2) for rank in (0, 1)] == [None, None]
    for at in (0, 7, 8, 44):  # first and last byte of a block, and of the file
        changed = bytearray(range(45))
        changed[at] ^= 1
        paths[0].write_bytes(bytes(changed))
        assert fmt.check_files(folder) == f"{paths[0]} does not match its checksum in the manifest", at
    write({name: {"bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
           for name, p in zip(records, paths, strict=True)})  # fmt: skip
    assert fmt.check_files(folder) is None  # v3, of the changed bytes
    paths[0].write_bytes(bytes(range(45)))
    assert fmt.check_files(folder) == f"{paths[0]} does not match its checksum in the manifest"
    for bad in ({"bytes": 9}, {"block_bytes": 12}):  # digests that do not cover the size; not a power of two
        write({**records, "meta.json": records["meta.json"] | bad})
        assert fmt.check_files(folder) == f"{folder / 'manifest.json'} is not a manifest (damaged)", bad
