"""The model part (``model``): the weights and AdamW moments of a run, in a layout-free form.

Per parameter of the plain model, its whole fp32 weight, exp_avg and exp_avg_sq, cut only by
tensor parallelism as the parameter is, in shards ``model/tp{t}-pp{p}-{k}.safetensors`` (the
parameters tensor rank t of stage p holds, under the plain model's names, written by replica k),
and in the JSON record the optimizer's and schedule's step counts. Whole over ZeRO partitions, so
ZeRO 0-3, bf16 and every tensor x pipeline x context layout read and write the same thing.

Writing is spread over the replicas that hold the same parameters: each parameter is written
once, by the replica it is assigned to (largest first, to the least loaded), which alone receives
the other replicas' partitions of it; parameters that tensor parallelism does not cut only by the
tensor rank that ``owns`` them. Reading (``ParamReader``), each rank reads only the bytes it holds
(its tensor-parallel cut, and of that its ZeRO partition) from whatever layout saved them.
``read_weights`` gives the plain fp32 weights of any checkpoint (export, evaluation).

How the engine keeps those tensors (DeepSpeed's ZeRO partitions, fp32 masters) is the engine's
business: ``ModelState`` talks to it through ``Fp32Access`` (``trainer/fp32.py``).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Protocol

import torch

from sessa_train import distributed as comm
from sessa_train.checkpoint.format import (
    Meta,
    check_files,
    find_checkpoint,
    read_config,
    read_meta,
    shard_files,
    tokenizer_file,
)
from sessa_train.config import ModelConfig
from sessa_train.errors import CheckpointError
from sessa_train.parallel.layout import stage_splits
from sessa_train.parallel.state import ParallelState

MODEL = "model"
MOMENTS = ("exp_avg", "exp_avg_sq")
WHAT = ("", *MOMENTS)  # a parameter's tensors: its weight (""), then its moments
SHARD = re.compile(r"tp(\d+)-pp(\d+)-(\d+)")


def model_shard(tensor_rank: int, stage: int, replica: int) -> str:
    return f"tp{tensor_rank}-pp{stage}-{replica}"


Read = Callable[[str, "tuple[int, int] | None"], torch.Tensor]


class Fp32Access(Protocol):
    """How an engine gives and takes each parameter's fp32 weight and AdamW moments, and its step
    counts (``trainer/fp32.py`` for DeepSpeed)."""

    def parameters(self) -> Iterable[tuple[str, torch.nn.Parameter]]: ...

    def numel(self, p: torch.nn.Parameter) -> int: ...

    def whole(self, p: torch.nn.Parameter, writer: int) -> dict[str, torch.Tensor]:
        """Collective over ``p``'s replicas: its weight and moments (``WHAT``), whole, on global
        rank ``writer``; empty elsewhere."""
        ...

    def load(self, p: torch.nn.Parameter, read: Read) -> int:
        """``p``'s state from ``read(what, flat)`` (its cut, or elements a..b-1 of it flattened);
        the elements this rank holds."""
        ...

    def finish_load(self, optimizer_steps: int) -> None: ...

    def progress(self) -> dict:
        """Collective: the optimizer's and schedule's step counts and the engine's counters."""
        ...

    def restore_progress(self, state: dict) -> int:
        """The counts of ``progress``, restored but for the optimizer's (returned, for ``finish_load``)."""
        ...


