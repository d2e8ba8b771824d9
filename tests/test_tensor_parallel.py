"""Tensor parallelism (megatron-core layers, gloo): a TP=2 Sessa layer against the plain one."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("megatron.core", reason="megatron-core (dev extra) is needed")
pytestmark = pytest.mark.slow


def cpu_device_shim() -> None:
    """Test-only, CPU-only: megatron-core's last-dim gather allocates its output on
    ``torch.cuda.current_device()``; on a CPU build, let that name the CPU (docs/parallelism.md)."""
    if not torch.cuda.is_available():
        torch.cuda.current_device = lambda: torch.device("cpu")


def _layer_parity(rank: int, world: int, feedback_heads: int, port: int, errors) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.model_parallel_config import ModelParallelConfig

    from sessa_train.config import ModelConfig
    from sessa_train.models.layer import SessaLayer
    from sessa_train.parallel.layout import layer_spec, shard
    from sessa_train.parallel.tensor_parallel import TPSessaLayer

    cpu_device_shim()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    ps.initialize_model_parallel(tensor_model_parallel_size=world)
    cfg = ModelConfig(
        vocab_size=8,
        d_model=32,
        n_layers=1,
        n_heads=4,
        n_kv_heads=2,
        feedback_heads=feedback_heads,
        feedback_chunk_size=5,
    )
    torch.manual_seed(0)  # the same plain layer, input and output weights on every rank
    plain = SessaLayer(cfg).double()
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 13, 32, dtype=torch.float64)
    w = torch.randn(2, 13, 32, dtype=torch.float64)
    mpc = ModelParallelConfig(tensor_model_parallel_size=world, use_cpu_initialization=True, params_dtype=torch.float64)
    layer = TPSessaLayer(cfg, mpc)
    layer.load_state_dict(shard(plain.state_dict(), layer_spec(cfg), rank, world))

    xp = x.clone().requires_grad_()
    (plain(xp) * w).sum().backward()
    xt = x.clone().requires_grad_()
    y = layer(xt)
    (y * w).sum().backward()
    with torch.no_grad():
        err = {"y": (y - plain(x)).abs().max().item(), "dx": (xt.grad - xp.grad).abs().max().item()}
    grads = shard({k: p.grad for k, p in plain.named_parameters()}, layer_spec(cfg), rank, world)
    for name, p in layer.named_parameters():
        err[name] = (p.grad - grads[name]).abs().max().item()
    errors[rank] = err
    ps.destroy_model_parallel()
    dist.destroy_process_group()


@pytest.mark.parametrize("feedback_heads", [1, 2])
def test_tp2_layer_equals_the_plain_layer_in_output_and_every_gradient(feedback_heads):
    errors = mp.Manager().dict()
    port = 29400 + os.getpid() % 500 + feedback_heads
    mp.spawn(_layer_parity, args=(2, feedback_heads, port, errors), nprocs=2, join=True)
    for rank in (0, 1):
        bad = {k: v for k, v in errors[rank].items() if v > 1e-10}
        assert not bad, f"rank {rank}: fp64 differences {bad}"
        assert len(errors[rank]) > 10  # output, input gradient and every parameter were compared
