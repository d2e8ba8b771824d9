"""TP x PP x DP (megatron-core + DeepSpeed, gloo, 4 processes) against the 1-process model.

One spawn of 4 ranks walks through the layouts (tensor, pipeline, zero stage); data
parallelism fills the rest (DP = 4 / (TP x PP)). For each, two optimizer steps go through
exactly what the trainer runs (SessaStage, PipelineRunner on megatron-core's schedule,
DeepSpeed's gradient reduction, clipping and AdamW). The loss of every step and, under ZeRO-0,
every gradient (merged back to the plain layout) must equal the 1-process model's.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("megatron.core", reason="megatron-core (dev extra) is needed")
pytestmark = pytest.mark.slow

WORLD, SEQS, N_MICRO, T, STEPS = 4, 4, 2, 12, 2  # SEQS: sequences per micro-batch over all DP ranks
LAYOUTS = [(2, 2, 0), (2, 1, 0), (1, 2, 0), (2, 2, 1)]  # (tensor, pipeline, zero stage)


def _model_config(tie: bool):
    from sessa_train.config import ModelConfig

    return ModelConfig(
        vocab_size=64,
        d_model=32,
        n_layers=3,  # uneven over 2 stages
        n_heads=4,
        n_kv_heads=2,
        feedback_chunk_size=5,  # T = 12 is no multiple of it
        tie_embeddings=tie,
    )


def _train_config(model, tensor: int, pipeline: int, zero: int, dp: int):
    from sessa_train.config import DataConfig, OptimizerConfig, ParallelConfig, ScheduleConfig, TrainConfig

    return TrainConfig(
        model=model,
        data=DataConfig(micro_batch_size=SEQS // dp),
        optimizer=OptimizerConfig(lr=1e-2, grad_clip=0.05, eps=1e-3),  # clipping active; see _reference
        schedule=ScheduleConfig(train_steps=10, warmup_steps=0, global_batch_size=SEQS * N_MICRO),
        parallel=ParallelConfig(tensor=tensor, pipeline=pipeline, zero_stage=zero),
    )


def _batches(step: int, dp_rank: int, dp: int) -> list[dict]:
    """The micro-batches of one data-parallel rank: a slice of the same global batch."""
    g = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, 64, (N_MICRO, SEQS, T + 1), generator=g)
    per_rank = SEQS // dp
    return [{"tokens": t[dp_rank * per_rank : (dp_rank + 1) * per_rank]} for t in tokens]


def _reference(model_cfg) -> tuple[list[float], list[dict]]:
    """1 process: loss of each step and the gradients before clipping."""
    import torch.nn.functional as F

    from sessa_train.models import SessaLM
    from sessa_train.train import parameter_groups

    torch.manual_seed(0)
    model = SessaLM(model_cfg)
    cfg = _train_config(model_cfg, 1, 1, 0, 1)
    o = cfg.optimizer
    opt = torch.optim.AdamW(parameter_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    losses, grads = [], []
    for step in range(STEPS):
        total = 0.0
        for batch in _batches(step, 0, 1):
            tok = batch["tokens"]
            loss = F.cross_entropy(model(tok[:, :-1]).flatten(0, 1), tok[:, 1:].flatten()) / N_MICRO
            loss.backward()
            total += loss.item()
        losses.append(total)
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
        if model_cfg.tie_embeddings:
            grads[-1]["lm_head.weight"] = grads[-1]["embed.weight"]
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optimizer.grad_clip)
        opt.step()
        opt.zero_grad()
    return losses, grads


def _worker(rank: int, port: int, tie: bool, out) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        DS_ACCELERATOR="cpu",
    )
    import deepspeed
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from sessa_train.models import SessaLM
    from sessa_train.parallel.layout import merge_lm_states
    from sessa_train.parallel.model import build_stage
    from sessa_train.parallel.pipeline import PipelineRunner
    from sessa_train.parallel.state import MegatronMPU, init_model_parallel
    from sessa_train.train import SkippableAdamW, deepspeed_config, parameter_groups

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    model_cfg = _model_config(tie)
    cpu = torch.device("cpu")
    results = {}
    for tensor, pipeline, zero in LAYOUTS:
        state = init_model_parallel(tensor, pipeline, 1, WORLD)
        torch.manual_seed(0)
        stage = build_stage(model_cfg, state, SessaLM(model_cfg).state_dict(), cpu)
        cfg = _train_config(model_cfg, tensor, pipeline, zero, state.dp)
        opt = cfg.optimizer
        optimizer = SkippableAdamW(
            parameter_groups(stage, opt.weight_decay), lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps
        )
        engine, *_ = deepspeed.initialize(
            model=stage,
            optimizer=optimizer,
            config=deepspeed_config(cfg, N_MICRO, cpu, accumulate=False),
            mpu=MegatronMPU(),
        )
        runner = PipelineRunner(stage, T, SEQS // state.dp, cpu)
        losses, grads = [], []
        for step in range(STEPS):
            stats = runner.run(iter(_batches(step, state.dp_rank, state.dp)), N_MICRO)
            engine.allreduce_gradients()
            loss = torch.tensor([sum(s["loss"].item() for s in stats) / N_MICRO if state.last_stage else 0.0])
            dist.all_reduce(loss)
            losses.append(loss.item() / (state.dp * state.tp))
            if zero == 0:
                mine = {k: p.grad.clone() for k, p in stage.named_parameters()}
                every: list = [None] * WORLD
                dist.all_gather_object(every, ((state.pp_rank, state.tp_rank), mine))
                grads.append(merge_lm_states(dict(every), model_cfg))
            engine.step()
        results[(tensor, pipeline, zero)] = (losses, grads)
        ps.destroy_model_parallel()
    if rank == 0:
        out.update(results)
    dist.destroy_process_group()


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_tp_pp_dp_layouts_match_one_process_in_loss_and_gradients(tie):
    results = mp.Manager().dict()
    port = 29000 + os.getpid() % 400 + 7 * tie
    mp.spawn(_worker, args=(port, tie, results), nprocs=WORLD, join=True)
    ref_losses, ref_grads = _reference(_model_config(tie))
    assert set(results) == set(LAYOUTS)
    for layout, (losses, grads) in results.items():
        for step, (got, want) in enumerate(zip(losses, ref_losses, strict=True)):
            assert abs(got - want) <= 1e-5 * abs(want), f"{layout} step {step}: loss {got} vs {want}"
        for step, merged in enumerate(grads):
            assert merged.keys() == ref_grads[step].keys()
            for name, want in ref_grads[step].items():
                scale = max(g.abs().max() for g in ref_grads[step].values())
                err = (merged[name] - want).abs().max() / scale
                assert err < 1e-5, f"{layout} step {step}: gradient of {name} off by {err:.2e} (relative)"
