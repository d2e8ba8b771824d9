"""NCCL's rules for torch.distributed calls, emulated on gloo (tests only).

``install(mode)`` patches torch.distributed in this process so that code that passes here keeps
to what NCCL guarantees, not to what gloo happens to allow:

Point-to-point (isend, irecv, send, recv, batch_isend_irecv)
  - tags are ignored (NCCL has none);
  - operations run one at a time, in posting order: per group and peer pair (``mode="pair"``:
    PyTorch's lazily created pair communicators), or per group for all peers (``mode="rank"``:
    an eagerly initialised process group, which is what DeepSpeed creates on CUDA);
  - the operations of one ``batch_isend_irecv`` are one step: they progress together;
  - a send completes only once its receive has completed (NCCL may block a send until then).
  A program that relies on more deadlocks; ``Work.wait`` then raises after ``timeout`` seconds.

Collectives (all_reduce, all_gather, broadcast, ...)
  - every tensor must be on the group's communication device (``distributed.comm_device``);
  - package code calls torch.distributed only through ``sessa_train/distributed.py``, where
    that rule is enforced (so a collective handed a CPU tensor by some other module, which NCCL
    would refuse, is caught on CPU too). Calls from DeepSpeed and megatron-core are theirs.
A violation raises RuntimeError naming the caller.

The real gloo operations run on one thread per lane, with a data tag and an acknowledgement tag
of their own.
"""

from __future__ import annotations

import queue
import sys
import threading
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

PACKAGE = str(Path(__file__).resolve().parent.parent / "sessa_train")
HELPERS = str(Path(PACKAGE) / "distributed.py")
DATA, ACK = 0, 1
COLLECTIVES = (
    "all_reduce", "all_gather", "broadcast", "reduce_scatter", "all_gather_into_tensor", "reduce_scatter_tensor",
    "reduce", "gather", "barrier", "all_gather_object", "broadcast_object_list",
)  # fmt: skip
_REAL: dict = {}
_RULES: list = []
violations: list[str] = []


class _Work:
    def __init__(self, done: threading.Event, errors: list, timeout: float, what: str) -> None:
        self.done, self.errors, self.timeout, self.what = done, errors, timeout, what

    def wait(self, timeout=None) -> bool:
        if not self.done.wait(self.timeout):
            raise RuntimeError(f"deadlock under NCCL's rules: {self.what} did not complete in {self.timeout} s")
        if self.errors:
            raise self.errors[0]
        return True

    def is_completed(self) -> bool:
        return self.done.is_set()


