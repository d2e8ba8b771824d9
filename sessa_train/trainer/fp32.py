"""The fp32 weights and AdamW moments DeepSpeed keeps, per parameter, for the checkpoint's model
part (``checkpoint/model.py``'s ``Fp32Access``): whole on the replica that writes them, and
each rank's share set from what it reads. DeepSpeed keeps them in four ways: ZeRO-3's equal
(padded) partitions of the flattened tensor, ZeRO 1-2's (and its bf16 optimizer's) fragments,
the fp32 masters of its bf16/fp16 wrappers without ZeRO, and the plain optimizer's own state.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from sessa_train import distributed as comm
from sessa_train.checkpoint.model import MOMENTS, WHAT, Read
from sessa_train.trainer.engine import Engine
from sessa_train.trainer.optim import base_optimizer

COUNTERS = ("global_steps", "global_samples", "skipped_steps")  # DeepSpeed engine's own


class DeepSpeedFp32:
    """``Fp32Access`` of an ``Engine`` (views of the fp32 masters taken once, at construction)."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.ds = engine, engine.ds
        self.masters = _masters(engine)
        self.fragments = False  # a load set ZeRO 1-2 fragments: the replicas' weights follow

    def parameters(self) -> Iterable[tuple[str, torch.nn.Parameter]]:
        return self.ds.module.named_parameters()

    def numel(self, p: torch.nn.Parameter) -> int:
        return getattr(p, "ds_numel", p.numel())  # ZeRO-3: the whole size

    def whole(self, p: torch.nn.Parameter, writer: int) -> dict[str, torch.Tensor]:
        return _whole(self.engine, p, self.masters, writer)

    def load(self, p: torch.nn.Parameter, read: Read) -> int:
        if hasattr(p, "ds_id"):  # ZeRO-3: the rank's partition of the flattened cut, padded
            return _set_zero3_partition(p, read)
        if id(p) in self.masters:  # bf16/fp16 without ZeRO: their fp32 masters
            mine = {what: read(what, None) for what in WHAT}
            with torch.no_grad():
                p.data.copy_(mine[""].to(p.dtype))
            for what, view in self.masters[id(p)].items():
                view.copy_(mine[what])
            return p.numel()
        if hasattr(p, "_hp_mapping"):  # ZeRO 1-2, DeepSpeed's bf16 optimizer: this rank's fragment
            self.fragments = True
            if (mapping := p._hp_mapping) is None:
                return 0
            at = mapping.lp_fragment_address
            for what in WHAT:
                mapping.get_hp_fragment(what or None).data.copy_(read(what, (at.start, at.start + at.numel)))
            return at.numel
        state = base_optimizer(self.ds).state[p]
        with torch.no_grad():
            p.data.copy_(read("", None).to(p.dtype))
        for m in MOMENTS:
            state[m].copy_(read(m, None))
        return p.numel()

    def finish_load(self, optimizer_steps: int) -> None:
        """The low-precision weights that ZeRO 1-2 keep whole on every replica all-gathered from the
        partitions, as DeepSpeed does after each step (``update_lp_params``); AdamW's step counts."""
        if self.fragments:
            self.ds.optimizer.update_lp_params()
        for s in base_optimizer(self.ds).state.values():
            s["step"] = torch.tensor(float(optimizer_steps)) if torch.is_tensor(s["step"]) else optimizer_steps

    def progress(self) -> dict:
        """Collective: AdamW's step count (the same on every rank), the schedule's, DeepSpeed's counters."""
        steps = [int(s["step"]) for s in base_optimizer(self.ds).state.values() if "step" in s]
        return {
            "optimizer_steps": max(comm.all_gather_objects(max(steps, default=0))),
            "scheduler_steps": self.engine.scheduler.last_epoch,
            **{k: getattr(self.ds, k) for k in COUNTERS},
        }

    def restore_progress(self, state: dict) -> int:
        _restore_schedule(self.engine.scheduler, state["scheduler_steps"])
        for counter in COUNTERS:
            setattr(self.ds, counter, state[counter])
        return state["optimizer_steps"]


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


