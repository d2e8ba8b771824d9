"""Which parts of megatron-core run on CPU with gloo here: 2 processes, tensor-parallel size 2
(then pipeline size 2), each part checked against the same computation in one process.

    pip install "megatron-core>=0.16"     # the gpu extra; not needed by CI
    python tools/probe_megatron_cpu.py    # prints a table, writes runs/probe_megatron_cpu.json
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _check(name: str, fn, results: list) -> None:
    try:
        detail = fn()
        results.append({"part": name, "ok": True, "detail": detail})
    except Exception as e:  # a probe reports every failure, it does not stop at the first
        frames = traceback.extract_tb(e.__traceback__)
        where = ([f for f in frames if "megatron" in f.filename] or frames)[-1]  # the deepest megatron frame
        at = f"{where.filename.split('site-packages/')[-1]}:{where.lineno}: {where.line}"
        results.append({"part": name, "ok": False, "detail": f"{type(e).__name__}: {str(e)[:160]} (at {at})"})


def _tp_parts(rank: int, results: list) -> None:
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel as tp
    from megatron.core.model_parallel_config import ModelParallelConfig

    _check(
        "parallel_state.initialize_model_parallel(tp=2)",
        lambda: ps.initialize_model_parallel(tensor_model_parallel_size=2) or "tp group of 2",
        results,
    )
    cfg = ModelParallelConfig(tensor_model_parallel_size=2, use_cpu_initialization=True, params_dtype=torch.float64)
    init = torch.nn.init.normal_
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    w1, w2 = torch.randn(32, 16, dtype=torch.float64), torch.randn(16, 32, dtype=torch.float64)

    def column_row() -> str:
        col = tp.ColumnParallelLinear(16, 32, config=cfg, init_method=init, bias=False, gather_output=False)
        row = tp.RowParallelLinear(
            32, 16, config=cfg, init_method=init, bias=False, input_is_parallel=True, skip_bias_add=False
        )
        with torch.no_grad():
            col.weight.copy_(w1.chunk(2, 0)[rank])
            row.weight.copy_(w2.chunk(2, 1)[rank])
        xi = x.clone().requires_grad_()
        y, _ = row(col(xi)[0])
        y.square().sum().backward()
        xr = x.clone().requires_grad_()
        (xr @ w1.T @ w2.T).square().sum().backward()
        err = max((y - xr @ w1.T @ w2.T).abs().max().item(), (xi.grad - xr.grad).abs().max().item())
        assert err < 1e-10, err
        return f"Column->Row parallel MLP equals dense, fp64 max err {err:.1e} (output and input grad)"

    _check("ColumnParallelLinear + RowParallelLinear (use_cpu_initialization)", column_row, results)

    def vocab() -> str:
        emb = tp.VocabParallelEmbedding(64, 16, init_method=init, config=cfg)
        full = torch.randn(64, 16, dtype=torch.float64)
        with torch.no_grad():
            emb.weight.copy_(full.chunk(2, 0)[rank])
        ids = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(1))
        emb_err = (emb(ids) - full[ids]).abs().max().item()
        logits = torch.randn(5, 3, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        loss = tp.vocab_parallel_cross_entropy(logits.chunk(2, -1)[rank].clone(), ids.T.contiguous())
        ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.T.flatten(), reduction="none")
        ce_err = ((loss.flatten() - ref).abs() / ref).max().item()
        assert emb_err < 1e-12 and ce_err < 1e-5, (emb_err, ce_err)
        return f"embedding equals dense (fp64 err {emb_err:.1e}); cross-entropy within {ce_err:.1e} relative"

    _check("VocabParallelEmbedding + vocab_parallel_cross_entropy", vocab, results)
    ps.destroy_model_parallel()


def _pp_parts(rank: int, results: list) -> None:
    from megatron.core import parallel_state as ps
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.pipeline_parallel import get_forward_backward_func

    _check(
        "parallel_state.initialize_model_parallel(pp=2)",
        lambda: ps.initialize_model_parallel(pipeline_model_parallel_size=2) or "pp group of 2",
        results,
    )
    cfg = ModelParallelConfig(pipeline_model_parallel_size=2, pipeline_dtype=torch.float32, use_cpu_initialization=True)
    from megatron.core.enums import ModelType

    stage = torch.nn.Linear(8, 8)
    stage.config, stage.model_type = cfg, ModelType.encoder_or_decoder
    cfg.hidden_size = 8  # read by the schedule to size its p2p buffers (a TransformerConfig field)

    def schedule() -> str:
        def forward_step(data, model):
            x = next(data)
            out = model(x)
            return out, lambda o: (o.square().mean(), {})

        fb = get_forward_backward_func()
        fb(
            forward_step_func=forward_step,
            data_iterator=iter([torch.randn(2, 4, 8)] * 4),
            model=[stage],
            num_microbatches=4,
            seq_length=4,
            micro_batch_size=2,
            forward_only=False,
        )
        return f"{fb.__name__} ran"

    _check("pipeline schedule (1F1B, p2p communication)", schedule, results)
    ps.destroy_model_parallel()


def _dist_checkpointing(rank: int, results: list, root: str) -> None:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    def save_tp2_load_whole() -> str:
        full = torch.arange(16.0).reshape(4, 4)
        saved = {"w": ShardedTensor.from_rank_offsets("w", full.chunk(2, 1)[rank].clone(), (1, rank, 2))}
        dist_checkpointing.save(saved, root)
        wanted = {"w": ShardedTensor.from_rank_offsets("w", torch.empty(4, 4), replica_id=rank)}
        loaded = dist_checkpointing.load(wanted, root)["w"]
        assert torch.equal(loaded, full), loaded
        return "a tensor saved as 2 column shards loads whole (resharding on load)"

    _check("dist_checkpointing save/load with resharding", save_tp2_load_whole, results)


def _worker(rank: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT="29611", RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank)
    )
    dist.init_process_group("gloo", rank=rank, world_size=2)
    results: list = []
    _tp_parts(rank, results)
    _pp_parts(rank, results)
    _dist_checkpointing(rank, results, str(Path(out).parent / "probe_dist_ckpt"))
    if rank == 0:
        Path(out).write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


def main() -> int:
    out = Path("runs/probe_megatron_cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out.parent / "probe_dist_ckpt", ignore_errors=True)
    (out.parent / "probe_dist_ckpt").mkdir()
    mp.spawn(_worker, args=(str(out),), nprocs=2, join=True)
    import megatron.core

    print(f"megatron-core {megatron.core.__version__}, torch {torch.__version__}, gloo, 2 processes\n")
    print("| part | runs on CPU | detail |\n|---|---|---|")
    for r in json.loads(out.read_text()):
        print(f"| {r['part']} | {'yes' if r['ok'] else 'no'} | {r['detail']} |")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