class ModelState:
    """Part ``model`` (module docstring), of an engine ``fp32`` holding its parameters under ``state``."""

    def __init__(self, fp32: Fp32Access, cfg: ModelConfig, state: ParallelState) -> None:
        self.fp32, self.cfg, self.state = fp32, cfg, state
        self.optimizer_steps = 0
        self.read_report: ReadReport | None = None  # set by a load

    def state_dict(self) -> dict:
        return self.fp32.progress()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer_steps = self.fp32.restore_progress(state)

    def tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """Collective: this rank's share of the weights and moments, as one shard (or none)."""
        state = self.state
        splits = stage_splits(self.cfg, state.pp, state.pp_rank, state.vp)
        group = state.replica_group()
        me, writers = (state.dp_rank, state.dp) if group is None else (group.rank(), group.size())
        params = list(self.fp32.parameters())
        size = {name: self.fp32.numel(p) for name, p in params}
        load, owner = [0] * writers, {}
        for name in sorted(size, key=lambda n: -size[n]):
            owner[name] = min(range(writers), key=load.__getitem__)
            load[owner[name]] += size[name]
        tensors = {}
        for name, p in params:
            if not state.owns(splits[name]):  # written by tensor rank 0's replicas (all of them skip it here)
                continue
            whole = self.fp32.whole(p, comm.global_rank(group, owner[name]))  # every replica takes part
            if owner[name] == me:
                for what, t in whole.items():
                    tensors[f"{name}.{what}" if what else name] = t
        return {model_shard(state.tp_rank, state.pp_rank, me): tensors} if tensors else {}

    def load_tensors(self, shards: Mapping[str, object], meta: Meta) -> None:
        """Collective: this rank's weights, fp32 masters, AdamW moments and step count from a
        checkpoint saved under any layout. Each rank reads only what it holds: its
        tensor-parallel cut of each parameter of its stage and, where ZeRO partitions the fp32
        state, only its partition of that cut."""
        start, state = time.perf_counter(), self.state
        reader = ParamReader(shards, self.cfg, meta.layout.tensor, meta.layout.pipeline)
        splits = stage_splits(self.cfg, state.pp, state.pp_rank, state.vp)
        held = 0
        for name, p in self.fp32.parameters():
            where = {} if splits[name] is None else {"rank": state.tp_rank, "ranks": state.tp}

            def read(what: str, flat: tuple[int, int] | None = None, name: str = name, where: dict = where):
                return reader.region(name, what, **where, flat=flat)

            held += 12 * self.fp32.load(p, read)
        self.fp32.finish_load(self.optimizer_steps)
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


