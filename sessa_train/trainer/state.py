"""An engine's training state in the checkpoint's layout-free form, and back under any layout.

The form (``checkpoint.py`` owns the files): per parameter of the plain model, its whole fp32
weight and AdamW moments (exp_avg, exp_avg_sq), cut only by tensor parallelism as the parameter
is, plus one AdamW step count and the learning-rate schedule's position. Whole over ZeRO
partitions: DeepSpeed's ``safe_get_full_*`` gather them on save (a collective over the
data-parallel group) and ``safe_set_full_*`` scatter them into this rank's partition on load, so
ZeRO 0-3, bf16 and every tensor x pipeline x context layout read and write the same thing.

Writing is spread over the ranks that hold the same parameters (the data x context-parallel
replicas of a tensor x pipeline rank): each parameter is written once, by the replica it is
assigned to (largest first, to the least loaded), and parameters that tensor parallelism does not
cut only by tensor rank 0.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sessa_train import distributed as comm
from sessa_train.checkpoint import MOMENTS, ParamReader, model_file, write_tensors
from sessa_train.parallel.layout import cut, stage_splits
from sessa_train.trainer.build import Engine
from sessa_train.trainer.optim import base_optimizer


def _zero(p: torch.nn.Parameter) -> bool:
    """Whether DeepSpeed keeps ``p``'s fp32 master copy (ZeRO 1-3, bf16)."""
    return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")


def _masters(engine: Engine) -> dict[int, dict[str, torch.Tensor]]:
    """DeepSpeed's bf16/fp16 wrappers without ZeRO keep fp32 master weights that AdamW steps:
    ``FP16_UnfusedOptimizer`` one per parameter (``fp32_groups``), ``FP16_Optimizer`` one flat
    tensor per group, its parameters concatenated in order (``fp32_groups_flat``). Views of each
    parameter's master and moments, by ``id`` of the parameter (empty for other optimizers)."""
    opt = engine.ds.optimizer
    groups = getattr(opt, "fp16_groups", None)
    per_param, flats = getattr(opt, "fp32_groups", None), getattr(opt, "fp32_groups_flat", None)
    if groups is None or (per_param is None and flats is None):
        return {}
    base, views = base_optimizer(engine.ds), {}
    for i, params in enumerate(groups):
        offset = 0
        for j, p in enumerate(params):
            if per_param is not None:
                master, part = per_param[i][j], slice(None)
            else:
                master, part = flats[i], slice(offset, offset + p.numel())
                offset += p.numel()
            views[id(p)] = {"": master.data.flatten()[part].view_as(p)}
            views[id(p)] |= {m: base.state[master][m].flatten()[part].view_as(p) for m in MOMENTS}
    return views


