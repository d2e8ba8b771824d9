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
    at every size around the block's."""
    import hashlib

    from sessa_train import files

    monkeypatch.setattr(files, "BLOCK", 7)
    for size in (0, 1, 6, 7, 8, 14, 15, 100):
        data = bytes(range(size % 256)) * (size // 256) + bytes(range(size % 256))
        path = tmp_path / f"f{size}"
        path.write_bytes(data)
        assert files.file_sha256(path) == hashlib.sha256(data).hexdigest() == files.fsync_and_sha256(path), size