class ParamReader:
    """Weights and AdamW moments of the model part, read from the tensor-parallel shards
    (``model_shard`` names) they were saved in, under any later layout: ``region`` reads one
    rank's tensor-parallel cut of a parameter, or a flat range of that cut (its ZeRO partition),
    touching only the bytes of the saved pieces that overlap it (``safe_open(...).get_slice``);
    ``full`` is the whole tensor. ``bytes_read`` counts the tensor bytes materialised."""

    def __init__(self, shards: Mapping[str, object], cfg: ModelConfig, tensor: int, pipeline: int) -> None:
        self.tensor, self.bytes_read = tensor, 0
        self.splits = {n: split for stage in range(pipeline) for n, split in stage_splits(cfg, pipeline, stage).items()}
        self.where: dict[str, dict[int, object]] = {}  # key -> tensor rank -> open file
        for shard, fh in shards.items():
            match = SHARD.fullmatch(shard)
            if match is None or int(match[1]) >= tensor or int(match[2]) >= pipeline:
                raise CheckpointError(
                    f"model shard {shard!r} does not belong to a tensor={tensor} x pipeline={pipeline} checkpoint"
                )
            for key in fh.keys():  # noqa: SIM118 (safe_open has no __iter__)
                self.where.setdefault(key, {})[int(match[1])] = fh
        # a tied LM head is the embedding: only the embedding is a parameter
        self.names = [n for n in self.splits if n in self.where]

    def full(self, name: str, what: str = "") -> torch.Tensor:
        """The whole tensor of parameter ``name`` (``what``: "" for the weight, or a moment)."""
        return self.region(name, what)

    def region(
        self, name: str, what: str = "", rank: int = 0, ranks: int = 1, flat: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Tensor rank ``rank`` of ``ranks``'s cut of parameter ``name`` (``parallel/layout.py``'s
        ``cut`` of the whole; the whole tensor when it is not split), or, with ``flat=(a, b)``,
        elements a..b-1 of that cut flattened (a 1-D tensor)."""
        key = f"{name}.{what}" if what else name
        held = self.where.get(key, {})
        split = self.splits.get(name)
        ranks_saved = [min(held, default=0)] if split is None else range(self.tensor)
        if any(r not in held for r in ranks_saved):
            lacking = [r for r in ranks_saved if r not in held]
            raise CheckpointError(f"the checkpoint holds no {key!r} of tensor rank(s) {lacking}")
        piece = {r: held[r].get_slice(key) for r in ranks_saved}
        shape = list(piece[ranks_saved[0]].get_shape())
        if split is not None:
            shape[split.dim] *= self.tensor
            shape[split.dim] //= ranks
        if not shape:  # a scalar
            return self._counted(held[ranks_saved[0]].get_tensor(key))
        row = math.prod(shape[1:])
        first, stop = (0, shape[0]) if flat is None else (flat[0] // max(row, 1), -(-flat[1] // max(row, 1)))
        if split is None:
            out = self._counted(piece[ranks_saved[0]][first:stop])
        else:
            runs = _saved_runs(shape[split.dim], split.parts, rank, ranks, self.tensor)
            if split.dim == 0:  # the rows first..stop-1 of the cut, run by run
                out, at = [], 0
                for saved, lo, hi in runs:
                    a, b = max(lo, first - at + lo), min(hi, stop - at + lo)
                    if a < b:
                        out.append(self._counted(piece[saved][a:b]))
                    at += hi - lo
                out = _joined(out, 0) if out else torch.empty(0, *shape[1:])
            else:
                index = (slice(first, stop),) + (slice(None),) * (split.dim - 1)
                out = _joined([self._counted(piece[saved][(*index, slice(lo, hi))]) for saved, lo, hi in runs],
                              split.dim)  # fmt: skip
        if flat is None:
            return out
        return out.flatten()[flat[0] - first * row : flat[1] - first * row]

    def _counted(self, t: torch.Tensor) -> torch.Tensor:
        self.bytes_read += t.numel() * t.element_size()
        return t


def _joined(pieces: list[torch.Tensor], dim: int) -> torch.Tensor:
    """The saved pieces of one region side by side; one piece as it was read (no copy: the
    caller copies it into the parameter or its optimizer state anyway)."""
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)


def _saved_runs(length: int, parts: int, rank: int, ranks: int, saved: int) -> list[tuple[int, int, int]]:
    """Where rank ``rank`` of ``ranks``'s cut of a dimension lies in the pieces a checkpoint saved
    under ``saved`` tensor ranks: (saved rank, start, stop) along that dimension of the saved
    piece, in the cut's order. ``length``: the cut's length along it; the whole is ``parts``
    blocks, each cut into ``ranks`` (``saved``) chunks, block p of a piece holding its chunk of
    block p of the whole."""
    block = length // parts * ranks  # one block of the whole
    own, kept = block // ranks, block // saved  # a block's chunk in the cut, in a saved piece
    runs = []
    for p in range(parts):
        lo, hi = rank * own, (rank + 1) * own  # within block p of the whole
        while lo < hi:
            s = lo // kept
            end = min(hi, (s + 1) * kept)
            runs.append((s, p * kept + lo - s * kept, p * kept + end - s * kept))
            lo = end
    return runs


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(plain fp32 model state dict, about) of a checkpoint, whatever its layout; ``about`` has
    the resolved ``config``, ``step``, ``tokens`` and the ``tokenizer`` file it carries (None
    when it carries none) with its ``tokenizer_sha256``."""
    path = find_checkpoint(path)
    if problem := check_files(path):
        raise CheckpointError(problem)
    config, meta = read_config(path), read_meta(path)
    cfg = ModelConfig.from_dict(config["model"])
    reader = ParamReader(shard_files(path, MODEL), cfg, meta.layout.tensor, meta.layout.pipeline)
    weights = {name: reader.full(name).float() for name in reader.names}
    if cfg.tie_embeddings:
        weights["lm_head.weight"] = weights["embed.weight"]
    about = {"config": config, "step": meta.step, "tokens": meta.tokens}
    about["tokenizer"] = tokenizer_file(path)
    about["tokenizer_sha256"] = meta.data.tokenizer_sha256
    return weights, about