def _whole(engine: Engine, p: torch.nn.Parameter, masters: dict, writer: int | None) -> dict[str, torch.Tensor]:
    """``p``'s fp32 weight and moments, whole over ZeRO partitions, on the replica that writes
    them (global rank ``writer``; None: this rank holds them whole). A collective over the ZeRO
    group where the state is partitioned: each rank's partition goes to the writer only (a
    reduce of the fragments, a gather of ZeRO-3's equal partitions), not to every replica as
    DeepSpeed's ``safe_get_full_*`` would send it. Empty on the other replicas."""
    if id(p) in masters:
        out = masters[id(p)]
    elif hasattr(p, "ds_id"):  # ZeRO-3: equal (padded) partitions of the flattened tensor
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

        local = {"": safe_get_local_fp32_param(p), **{m: safe_get_local_optimizer_state(p, m) for m in MOMENTS}}
        out = {}
        for what, t in local.items():
            parts = comm.gather(t.detach().float(), writer, p.ds_process_group)
            if parts is not None:
                out[what] = torch.cat(parts)[: p.ds_numel]
    elif hasattr(p, "_hp_mapping"):  # ZeRO 1-2, DeepSpeed's bf16 optimizer: a fragment or none per rank
        mapping, out = p._hp_mapping, {}
        if comm.size(p._dp_group) == 1:  # no partitions to gather: the fragment is the whole
            return {what: mapping.get_hp_fragment(what or None).detach().view(p.shape) for what in ("", *MOMENTS)}
        for what in ("", *MOMENTS):
            buffer = torch.zeros(p.numel(), dtype=torch.float32, device=comm.comm_device(p._dp_group))
            if mapping is not None:
                at = mapping.lp_fragment_address
                buffer[at.start : at.start + at.numel] = mapping.get_hp_fragment(what or None).detach().flatten()
            comm.reduce(buffer, writer, p._dp_group)
            if comm.rank() == writer:
                out[what] = buffer
    else:
        state = base_optimizer(engine.ds).state[p]
        out = {"": p.detach(), **{m: state[m] for m in MOMENTS}}
    shape = p.ds_shape if hasattr(p, "ds_shape") else p.shape
    return {k: v.detach().float().reshape(shape) for k, v in out.items()}


def _set_zero3_partition(p: torch.nn.Parameter, read) -> int:
    """This rank's ZeRO-3 partition of the weight, its fp32 master and moments, from
    ``read(what, (a, b))`` (elements a..b-1 of the flattened tensor): the last partitions are
    padded, which DeepSpeed's safe_set_full_* do not handle."""
    import torch.distributed as dist
    from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

    n, rank, numel = p.ds_tensor.numel(), dist.get_rank(p.ds_process_group), p.ds_numel
    a, b = min(rank * n, numel), min((rank + 1) * n, numel)

    def local(what: str) -> torch.Tensor:
        part = read(what, (a, b)) if a < b else torch.zeros(0)
        return torch.nn.functional.pad(part, (0, n - part.numel())).to(p.ds_tensor.device)

    weight = local("")
    with torch.no_grad():
        p.ds_tensor.copy_(weight.to(p.ds_tensor.dtype))
    safe_set_local_fp32_param(p, weight)
    for m in MOMENTS:
        safe_set_local_optimizer_state(p, local(m), m)
    return b - a


def _restore_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, steps: int) -> None:
    """The learning-rate schedule as after ``steps`` scheduler steps (the config's lr and decay)."""
    lrs = [base * f(steps) for base, f in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
    state = {"last_epoch": steps, "_step_count": steps + 1, "_last_lr": lrs}
    scheduler.load_state_dict(scheduler.state_dict() | state)
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
