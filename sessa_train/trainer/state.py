"""The parts of a run's state (``checkpoint.Part``): what each holds and how it is restored under
any layout. ``checkpoint.py`` turns them into files; the trainer lists them (``Trainer.parts``).

``ModelState`` (part ``model``): the engine's weights and AdamW moments in the layout-free form,
per parameter of the plain model its whole fp32 weight, exp_avg and exp_avg_sq, cut only by
tensor parallelism as the parameter is, and the optimizer's and schedule's step counts. Whole over
ZeRO partitions, so ZeRO 0-3, bf16 and every tensor x pipeline x context layout read and write
the same thing. Writing is spread over the replicas that hold the same parameters: each parameter
is written once, by the replica it is assigned to (largest first, to the least loaded), which
alone receives the other replicas' partitions of it; parameters that tensor parallelism does not
cut only by the tensor rank that ``owns`` them. Reading, each rank reads only the bytes it holds
(its tensor-parallel cut, and of that its ZeRO partition) from whatever layout saved them.

``RngState`` (part ``rng``): each rank's random state, restored when the layout is unchanged.
``LoaderState`` (part ``loader``): the job's data position (``data/loader.py``).
The metrics sink (``trainer/metrics.py``) is the part ``metrics``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

from sessa_train import distributed as comm
from sessa_train.checkpoint import MOMENTS, Layout, Meta, ParamReader, model_shard, rng_shard
from sessa_train.data import merge_loader_states
from sessa_train.errors import DataError
from sessa_train.parallel.layout import stage_splits
from sessa_train.trainer.engine import Engine
from sessa_train.trainer.optim import base_optimizer

COUNTERS = ("global_steps", "global_samples", "skipped_steps")  # DeepSpeed engine's own


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


def _replicas(engine: Engine) -> tuple[int, int]:
    """(this rank's index, count) among the ranks that hold the same parameters."""
    group = engine.state.replica_group()
    if group is None:
        return engine.state.dp_rank, engine.state.dp
    return group.rank(), group.size()


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


class ModelState:
    """Part ``model``: the engine's weights, moments and step counts (module docstring)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.optimizer_steps = 0
        self.read_report: ReadReport | None = None  # set by a load

    # -- JSON: step counts ------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Collective: AdamW's step count (the same on every rank), the schedule's, DeepSpeed's counters."""
        ds = self.engine.ds
        steps = [int(s["step"]) for s in base_optimizer(ds).state.values() if "step" in s]
        return {
            "optimizer_steps": max(comm.all_gather_objects(max(steps, default=0))),
            "scheduler_steps": self.engine.scheduler.last_epoch,
            **{k: getattr(ds, k) for k in COUNTERS},
        }

    def load_state_dict(self, state: dict) -> None:
        self.optimizer_steps = state["optimizer_steps"]
        _restore_schedule(self.engine.scheduler, state["scheduler_steps"])
        for counter in COUNTERS:
            setattr(self.engine.ds, counter, state[counter])

    # -- tensors ----------------------------------------------------------------------------
    def tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """Collective: this rank's share of the weights and moments, as one shard (or none)."""
        engine, state = self.engine, self.engine.state
        splits = stage_splits(engine.cfg.model, state.pp, state.pp_rank, state.vp)
        me, writers = _replicas(engine)
        params = list(engine.ds.module.named_parameters())
        size = {name: getattr(p, "ds_numel", p.numel()) for name, p in params}  # ZeRO-3: the whole size
        load, owner = [0] * writers, {}
        for name in sorted(size, key=lambda n: -size[n]):
            owner[name] = min(range(writers), key=load.__getitem__)
            load[owner[name]] += size[name]
        tensors, masters, group = {}, _masters(engine), engine.state.replica_group()
        for name, p in params:
            if not state.owns(splits[name]):  # written by tensor rank 0's replicas (all of them skip it here)
                continue
            whole = _whole(engine, p, masters, comm.global_rank(group, owner[name]))  # every replica takes part
            if owner[name] == me:
                for what, t in whole.items():
                    tensors[f"{name}.{what}" if what else name] = t
        return {model_shard(state.tp_rank, state.pp_rank, me): tensors} if tensors else {}

    def load_tensors(self, shards: Mapping[str, object], meta: Meta) -> None:
        """Collective: this rank's weights, fp32 masters, AdamW moments and step count from a
        checkpoint saved under any layout (``init_optimizer_state`` must have run). Each rank reads
        only what it holds: its tensor-parallel cut of each parameter of its stage and, where
        ZeRO partitions the fp32 state, only its partition of that cut; the low-precision weights
        that ZeRO 1-2 keep whole on every replica are then all-gathered from the partitions, as
        DeepSpeed does after each step (``update_lp_params``)."""
        import time

        start = time.perf_counter()
        engine, state = self.engine, self.engine.state
        reader = ParamReader(shards, engine.cfg.model, meta.layout.tensor, meta.layout.pipeline)
        splits = stage_splits(engine.cfg.model, state.pp, state.pp_rank, state.vp)
        base, masters, fragments, held = base_optimizer(engine.ds), _masters(engine), False, 0
        for name, p in engine.ds.module.named_parameters():
            where = {} if splits[name] is None else {"rank": state.tp_rank, "ranks": state.tp}

            def read(what: str, flat: tuple[int, int] | None = None, name: str = name, where: dict = where):
                return reader.region(name, what, **where, flat=flat)

            if hasattr(p, "ds_id"):  # ZeRO-3: the rank's partition of the flattened cut, padded
                held += 12 * _set_zero3_partition(p, read)
                continue
            if id(p) in masters:  # bf16/fp16 without ZeRO: their fp32 masters
                mine = {what: read(what) for what in ("", *MOMENTS)}
                with torch.no_grad():
                    p.data.copy_(mine[""].to(p.dtype))
                for what, view in masters[id(p)].items():
                    view.copy_(mine[what])
            elif hasattr(p, "_hp_mapping"):  # ZeRO 1-2, DeepSpeed's bf16 optimizer: this rank's fragment
                fragments = True
                if (mapping := p._hp_mapping) is not None:
                    at = mapping.lp_fragment_address
                    held += 12 * at.numel
                    for what in ("", *MOMENTS):
                        part = read(what, (at.start, at.start + at.numel))
                        mapping.get_hp_fragment(what or None).data.copy_(part)
            else:
                with torch.no_grad():
                    p.data.copy_(read("").to(p.dtype))
                for m in MOMENTS:
                    base.state[p][m].copy_(read(m))
            if not hasattr(p, "_hp_mapping"):  # the rank holds its whole cut
                held += 12 * p.numel()
        if fragments:
            engine.ds.optimizer.update_lp_params()  # the replicas' whole weights from every partition
        steps = self.optimizer_steps
        for s in base.state.values():
            s["step"] = torch.tensor(float(steps)) if torch.is_tensor(s["step"]) else steps
        reads = comm.all_gather_objects((reader.bytes_read, held, time.perf_counter() - start))
        self.read_report = ReadReport(
            largest=max(b for b, _, _ in reads),
            total=sum(b for b, _, _ in reads),
            over_held=max(b / max(h, 1) for b, h, _ in reads),
            seconds=max(s for _, _, s in reads),
        )


@dataclasses.dataclass(frozen=True)
class ReadReport:
    """What a load read of the model part: the largest rank's bytes, all ranks' bytes, the
    largest ratio of a rank's bytes read to the fp32 weight and moment bytes it holds, the slowest
    rank's seconds."""

    largest: int
    total: int
    over_held: float
    seconds: float

    def phrase(self) -> str:
        return (f"model tensors read: {self.largest / 2**20:.2f} MiB on the largest rank, "
                f"{self.total / 2**20:.2f} MiB on all, at most {self.over_held:.2f} x what a rank holds, "
                f"{self.seconds:.2f} s")  # fmt: skip


def _restore_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, steps: int) -> None:
    """The learning-rate schedule as after ``steps`` scheduler steps (the config's lr and decay)."""
    lrs = [base * f(steps) for base, f in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
    state = {"last_epoch": steps, "_step_count": steps + 1, "_last_lr": lrs}
    scheduler.load_state_dict(scheduler.state_dict() | state)
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr


class RngState:
    """Part ``rng``: this rank's torch (and CUDA) random state, restored when the checkpoint was
    saved under this very layout (nothing in a step draws random numbers; kept for exactness)."""

    def __init__(self, rank: int, layout: Layout) -> None:
        self.rank, self.layout = rank, layout

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        out = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            out |= {f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
        return {rng_shard(self.rank): out}

    def load_tensors(self, shards: Mapping[str, object], meta: Meta) -> None:
        fh = shards.get(rng_shard(self.rank))
        if meta.layout != self.layout or fh is None:
            return
        torch.set_rng_state(fh.get_tensor("torch"))
        cuda = [fh.get_tensor(k) for k in sorted(fh.keys()) if k.startswith("cuda.")]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)


class LoaderState:
    """Part ``loader``: the job's data position, one for every rank (the skipped shards of all)."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def state_dict(self) -> dict:
        return merge_loader_states(comm.all_gather_objects(self.loader.state_dict()))

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)

    @staticmethod
    def slots(state: dict):
        """The reader slots a saved state was read with (a list for a blend): a run keeps them."""
        return state["slots"]

    @staticmethod
    def check_sources(state: dict, weights: list[float] | None, name: str) -> None:
        """A run keeps its blend (``weights``; None: one data.path) and its weights for its lifetime."""
        if state.get("weights") != weights:
            was = f"a blend with weights {state['weights']}" if "weights" in state else "one data.path"
            now = f"data.blend with weights {weights}" if weights else "one data.path"
            raise DataError(f"{name} was read from {was}; this run has {now}")
