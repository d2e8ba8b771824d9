"""Where each weight of the plain ``SessaLM`` lives under tensor (TP) x pipeline (PP) parallelism.

Pure functions, no communication: ``shard_lm_state`` cuts a plain state dict into one rank's
stage state, ``merge_lm_states`` puts all ranks' stage states back together. They are exact
inverses; checkpoint conversion, export and the trainer's initialisation all go through them.

Per Sessa layer (names of ``models/layer.py`` -> ``parallel/tensor_parallel.py``), P = TP size:

    row     split along dim 0 (column-parallel output features, vocab rows, heads)
    col     split along dim 1 (row-parallel input features)
    rep     replicated on every TP rank

Layers are split over pipeline stages in contiguous blocks; when n_layers % PP != 0 the
first stages take one layer more. Stage-local layer j of stage r is global layer
``stage_layers(n, PP, r)[j]``.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from sessa_train.config import ModelConfig

Spec = tuple[str, str, slice | None, str]  # (stage name, plain name, rows of the plain tensor, split)


def stage_layers(n_layers: int, stages: int, stage: int) -> range:
    """Global indices of the layers held by pipeline ``stage`` (of ``stages``)."""
    base, extra = divmod(n_layers, stages)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (stage < extra))


def layer_spec(cfg: ModelConfig) -> list[Spec]:
    """How each TPSessaLayer parameter is cut from the plain SessaLayer."""
    D = cfg.d_model
    spec: list[Spec] = [("norm.weight", "norm.weight", None, "rep"), ("norm.bias", "norm.bias", None, "rep")]
    for part, rows in (("in_a", slice(0, D)), ("in_g", slice(D, 2 * D))):
        spec += [(f"{part}.weight", "in_proj.weight", rows, "row"), (f"{part}.bias", "in_proj.bias", rows, "row")]
    for name in ("q_proj", "k_proj", "v_proj"):
        spec += [(f"{name}.{p}", f"mixer.{name}.{p}", None, "row") for p in ("weight", "bias")]
    spec.append(("o_proj.weight", "mixer.o_proj.weight", None, "col"))
    if cfg.feedback_heads == 1:  # the single feedback head is replicated
        for name in ("fb_proj.weight", "fb_proj.bias", "gamma_proj.weight", "gamma_bias"):
            spec.append((name, f"mixer.{name}", None, "rep"))
    else:  # feedback heads split over ranks
        for part, rows in (("fb_q", slice(0, D)), ("fb_k", slice(D, 2 * D))):
            spec += [(f"{part}.{p}", f"mixer.fb_proj.{p}", rows, "row") for p in ("weight", "bias")]
        spec += [("gamma_proj.weight", "mixer.gamma_proj.weight", None, "row")]
        spec += [("gamma_bias", "mixer.gamma_bias", None, "row")]
    spec += [("out_proj.weight", "out_proj.weight", None, "col"), ("out_proj.bias", "out_proj.bias", None, "rep")]
    return spec


def lm_spec(cfg: ModelConfig, stages: int, stage: int) -> list[Spec]:
    """The spec of one whole pipeline stage of the LM."""
    spec: list[Spec] = []
    if stage == 0:
        spec.append(("embed.weight", "embed.weight", None, "row"))  # vocab-parallel rows
    for j, i in enumerate(stage_layers(cfg.n_layers, stages, stage)):
        spec += [(f"layers.{j}.{s}", f"layers.{i}.{p}", rows, how) for s, p, rows, how in layer_spec(cfg)]
    if stage == stages - 1:
        spec += [("norm.weight", "norm.weight", None, "rep"), ("norm.bias", "norm.bias", None, "rep")]
        if not cfg.tie_embeddings:
            spec.append(("lm_head.weight", "lm_head.weight", None, "row"))
    return spec


def shard(plain: dict[str, torch.Tensor], spec: list[Spec], tp_rank: int, tp: int) -> dict[str, torch.Tensor]:
    """The parameters of TP rank ``tp_rank`` named by ``spec``, cut from a plain state dict."""
    out = {}
    for name, source, rows, how in spec:
        t = plain[source] if rows is None else plain[source][rows]
        if how != "rep":
            t = t.chunk(tp, dim=0 if how == "row" else 1)[tp_rank]
        out[name] = t.clone()
    return out


def shard_lm_state(
    plain: dict[str, torch.Tensor], cfg: ModelConfig, tp_rank: int, tp: int, pp_rank: int = 0, pp: int = 1
) -> dict[str, torch.Tensor]:
    """One (pp_rank, tp_rank) stage state from a plain SessaLM state dict."""
    return shard(plain, lm_spec(cfg, pp, pp_rank), tp_rank, tp)


def merge_lm_states(
    states: dict[tuple[int, int], dict[str, torch.Tensor]], cfg: ModelConfig
) -> dict[str, torch.Tensor]:
    """A plain SessaLM state dict from every rank's stage state, keyed by (pp_rank, tp_rank)."""
    pp = 1 + max(p for p, _ in states)
    tp = 1 + max(t for _, t in states)
    missing = [(p, t) for p in range(pp) for t in range(tp) if (p, t) not in states]
    if missing:
        raise ValueError(f"stage states missing for (pipeline, tensor) ranks {missing}")
    pieces: dict[str, list[tuple[int, torch.Tensor]]] = defaultdict(list)
    for stage in range(pp):
        for name, source, rows, how in lm_spec(cfg, pp, stage):
            parts = [states[(stage, r)][name] for r in range(tp)]
            t = parts[0] if how == "rep" else torch.cat(parts, dim=0 if how == "row" else 1)
            pieces[source].append((0 if rows is None else rows.start, t))
    plain = {k: torch.cat([t for _, t in sorted(v, key=lambda x: x[0])]) for k, v in pieces.items()}
    if cfg.tie_embeddings:
        plain["lm_head.weight"] = plain["embed.weight"]
    return plain
