"""TP x PP x CP x DP (megatron-core + DeepSpeed, gloo, 4 processes) against the 1-process model.

One spawn of 4 ranks walks through the layouts (tensor, pipeline, context, zero stage); data
parallelism fills the rest (DP = 4 / (TP x PP x CP)). For each, two optimizer steps go through
exactly what the trainer builds and runs (``trainer.build_engine``: the model under
``MegatronPlan``, ``PipelineRunner`` on megatron-core's schedule, DeepSpeed's gradient
reduction, clipping and AdamW). The loss of every step (relative 1e-5), under ZeRO-0 every
gradient merged back to the plain layout (within 1e-5 of the step's largest gradient entry), and
the gradient norm before clipping that the trainer logs (DeepSpeed's under ZeRO 1-3,
``Engine.grad_norm`` without; relative 1e-6) must equal the 1-process model's (which steps the
trainer's AdamW and learning-rate schedule). Sequence parallelism is on wherever TP > 1 (the
default); TP2, TP2 x PP2 and TP2 x CP2 run 6 steps with it (ZeRO-0: every gradient compared at
every step), and two layouts switch it off. DeepSpeed's reduction overlaps the backward under
data parallelism alone with ZeRO 1-3 (the default; ZeRO-2 in buckets of 300 elements) and not
(one ZeRO-1 layout). AdamW's eps is
large so that the update depends on the gradient's scale: a wrong gradient norm (hence
clipping) shows up.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
from typing import NamedTuple

import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("megatron.core", reason="megatron-core (dev extra) is needed")
pytestmark = pytest.mark.slow

WORLD, SEQS, N_MICRO, T = 4, 4, 2, 12  # SEQS: sequences per micro-batch over all DP ranks


class Layout(NamedTuple):
    """feedback_heads=1 is the paper's single head (replicated over TP ranks, its gradients
    all-reduced), 2 splits the heads over TP; context=2 splits every sequence over 2 ranks (K/V
    all-gather, ring solve); ``model`` adds model keys (the MLP sub-block, the Transformer
    baseline); ``backend`` sets SESSA_FEEDBACK_BACKEND (the Triton kernels run in the interpreter)."""

    tensor: int
    pipeline: int
    context: int
    zero: int
    tie: bool
    feedback_heads: int
    model: tuple = ()
    backend: str | None = None
    compute: tuple = ()  # compute keys of the parallel run (the 1-process reference keeps the default)
    documents: bool = False  # packed documents (data.document_masking): the batches carry position_ids
    scored: bool = False  # scored shards: own targets, a loss mask on a quarter of them (uneven over ranks)
    sequence_parallel: bool = True  # parallel.sequence_parallel (acts with tensor > 1)
    steps: int = 2
    parallel: tuple = ()  # more parallel keys (DeepSpeed's overlap_comm and bucket size)


LAYOUTS = [
    # no model parallelism first (DeepSpeed keeps the last engine's mpu): the plain path, DP = 4;
    # DeepSpeed's reduction overlaps the backward under ZeRO 1-3 (the default; ZeRO-2 in buckets of
    # 300 elements), and not in the last of these
    Layout(1, 1, 1, 0, True, 1),
    Layout(1, 1, 1, 2, False, 1, parallel=(("bucket_size", 300),)),
    Layout(1, 1, 1, 3, True, 1),
    Layout(1, 1, 1, 0, True, 1, documents=True, scored=True),  # packed documents, DP = 4
    Layout(1, 1, 1, 1, False, 1, parallel=(("overlap_comm", False),)),
    # sequence parallelism is on wherever tensor > 1 (the default); 6 steps of TP2, TP2 x PP2, TP2 x CP2
    Layout(2, 2, 1, 0, True, 1),
    Layout(2, 1, 1, 0, False, 2, steps=6),
    Layout(1, 2, 1, 0, False, 1),
    Layout(2, 2, 1, 1, True, 2),
    Layout(2, 2, 1, 0, False, 2),
    Layout(2, 1, 2, 0, True, 1),
    Layout(1, 2, 2, 1, False, 2),
    Layout(2, 2, 1, 0, False, 2, (("ffn_hidden_size", 48),), steps=6),
    Layout(2, 1, 1, 0, True, 1, (("arch", "transformer"),)),
    Layout(2, 1, 2, 0, False, 1, (("arch", "transformer"),)),
    Layout(2, 1, 2, 0, True, 1, (), "triton"),
    Layout(2, 2, 1, 0, False, 2, compute=(("recompute", "full"),)),
    Layout(2, 1, 2, 1, True, 1, compute=(("recompute", "selective"),)),
    Layout(2, 1, 2, 0, True, 1, documents=True, steps=6, scored=True),  # a document spans the two CP ranks
    Layout(1, 2, 1, 0, False, 2, documents=True),
    # sequence parallelism switched off
    Layout(2, 2, 1, 0, True, 1, sequence_parallel=False),
    Layout(2, 1, 2, 1, False, 2, documents=True, sequence_parallel=False),
    # interleaved pipeline stages: 4 layers, 2 model chunks per stage (layers 0 and 2 on stage 0)
    Layout(1, 2, 1, 0, True, 1, (("n_layers", 4),), parallel=(("virtual_stages", 2),)),
    Layout(2, 2, 1, 0, False, 2, (("n_layers", 4),), parallel=(("virtual_stages", 2),)),
    Layout(1, 2, 2, 1, True, 1, (("n_layers", 4),), documents=True, scored=True, parallel=(("virtual_stages", 2),)),
]
EOS = 5


def _model_config(layout: Layout):
    from sessa_train.config import ModelConfig

    fields = {"vocab_size": 64, "d_model": 32, "n_layers": 3, "n_heads": 4, "n_kv_heads": 2}  # 3: uneven over 2 stages
    fields |= {"tie_embeddings": layout.tie, "feedback_heads": layout.feedback_heads}
    return ModelConfig(**(fields | dict(layout.model)))


def _compute(layout: Layout, reference: bool = False):
    from sessa_train.config import ComputeConfig

    chunk = 16 if layout.backend == "triton" else 5  # T = 12 is no multiple of 5
    return ComputeConfig(feedback_chunk_size=chunk, **({} if reference else dict(layout.compute)))


def _train_config(layout: Layout, dp: int):
    from sessa_train.config import DataConfig, OptimizerConfig, ParallelConfig, ScheduleConfig, TrainConfig

    return TrainConfig(
        model=_model_config(layout),
        compute=_compute(layout),
        data=DataConfig(micro_batch_size=SEQS // dp),
        optimizer=OptimizerConfig(lr=1e-2, grad_clip=0.05, eps=1e-3),  # clipping active; see _reference
        schedule=ScheduleConfig(train_steps=10, warmup_steps=0, global_batch_size=SEQS * N_MICRO),
        parallel=ParallelConfig(
            tensor=layout.tensor,
            pipeline=layout.pipeline,
            context=layout.context,
            zero_stage=layout.zero,
            sequence_parallel=layout.sequence_parallel,
            **dict(layout.parallel),
        ),
    )


def _batches(step: int, dp_rank: int, dp: int, documents: bool = False, scored: bool = False) -> list[dict]:
    """The micro-batches of one data-parallel rank: a slice of the same global batch (with packed
    documents: EOS after token 3 and 8 of every other sequence, and the loader's position_ids;
    scored: targets of their own, not the next tokens, and a loss mask on a random quarter of them,
    so ranks and CP blocks hold different counts)."""
    from sessa_train.data import document_positions

    g = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, 64, (N_MICRO, SEQS, T + 1), generator=g)
    masks = (torch.rand(N_MICRO, SEQS, T, generator=g) < 0.25).float()
    targets = torch.randint(0, 64, (N_MICRO, SEQS, T), generator=g)
    if documents:
        tokens[:, ::2, 3] = tokens[:, ::2, 8] = EOS
    per_rank = SEQS // dp
    rows = slice(dp_rank * per_rank, (dp_rank + 1) * per_rank)
    batches = [
        {"tokens": t[rows]} | ({"targets": y[rows], "loss_mask": m[rows]} if scored else {})
        for t, y, m in zip(tokens, targets, masks, strict=True)
    ]
    for b in batches if documents else ():
        b["position_ids"] = document_positions(b["tokens"][:, :-1], EOS)
    return batches


def _reference(layout: Layout) -> tuple[list[float], list[dict], list[float]]:
    """1 process: loss of each step, the gradients and their norm before clipping."""
    import torch.nn.functional as F

    from sessa_train.models import ModelPlan, SessaLM
    from sessa_train.trainer.optim import make_optimizer

    torch.manual_seed(0)
    model = SessaLM(_model_config(layout), ModelPlan(_compute(layout, reference=True)))
    cfg = _train_config(layout, 1)
    opt, schedule = make_optimizer(cfg, model)  # AdamW and the learning-rate schedule the trainer steps
    losses, grads, norms = [], [], []
    for step in range(layout.steps):
        total = 0.0
        batches = _batches(step, 0, 1, layout.documents, layout.scored)
        masks = [b.get("loss_mask", torch.ones(b["tokens"][:, 1:].shape)) for b in batches]
        scored = sum(m.sum() for m in masks)  # the step's mean over every scored target
        for batch, mask in zip(batches, masks, strict=True):
            tok = batch["tokens"]
            logits = model(tok[:, :-1], position_ids=batch.get("position_ids"))
            targets = batch.get("targets", tok[:, 1:])
            per_token = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
            loss = (per_token * mask.flatten()).sum() / scored
            loss.backward()
            total += loss.item()
        losses.append(total)
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
        if layout.tie:
            grads[-1]["lm_head.weight"] = grads[-1]["embed.weight"]
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optimizer.grad_clip).item())
        opt.step()
        schedule.step()
        opt.zero_grad()
    return losses, grads, norms


def _worker(rank: int, port: int, out) -> None:
    torch.set_num_threads(1)  # a rank per core or less: more intra-op threads only contend (tests/trainer.py)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        DS_ACCELERATOR="cpu",
    )
    from tests.nccl_rules import install

    install("rank")  # NCCL's rules for point-to-point calls and collectives (tests/nccl_rules.py)
    import deepspeed
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from sessa_train.distributed import DistInfo
    from sessa_train.parallel.layout import merge_states
    from sessa_train.trainer import build_engine, parallel_state

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    info = DistInfo(rank, WORLD, rank, torch.device("cpu"))
    results = {}
    for layout in LAYOUTS:
        if layout.backend:
            os.environ["SESSA_FEEDBACK_BACKEND"] = layout.backend
        cfg = _train_config(layout, WORLD // (layout.tensor * layout.pipeline * layout.context))
        state = parallel_state(cfg, info)
        engine = build_engine(cfg, info, state, T)  # exactly what the trainer builds
        losses, grads, norms = [], [], []
        for step in range(layout.steps):
            loss = engine.forward_backward(
                iter(_batches(step, state.dp_rank, state.dp, layout.documents, layout.scored))
            )
            losses.append(loss)
            if layout.zero == 0 and state.model_parallel > 1:
                mine = {k: p.grad.clone() for k, p in engine.model.named_parameters(remove_duplicate=False)}
                every: list = [None] * WORLD
                dist.all_gather_object(every, ((state.pp_rank, state.tp_rank), mine))
                grads.append(merge_states(dict(every), cfg.model, cfg.parallel.virtual_stages))
            applied, norm = engine.update(loss)
            assert applied
            norms.append(norm)
        assert state.sequence_parallel == (layout.sequence_parallel and layout.tensor > 1)
        overlap = dict(layout.parallel).get("overlap_comm", True) and state.model_parallel == 1 and layout.zero > 0
        assert engine.ds.zero_overlap_comm() == overlap, layout  # what DeepSpeed was configured with
        if state.pp > 1:  # megatron-core's interleaved 1F1B with virtual stages
            interleaved = engine.runner.schedule.__name__ == "forward_backward_pipelining_with_interleaving"
            assert interleaved == (cfg.parallel.virtual_stages > 1), layout
        results[layout] = (losses, grads, norms)
        ps.destroy_model_parallel()
        os.environ.pop("SESSA_FEEDBACK_BACKEND", None)
    if rank == 0:
        out.update(results)
    from tests.nccl_rules import shutdown

    shutdown()
    dist.destroy_process_group()


def test_tp_pp_dp_layouts_match_one_process_in_loss_and_gradients():
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(29000 + os.getpid() % 400, results), nprocs=WORLD, join=True)
    assert set(results) == set(LAYOUTS)
    for layout, (losses, grads, norms) in results.items():
        ref_losses, ref_grads, ref_norms = _reference(layout)
        for step, (got, want) in enumerate(zip(norms, ref_norms, strict=True)):  # DeepSpeed's or ours
            assert abs(got - want) <= 1e-6 * want, f"{layout} step {step}: gradient norm {got} vs {want}"
        for step, (got, want) in enumerate(zip(losses, ref_losses, strict=True)):
            assert abs(got - want) <= 1e-5 * abs(want), f"{layout} step {step}: loss {got} vs {want}"
        for step, merged in enumerate(grads):
            assert merged.keys() == ref_grads[step].keys()
            for name, want in ref_grads[step].items():
                scale = max(g.abs().max() for g in ref_grads[step].values())
                err = (merged[name] - want).abs().max() / scale
                assert err < 1e-5, f"{layout} step {step}: gradient of {name} off by {err:.2e} (relative)"


# -- layout conversion (pure) -------------------------------------------------------------


@pytest.mark.parametrize(
    ("tensor", "pipeline", "feedback_heads", "tie", "model"),
    [
        (2, 2, 1, True, {}),
        (4, 1, 4, False, {}),
        (2, 3, 2, False, {"ffn_hidden_size": 48}),
        (2, 2, 1, True, {"arch": "transformer"}),
    ],
)
def test_shard_then_merge_gives_back_every_plain_weight(tensor, pipeline, feedback_heads, tie, model):
    from sessa_train.config import ModelConfig
    from sessa_train.models import ModelPlan, SessaLM
    from sessa_train.parallel.layout import merge_states, shard_state

    cfg = ModelConfig(
        vocab_size=64, d_model=32, n_layers=4, n_heads=4, feedback_heads=feedback_heads, tie_embeddings=tie, **model
    )
    plain = SessaLM(cfg).state_dict()
    stages = {(p, t): shard_state(plain, cfg, t, tensor, p, pipeline) for p in range(pipeline) for t in range(tensor)}
    assert sum(v.numel() for v in stages[(0, 0)].values()) < sum(v.numel() for v in plain.values())
    merged = merge_states(stages, cfg)
    assert merged.keys() == plain.keys()
    assert all(torch.equal(merged[k], plain[k]) for k in plain)
    layers = [i for p in range(pipeline) for i in ModelPlan(stages=pipeline, stage=p).layer_ids(cfg.n_layers)]
    assert layers == list(range(cfg.n_layers))  # contiguous, each layer once
    with pytest.raises(ValueError, match="missing"):
        merge_states({k: v for k, v in stages.items() if k != (0, 0)}, cfg)


# -- the trainer under TP=2 x PP=2 on the tiny preset ---------------------------------------


def _plain_loss(model, tokens: torch.Tensor) -> float:
    import torch.nn.functional as F

    with torch.no_grad():
        logits = model(tokens[:, :-1]).float()
        return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).item()


def test_tp2_pp2_tiny_run_follows_one_process_and_converts_both_ways(tiny_run, tmp_path):
    """configs/tiny.yaml at TP=2 x PP=2 (4 ranks, ZeRO-1): its first 10 losses are those of the
    1-process run (which starts from the same plain weights, sharded); its checkpoint exported
    to the plain layout holds each rank's trained weights and gives its validation loss; and the
    1-process run's export loaded at CP=2 x TP=2 gives the plain model's loss on the first batch.
    Its checkpoint resumed under 2 interleaved stages per pipeline rank goes on as 1 process."""
    from sessa_train.data import PackedTokenLoader
    from sessa_train.export import export_checkpoint, load_pretrained
    from sessa_train.parallel.layout import shard_state
    from tests.conftest import tiny_overrides
    from tests.trainer import REPO, losses, rank_weights, train

    data, one = tiny_run["data"], tiny_run["run"]
    tiny, tp_pp = REPO / "configs" / "tiny.yaml", ["parallel.tensor=2", "parallel.pipeline=2", "parallel.zero_stage=1"]
    run = tmp_path / "tp2pp2"
    steps = ["schedule.stop_after_steps=10", "logging.eval_every_steps=10", "logging.eval_batches=2"]
    train(tiny, *tiny_overrides(data, run), *tp_pp, *steps, nproc=4)
    got, want = losses(run), losses(one)[:10]
    assert [s for s, _ in got] == [s for s, _ in want]
    drift = max(abs(a - b) / b for (_, a), (_, b) in zip(got, want, strict=True))
    assert drift < 1e-4, f"TP2 x PP2 loss trajectory drifts from 1 process by {drift:.2e} (relative)"

    # TP=2 x PP=2 -> plain: the export's validation loss is the one the parallel run logged
    export_checkpoint(run / "ckpt" / "step_00000010", tmp_path / "from_tp_pp")
    plain = load_pretrained(tmp_path / "from_tp_pp")

    for m in range(4):  # the export holds exactly the weights each rank trained (rank m = pp * 2 + tp)
        weights = rank_weights(run / "ckpt" / "step_00000010", m % 2, m // 2)
        back = shard_state(plain.state_dict(), plain.cfg, m % 2, 2, m // 2, 2)
        assert weights and weights.keys() <= back.keys()  # tensor rank 1 leaves replicated weights to rank 0
        assert all(torch.equal(back[k], weights[k]) for k in weights), f"model-parallel rank {m}"
    val = PackedTokenLoader(
        data / "shards", "val", micro_batch_size=8, rank=0, world_size=1, shuffle=False, max_epochs=1
    )
    batches = [b["tokens"] for b in itertools.islice(val, 2)]
    ours = sum(_plain_loss(plain, t) * t[:, 1:].numel() for t in batches) / sum(t[:, 1:].numel() for t in batches)
    logged = json.loads((run / "tb" / "metrics.jsonl").read_text().splitlines()[-1])["val/loss"]
    assert abs(ours - logged) <= 1e-5 * logged, (ours, logged)

    # TP=2 x PP=2 -> TP=2 x PP=2 x 2 interleaved stages (each stage: layers {0, 2} or {1, 3}, 2
    # micro-batches of 4 per step): the resumed steps 11-12 are the 1-process run's
    resumed = tmp_path / "interleaved"
    (resumed / "ckpt").mkdir(parents=True)
    shutil.copytree(run / "ckpt" / "step_00000010", resumed / "ckpt" / "step_00000010")
    v2 = ["parallel.virtual_stages=2", "data.micro_batch_size=4", "schedule.stop_after_steps=2"]
    evaluate = ["logging.eval_every_steps=2", "logging.eval_batches=2"]  # forward-only through the schedule too
    train(tiny, *tiny_overrides(data, resumed), *tp_pp, *v2, *evaluate, "--resume", "auto", nproc=4)
    got, want = losses(resumed), losses(one)[10:12]
    assert [s for s, _ in got] == [11, 12] == [s for s, _ in want]
    drift = max(abs(a - b) / b for (_, a), (_, b) in zip(got, want, strict=True))
    assert drift < 1e-4, f"resumed under interleaved stages, the losses drift from 1 process by {drift:.2e}"
    export_checkpoint(resumed / "ckpt" / "step_00000012", tmp_path / "from_interleaved")  # and its validation:
    at_12 = load_pretrained(tmp_path / "from_interleaved")  # 2 micro-batches of 4 through the interleaved schedule
    val = PackedTokenLoader(data / "shards", "val", micro_batch_size=4, rank=0, world_size=1, shuffle=False,
                            max_epochs=1)  # fmt: skip
    batches = [b["tokens"] for b in itertools.islice(val, 2)]
    ours = sum(_plain_loss(at_12, t) * t[:, 1:].numel() for t in batches) / sum(t[:, 1:].numel() for t in batches)
    logged = json.loads((resumed / "tb" / "metrics.jsonl").read_text().splitlines()[-1])["val/loss"]
    assert abs(ours - logged) <= 1e-5 * logged, (ours, logged)

    # plain -> CP=2 x TP=2: the first loss of a run started from the 1-process export; its
    # checkpoint exports back to the plain layout (TP ranks merged, CP ranks are replicas)
    export_checkpoint(one / "ckpt", tmp_path / "from_one")
    run2 = tmp_path / "init_from"
    train(
        tiny,
        *tiny_overrides(data, run2),
        "parallel.context=2",
        "parallel.tensor=2",
        "schedule.stop_after_steps=1",
        f"checkpoint.init_from={tmp_path / 'from_one'}",
        nproc=4,
    )
    first = next(iter(PackedTokenLoader(data / "shards", "train", micro_batch_size=8, rank=0, world_size=1, seed=1234)))
    want_first = _plain_loss(load_pretrained(tmp_path / "from_one"), first["tokens"])
    assert abs(losses(run2)[0][1] - want_first) <= 1e-5 * want_first
    export_checkpoint(run2 / "ckpt" / "step_00000001", tmp_path / "from_cp_tp")
    plain2 = load_pretrained(tmp_path / "from_cp_tp").state_dict()
    for m in range(2):
        trained = rank_weights(run2 / "ckpt" / "step_00000001", m)
        back = shard_state(plain2, plain.cfg, m, 2)
        assert trained and all(torch.equal(back[k], trained[k]) for k in trained), f"tensor-parallel rank {m}"


@pytest.mark.parametrize(
    ("sizes", "model", "message"),
    [
        ((2, 2, 1, 6), {}, "parallel.tensor=2 x parallel.pipeline=2 x parallel.context=1 does not divide the 6 ranks"),
        ((2, 1, 2, 6), {}, "parallel.tensor=2 x parallel.pipeline=1 x parallel.context=2 does not divide the 6 ranks"),
        ((2, 1, 1, 2), {"vocab_size": 63}, "model.vocab_size=63 must be divisible by parallel.tensor=2"),
        ((1, 4, 1, 4), {"n_layers": 3}, "model.n_layers=3 is fewer than parallel.pipeline=4 stages"),
        ((2, 1, 1, 2), {"feedback_heads": 4, "n_heads": 2, "d_model": 32}, None),
        ((4, 1, 1, 4), {"feedback_heads": 2}, "model.feedback_heads=2 must be 1 or divisible by parallel.tensor=4"),
    ],
)
def test_layouts_that_cannot_work_are_refused_in_one_line(sizes, model, message):
    from sessa_train.config import ModelConfig
    from sessa_train.parallel.plan import check_parallel_model
    from sessa_train.parallel.state import check_sizes

    tensor, pipeline, context, world = sizes
    cfg = ModelConfig(**{"vocab_size": 64, "d_model": 32, "n_layers": 4, "n_heads": 4, **model})
    if message is None:  # a valid one
        check_sizes(tensor, pipeline, context, world)
        check_parallel_model(cfg, tensor, pipeline)
        return
    with pytest.raises(ValueError, match=re.escape(message)):
        check_sizes(tensor, pipeline, context, world)
        check_parallel_model(cfg, tensor, pipeline)


V2 = ["parallel.pipeline=2", "parallel.virtual_stages=2"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["parallel.virtual_stages=2"],
         "parallel.virtual_stages=2 interleaves pipeline stages: needs parallel.pipeline > 1"),
        ([*V2, "model.n_layers=6"],
         "model.n_layers=6 is not divisible by parallel.pipeline=2 x parallel.virtual_stages=2"),
        ([*V2, "model.n_layers=4", "schedule.global_batch_size=24", "data.micro_batch_size=8"],
         "parallel.virtual_stages=2: the 3 micro-batches per step on each rank must be a multiple of "
         "parallel.pipeline=2"),
        ([*V2, "model.n_layers=4", "schedule.global_batch_size=32", "data.micro_batch_size=8"], None),
    ],
)  # fmt: skip
def test_interleaved_stages_that_cannot_work_are_refused_in_one_line(overrides, message):
    from sessa_train.config import load_config
    from sessa_train.errors import ConfigError
    from sessa_train.parallel.plan import check_layout
    from tests.trainer import REPO

    cfg = load_config([REPO / "configs" / "tiny.yaml"], overrides)
    if message is None:
        check_layout(cfg, 2)
        return
    with pytest.raises(ConfigError) as refused:
        check_layout(cfg, 2)
    assert str(refused.value).startswith(message)


# -- sequence parallelism in float64 ---------------------------------------------------------

FP64_BASE = {"vocab_size": 64, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2}
FP64_MODELS = {"one feedback head, tied": {}, "two feedback heads, MLP, untied": {"feedback_heads": 2,
               "ffn_hidden_size": 48, "tie_embeddings": False}}  # fmt: skip


class _OneReplica:
    """The data-parallel reduction of a job with one data-parallel rank: nothing to reduce."""

    def allreduce_gradients(self) -> None:
        pass


def _fp64_worker(rank: int, port: int, out) -> None:
    torch.set_num_threads(1)  # a rank per core or less: more intra-op threads only contend (tests/trainer.py)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from sessa_train.config import ComputeConfig, ModelConfig
    from sessa_train.parallel.pipeline import PipelineRunner
    from sessa_train.parallel.plan import build_model
    from sessa_train.parallel.state import init_parallel

    dist.init_process_group("gloo", rank=rank, world_size=2)
    results = {}
    for name, extra in FP64_MODELS.items():
        for sequence_parallel in (True, False):
            cfg = ModelConfig(**(FP64_BASE | extra))
            state = init_parallel(2, 1, 1, 2, rank, sequence_parallel)
            model = build_model(cfg, ComputeConfig(feedback_chunk_size=5), state, 0, torch.device("cpu")).double()
            runner = PipelineRunner(model, _OneReplica(), T, SEQS, torch.device("cpu"))
            runner.run(iter(_batches(0, 0, 1, documents=True)), N_MICRO)
            grads = {k: p.grad.clone() for k, p in model.named_parameters(remove_duplicate=False)}
            every: list = [None] * 2
            dist.all_gather_object(every, ((0, state.tp_rank), grads))
            results[(name, sequence_parallel)] = dict(every)
            ps.destroy_model_parallel()
    if rank == 0:
        out.update(results)
    dist.destroy_process_group()


def test_sequence_parallel_gradients_equal_one_process_in_float64():
    """TP2 with and without sequence parallelism, in float64 with packed documents: every gradient
    of every parameter, merged to the plain layout, equals the 1-process model's within 1e-6 of
    the largest (the LayerNorm and residual-bias sums over TP, the reduce-scatters and gathers).
    Not 1e-12: megatron-core's vocab-parallel cross-entropy computes in float32 (seen: 3e-8)."""
    import torch.nn.functional as F

    from sessa_train.config import ComputeConfig, ModelConfig
    from sessa_train.models import ModelPlan, SessaLM
    from sessa_train.parallel.layout import merge_states

    results = mp.Manager().dict()
    mp.spawn(_fp64_worker, args=(29400 + os.getpid() % 100, results), nprocs=2, join=True)
    for (name, sequence_parallel), states in results.items():
        extra = FP64_MODELS[name]
        cfg = ModelConfig(**(FP64_BASE | extra))
        torch.manual_seed(0)
        plain = SessaLM(cfg, ModelPlan(ComputeConfig(feedback_chunk_size=5))).double()
        for batch in _batches(0, 0, 1, documents=True):
            tok = batch["tokens"]
            logits = plain(tok[:, :-1], position_ids=batch["position_ids"])
            (F.cross_entropy(logits.flatten(0, 1), tok[:, 1:].flatten()) / N_MICRO).backward()
        want = {k: p.grad for k, p in plain.named_parameters()}
        if cfg.tie_embeddings:
            want["lm_head.weight"] = want["embed.weight"]
        got = merge_states(states, cfg)
        assert got.keys() == want.keys()
        scale = max(g.abs().max() for g in want.values())
        for key, g in want.items():
            err = ((got[key] - g).abs().max() / scale).item()
            assert err < 1e-6, f"{name}, sequence_parallel={sequence_parallel}: gradient of {key} off by {err:.1e}"
