"""Where each weight of the plain ``SessaLM`` lives under tensor (TP) x pipeline (PP)
parallelism, read off the one model definition.

A pipeline stage holds the weights of its part of the model, under the plain model's names
(layers keep their global index). Tensor parallelism cuts each weight as the ``Split`` its
plan recorded (``models/plan.py``), or leaves it whole. Both are read from models built on the
meta device, so nothing here lists the model's weights. ``shard_state`` cuts a plain state
dict into one rank's state and ``merge_states`` joins every rank's states back: pure functions,
exact inverses; export and checkpoint conversion go through them. ``rank_initial_state`` gives a
rank its initial weights without the whole model ever being built.
"""

from __future__ import annotations

import functools

import torch

from sessa_train.config import ModelConfig
from sessa_train.models import ModelPlan, SessaLM, Split
from sessa_train.models.lm import build_unit
from sessa_train.models.plan import parameter_splits


@functools.lru_cache(maxsize=64)
def stage_splits(cfg: ModelConfig, stages: int = 1, stage: int = 0, virtual: int = 1) -> dict[str, Split | None]:
    """State-dict name -> how TP splits it (None: replicated), for pipeline ``stage`` of ``stages``
    (with ``virtual`` model chunks each)."""
    with torch.device("meta"):
        model = SessaLM(cfg, ModelPlan(stages=stages, stage=stage, virtual=virtual))
    splits = parameter_splits(model)
    return {name: splits[name] for name in model.state_dict()}


def cut(t: torch.Tensor, split: Split, rank: int, ranks: int) -> torch.Tensor:
    """Rank ``rank``'s part of the whole tensor ``t``."""
    return torch.cat([part.chunk(ranks, split.dim)[rank] for part in t.chunk(split.parts, split.dim)], split.dim)


def join(pieces: list[torch.Tensor], split: Split) -> torch.Tensor:
    """The whole tensor from every rank's part (in rank order); the inverse of ``cut``."""
    per_rank = [p.chunk(split.parts, split.dim) for p in pieces]
    return torch.cat([torch.cat([r[i] for r in per_rank], split.dim) for i in range(split.parts)], split.dim)


def shard_state(
    plain: dict[str, torch.Tensor], cfg: ModelConfig, tp_rank: int, tp: int, pp_rank: int = 0, pp: int = 1, vp: int = 1
) -> dict[str, torch.Tensor]:
    """The state of TP rank ``tp_rank`` of pipeline stage ``pp_rank`` (``vp`` chunks), cut from a
    plain state dict."""
    return {
        name: (plain[name] if split is None else cut(plain[name], split, tp_rank, tp)).clone()
        for name, split in stage_splits(cfg, pp, pp_rank, vp).items()
    }


def rank_initial_state(
    cfg: ModelConfig, seed: int, tp_rank: int, tp: int, pp_rank: int = 0, pp: int = 1, vp: int = 1
) -> dict[str, torch.Tensor]:
    """The initial state of TP rank ``tp_rank`` of stage ``pp_rank`` for ``seed``, built one whole
    unit (embedding, layer, norm, head) at a time and cut: never more of the plain model in memory
    than one unit. Equal to ``shard_state`` of ``SessaLM(cfg)`` built after ``manual_seed(seed)``."""
    splits = stage_splits(cfg, pp, pp_rank, vp)
    state: dict[str, torch.Tensor] = {}
    for unit, make in SessaLM.units(cfg, ModelPlan(stages=pp, stage=pp_rank, virtual=vp)).items():
        for key, t in build_unit(seed, unit, make).state_dict().items():
            if (name := f"{unit}.{key}") in splits and not (cfg.tie_embeddings and name == "lm_head.weight"):
                state[name] = t if splits[name] is None else cut(t, splits[name], tp_rank, tp).clone()
    if "lm_head.weight" in splits:  # tied within the stage: the embedding's rows
        state["lm_head.weight"] = state.get("lm_head.weight", state.get("embed.weight"))
    return {name: state[name] for name in splits}


def merge_states(
    states: dict[tuple[int, int], dict[str, torch.Tensor]], cfg: ModelConfig, vp: int = 1
) -> dict[str, torch.Tensor]:
    """A plain SessaLM state dict from every rank's state, keyed by (pp_rank, tp_rank) (``vp``
    model chunks per stage)."""
    pp = 1 + max(p for p, _ in states)
    tp = 1 + max(t for _, t in states)
    missing = [(p, t) for p in range(pp) for t in range(tp) if (p, t) not in states]
    if missing:
        raise ValueError(f"stage states missing for (pipeline, tensor) ranks {missing}")
    plain = {}
    for stage in range(pp):
        for name, split in stage_splits(cfg, pp, stage, vp).items():
            pieces = [states[(stage, r)][name] for r in range(tp)]
            plain[name] = pieces[0] if split is None else join(pieces, split)
    if cfg.tie_embeddings:
        plain["lm_head.weight"] = plain["embed.weight"]
    return plain
