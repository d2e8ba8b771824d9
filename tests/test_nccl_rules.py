"""The NCCL-rules emulation (tests/nccl_rules.py) can fail, and the package keeps the rules.

- The context-parallel ring of the previous release posted each rank's receive of its dq from
  rank 0 early, then sent its own row pieces to rank 0 on the same pair, while rank 0 sent that
  dq only after receiving those pieces. Gloo progresses the two independently; NCCL runs them in
  posting order. That exchange, replayed as it was, completes on gloo and deadlocks under the
  emulation.
- Collectives: package code reaching torch.distributed other than through distributed.py, or a
  tensor on another device than the group's, is an error; the trainer (context parallelism,
  evaluation, checkpoint, resume) runs under the emulation with the losses of a plain run.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.slow

PIECES, WIDTH = 3, 8


def _old_ring_backward(rank: int, port: int, rules: str | None, out) -> None:
    """The point-to-point calls of the old ring's backward at CP=2, in their order."""
    torch.set_num_threads(1)  # a rank per core or less: more intra-op threads only contend (tests/trainer.py)
    import torch.distributed as dist

    if rules:
        from tests.nccl_rules import install

        install(rules, timeout=3)  # the sends it waits for take milliseconds; a deadlock is called after 3 s
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        if rank == 1:
            dq = [torch.empty(WIDTH) for _ in range(PIECES)]
            early = [dist.irecv(d, 0, tag=2 + i) for i, d in enumerate(dq)]  # posted first
            sends = [dist.isend(torch.full((WIDTH,), float(i)), 0, tag=1) for i in range(PIECES)]
            for w in sends + early:
                w.wait()
            out["rank1"] = [float(d[0]) for d in dq]
        else:
            for i in range(PIECES):
                piece = torch.empty(WIDTH)
                dist.recv(piece, 1, tag=1)
                dist.send(piece + 10, 1, tag=2 + i)  # the dq goes home after the piece arrived
        out[f"ok{rank}"] = True
    except RuntimeError as e:
        out[f"error{rank}"] = str(e)
    os._exit(0)  # lanes blocked in a deadlock never finish; the process ends here


@pytest.mark.parametrize("rules", [None, "pair", "rank"])
def test_the_old_rings_exchange_deadlocks_under_nccl_rules_only(rules):
    out = mp.Manager().dict()
    port = 29300 + os.getpid() % 300 + (rules is not None) + (rules == "rank")
    mp.spawn(_old_ring_backward, args=(port, rules, out), nprocs=2, join=True)
    if rules is None:
        assert out.get("ok0") and out.get("ok1") and out["rank1"] == [10.0, 11.0, 12.0]
    else:
        assert "deadlock under NCCL's rules" in out.get("error1", ""), dict(out)


def test_collectives_only_through_the_device_rule(tmp_path, monkeypatch):
    """One process, gloo: a direct torch.distributed call from package code is refused, and so is
    a tensor on another device than the group's; the helpers choose the device by backend."""
    import torch.distributed as dist

    from sessa_train import distributed
    from tests import nccl_rules

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(29900 + os.getpid() % 90))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        nccl_rules.install("rank")
        assert distributed.sum_values([1.0, 2.0]).tolist() == [1.0, 2.0]  # through the helper: fine
        direct = compile(
            "import torch, torch.distributed as dist\ndef mean(x):\n    dist.all_reduce(torch.tensor([x]))\n",
            nccl_rules.PACKAGE + "/trainer/build.py",
            "exec",
        )
        scope: dict = {}
        exec(direct, scope)
        with pytest.raises(RuntimeError, match=r"trainer/build\.py calls torch\.distributed\.all_reduce directly"):
            scope["mean"](1.0)
        nccl_rules.violations.clear()
        with pytest.raises(RuntimeError, match="a collective on a cpu group was handed a tensor on meta"):
            distributed.all_reduce(torch.zeros(2, device="meta"))
        monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
        assert distributed.comm_device() == torch.device("cuda", 3)
    finally:
        nccl_rules.uninstall()
        dist.destroy_process_group()


def test_trainer_under_nccl_rules_follows_the_plain_run(shards, tmp_path):
    """2 ranks, PP=2 (megatron's schedule and its p2p, the tied embedding lent each step),
    evaluation, a checkpoint at step 4 and a resume, all under NCCL's rules: every collective
    and point-to-point call of the package keeps them, and the losses are those of the same run
    on plain gloo, bit for bit."""
    from tests.trainer import UNDER_NCCL_RULES, losses, train, write_config

    pp = "parallel.pipeline=2"
    plain = tmp_path / "plain"
    train(write_config(tmp_path / "plain.yaml", shards, plain), pp, nproc=2)
    ruled = tmp_path / "ruled"
    cfg = write_config(tmp_path / "ruled.yaml", shards, ruled)
    train(cfg, pp, "schedule.stop_after_steps=4", nproc=2, entry=UNDER_NCCL_RULES)
    out = train(cfg, pp, "--resume", "auto", nproc=2, entry=UNDER_NCCL_RULES)
    assert "resumed from" in out.stdout
    assert losses(ruled) == losses(plain) and len(losses(plain)) == 8