class _Lane(threading.Thread):
    """Runs the jobs of one lane (a group, or a group and peer pair) one at a time, in order."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.jobs: queue.Queue = queue.Queue()
        self.start()

    def run(self) -> None:
        while (job := self.jobs.get()) is not None:
            ops, done, errors = job
            try:
                _execute(ops)
            except Exception as e:  # surfaced by _Work.wait
                errors.append(e)
            done.set()


def _execute(ops: list[tuple[str, torch.Tensor, int, object]]) -> None:
    """One step: the data of every op together, then each receive acknowledges its send."""
    works = [_REAL[kind](t, peer, group=group, tag=DATA) for kind, t, peer, group in ops]
    for w in works:
        w.wait()
    flags = [torch.zeros(1) for _ in ops]  # referenced until every acknowledgement completed
    acks = [
        _REAL["isend" if kind == "irecv" else "irecv"](flag, peer, group=group, tag=ACK)
        for flag, (kind, _, peer, group) in zip(flags, ops, strict=True)
    ]
    for w in acks:
        w.wait()


class _Rules:
    def __init__(self, mode: str, timeout: float) -> None:
        self.mode, self.timeout = mode, timeout
        self.lanes: dict = {}
        self.lock = threading.Lock()

    def post(self, ops: list[tuple[str, torch.Tensor, int, object]]) -> list[_Work]:
        ops = [(kind, t, peer, c10d._group_or_default_group(group)) for kind, t, peer, group in ops]
        group = ops[0][3]
        peers = {peer for _, _, peer, _ in ops}
        key = (id(group), None if self.mode == "rank" else tuple(sorted(peers)))
        with self.lock:
            lane = self.lanes.get(key) or self.lanes.setdefault(key, _Lane())
        done, errors = threading.Event(), []
        what = ", ".join(f"{kind} {'to' if kind == 'isend' else 'from'} rank {peer}" for kind, _, peer, _ in ops)
        lane.jobs.put((ops, done, errors))
        return [_Work(done, errors, self.timeout, what) for _ in ops]


def _caller() -> str:
    """File of the first frame outside torch.distributed and this module."""
    frame = sys._getframe(2)
    while frame and ("torch/distributed" in frame.f_code.co_filename or frame.f_code.co_filename == __file__):
        frame = frame.f_back
    return frame.f_code.co_filename if frame else "?"


def _check_collective(name: str, args, kwargs) -> None:
    from sessa_train.distributed import comm_device

    caller = _caller()
    if caller.startswith(PACKAGE) and caller != HELPERS:
        violations.append(f"{caller} calls torch.distributed.{name} directly, not through sessa_train/distributed.py")
    group = kwargs.get("group")
    device = comm_device(group)
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    tensors += [t for a in args if isinstance(a, list) for t in a if isinstance(t, torch.Tensor)]
    for t in tensors:
        if t.device != device:
            violations.append(
                f"{caller}: torch.distributed.{name} handed a tensor on {t.device}, the group's is {device}"
            )
    if violations:
        raise RuntimeError(violations[-1])


def install(mode: str = "rank", timeout: float = 60.0) -> None:
    """Patch this process's torch.distributed (call before any communication)."""
    assert mode in ("rank", "pair"), mode
    if _REAL:
        return
    rules = _Rules(mode, timeout)
    _RULES.append(rules)
    for name in ("isend", "irecv", "send", "recv", "batch_isend_irecv", *COLLECTIVES):
        _REAL[name] = getattr(c10d, name)

    def isend(tensor, dst=None, group=None, tag=0, **kw):
        return rules.post([("isend", tensor, dst, group)])[0]

    def irecv(tensor, src=None, group=None, tag=0, **kw):
        return rules.post([("irecv", tensor, src, group)])[0]

    def send(tensor, dst=None, group=None, tag=0, **kw):
        isend(tensor, dst, group).wait()

    def recv(tensor, src=None, group=None, tag=0, **kw):
        irecv(tensor, src, group).wait()
        return src

    def batch_isend_irecv(p2p_op_list):
        ops = [("isend" if p.op is isend else "irecv", p.tensor, p.peer, p.group) for p in p2p_op_list]
        return rules.post(ops)

    def collective(name):
        real = _REAL[name]

        def wrapped(*args, **kwargs):
            _check_collective(name, args, kwargs)
            return real(*args, **kwargs)

        return wrapped

    patches = {"isend": isend, "irecv": irecv, "send": send, "recv": recv, "batch_isend_irecv": batch_isend_irecv}
    patches |= {name: collective(name) for name in COLLECTIVES}
    for name, fn in patches.items():
        setattr(c10d, name, fn)
        setattr(dist, name, fn)


def shutdown() -> None:
    """Finish and join every lane (call before destroying the process group)."""
    for rules in _RULES:
        for lane in rules.lanes.values():
            lane.jobs.put(None)
        for lane in rules.lanes.values():
            lane.join()
        rules.lanes.clear()


def uninstall() -> None:
    """Join the lanes and give torch.distributed its own functions back."""
    shutdown()
    _RULES.clear()
    for name, fn in _REAL.items():
        setattr(c10d, name, fn)
        setattr(dist, name, fn)
    _REAL.clear()
    violations.clear()