def _whole(engine: Engine, p: torch.nn.Parameter, masters: dict) -> dict[str, torch.Tensor]:
    """``p``'s fp32 weight and moments, whole over ZeRO partitions (collective under ZeRO)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if id(p) in masters:
        out = masters[id(p)]
    elif _zero(p):
        out = {"": safe_get_full_fp32_param(p)}
        out |= {m: safe_get_full_optimizer_state(p, m) for m in MOMENTS}
    else:
        state = base_optimizer(engine.ds).state[p]
        out = {"": p.detach(), **{m: state[m] for m in MOMENTS}}
    return {k: v.detach().float().reshape(p.ds_shape if hasattr(p, "ds_shape") else p.shape) for k, v in out.items()}


def replicas(engine: Engine) -> tuple[int, int]:
    """(this rank's index, count) among the ranks that hold the same parameters."""
    state = engine.layout.model_parallel
    if state is None:
        return engine.layout.dp_rank, engine.layout.dp
    from megatron.core import parallel_state as ps

    group = ps.get_data_parallel_group(with_context_parallel=True)
    return group.rank(), group.size()


def write_model(engine: Engine, folder: Path) -> list[Path]:
    """Collective: this rank's share of the weights and moments into ``folder``; its files."""
    state = engine.layout.model_parallel
    tp_rank, pp_rank = (state.tp_rank, state.pp_rank) if state else (0, 0)
    splits = stage_splits(engine.cfg.model, state.pp if state else 1, pp_rank)
    me, writers = replicas(engine)
    params = list(engine.ds.module.named_parameters())
    size = {name: getattr(p, "ds_numel", p.numel()) for name, p in params}  # ZeRO-3: the whole size
    load, owner = [0] * writers, {}
    for name in sorted(size, key=lambda n: -size[n]):
        owner[name] = min(range(writers), key=load.__getitem__)
        load[owner[name]] += size[name]
    tensors, masters = {}, _masters(engine)
    for name, p in params:
        whole = _whole(engine, p, masters)  # every replica takes part in the gathering
        if owner[name] == me and (tp_rank == 0 or splits[name] is not None):
            for what, t in whole.items():
                tensors[f"{name}.{what}" if what else name] = t.cpu().contiguous()
    if not tensors:
        return []
    return [write_tensors(model_file(folder, tp_rank, pp_rank, me), tensors)]


def optimizer_steps(engine: Engine) -> int:
    """AdamW's step count (the updates applied), the same on every rank."""
    steps = [int(s["step"]) for s in base_optimizer(engine.ds).state.values() if "step" in s]
    return max(comm.all_gather_objects(max(steps, default=0)))


def restore_model(engine: Engine, reader: ParamReader, steps: int) -> None:
    """Collective: set this rank's weights, fp32 master copies, AdamW moments and step count from
    a checkpoint saved under any layout (``init_optimizer_state`` must have run)."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    state = engine.layout.model_parallel
    tp_rank, tp = (state.tp_rank, state.tp) if state else (0, 1)
    splits = stage_splits(engine.cfg.model, state.pp if state else 1, state.pp_rank if state else 0)
    base, masters = base_optimizer(engine.ds), _masters(engine)
    for name, p in engine.ds.module.named_parameters():
        split = splits[name]
        whole = {what: reader.full(name, what) for what in ("", *MOMENTS)}
        mine = {k: v if split is None else cut(v, split, tp_rank, tp) for k, v in whole.items()}
        if hasattr(p, "ds_id"):  # ZeRO-3: the low-precision weight is partitioned too
            with deepspeed.zero.GatheredParameters(p, modifier_rank=0), torch.no_grad():
                p.data.copy_(mine[""].to(p.dtype))
            _set_zero3_partition(p, mine)
            continue
        with torch.no_grad():
            p.data.copy_(mine[""].to(p.dtype))
        if id(p) in masters:  # bf16/fp16 without ZeRO: their fp32 masters
            for what, view in masters[id(p)].items():
                view.copy_(mine[what])
        elif _zero(p):
            safe_set_full_fp32_param(p, mine[""].to(engine.device))
            for m in MOMENTS:
                safe_set_full_optimizer_state(p, mine[m].to(engine.device), m)
        else:
            for m in MOMENTS:
                base.state[p][m].copy_(mine[m])
    for s in base.state.values():
        s["step"] = torch.tensor(float(steps)) if torch.is_tensor(s["step"]) else steps


def _set_zero3_partition(p: torch.nn.Parameter, whole: dict[str, torch.Tensor]) -> None:
    """This rank's ZeRO-3 partition of the fp32 weight and moments (the last partitions are padded,
    which DeepSpeed's safe_set_full_* do not handle)."""
    import torch.distributed as dist
    from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

    n, rank, ranks = p.ds_tensor.numel(), dist.get_rank(p.ds_process_group), dist.get_world_size(p.ds_process_group)

    def local(t: torch.Tensor) -> torch.Tensor:
        flat = torch.nn.functional.pad(t.flatten(), (0, n * ranks - t.numel()))
        return flat[rank * n : (rank + 1) * n].to(p.ds_tensor.device)

    safe_set_local_fp32_param(p, local(whole[""]))
    for m in MOMENTS:
        safe_set_local_optimizer_state(p, local(whole[m]), m)


def restore_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, steps: int) -> None:
    """The learning-rate schedule as after ``steps`` scheduler steps (the config's lr and decay)."""
    lrs = [base * f(steps) for base, f in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
    state = {"last_epoch": steps, "_step_count": steps + 1, "_last_lr": lrs}
    scheduler.load_state_dict(scheduler.state_dict() | state)
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr


def write_rng(folder: Path, rank: int) -> Path:
    from sessa_train.checkpoint import rng_file, rng_tensors

    return write_tensors(rng_file(folder, rank), rng_tensors())
