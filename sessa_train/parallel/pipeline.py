"""One step's micro-batches through megatron-core's schedule: the runner of every
tensor/pipeline/context-parallel layout (``trainer/runner.py`` has the interface).

``get_forward_backward_func()`` runs 1F1B when PP > 1, the plain loop when PP = 1. The ranks of
a TP x PP x CP group read the same micro-batches (the loader is split by data-parallel rank);
a CP rank keeps its block of each sequence. Each micro-batch's loss is weighted so that averaging
gradients over DP x CP gives the 1-process gradient of the step's mean over its (scored) tokens
(``_loss``); DeepSpeed reduces them and steps. Activations travel between stages as
(T, B, D) (with sequence parallelism this rank's T / TP rows, whose LayerNorm gradients megatron-core
then sums over the TP group). With tied embeddings and PP > 1 the first stage lends its embedding to the last
stage's head every step: a broadcast before the micro-batches, the gradient summed back after.
With interleaved stages (``parallel.virtual_stages`` = v) each rank holds v model chunks of one
``SessaLM`` (``ModelPlan.chunk_layers``) and the schedule is megatron-core's interleaved 1F1B.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import _allreduce_non_tensor_model_parallel_grads
from megatron.core.enums import ModelType
from megatron.core.pipeline_parallel import get_forward_backward_func

from sessa_train import distributed as comm
from sessa_train.models import SessaLM
from sessa_train.models.plan import scored_sum


class _ScheduleModel(torch.nn.Module):
    """One model chunk as megatron-core's schedule asks of it: ``config``, ``model_type`` and
    ``set_input_tensor`` (the activation received from the previous stage); and what its gradient
    finalisation reads (``ddp_config``: the gradients are DeepSpeed's, in ``param.grad``). The
    interleaved schedule takes one per chunk (``chunk``; None: the whole stage)."""

    def __init__(self, model: SessaLM, chunk: int | None = None) -> None:
        super().__init__()
        self.module, self.chunk = model, chunk
        self.config = model.plan.config
        self.model_type = ModelType.encoder_or_decoder
        self.ddp_config = DistributedDataParallelConfig()
        self.input_tensor: torch.Tensor | None = None
        self.takes_tokens, self.gives_loss = model.chunk_ends(chunk)

    def set_input_tensor(self, tensor: torch.Tensor | list[torch.Tensor] | None) -> None:
        self.input_tensor = tensor[0] if isinstance(tensor, list) else tensor


class PipelineRunner:
    def __init__(self, model: SessaLM, engine, seq_len: int, micro_batch_size: int, device: torch.device) -> None:
        self.model, self.engine, self.device = model, engine, device
        self.seq_len, self.micro_batch_size = seq_len, micro_batch_size
        self.plan, self.state = model.plan, model.plan.state
        self.schedule = get_forward_backward_func()
        chunks = [None] if self.state.vp == 1 else range(self.state.vp)
        self.adapters = [_ScheduleModel(model, chunk) for chunk in chunks]
        ends = model.plan.first_stage or model.plan.last_stage
        self.lends_embedding = model.cfg.tie_embeddings and self.state.pp > 1 and ends

    # -- the runner interface ----------------------------------------------------------------
    def run(self, batches: Iterator[dict], n: int, forward_only: bool = False) -> torch.Tensor:
        """Forward (and backward, and the data-parallel gradient reduction) of ``n`` micro-batches.
        Returns this rank's (loss sum, token count) as float64 (2,): zeros except on TP rank 0 of
        the last stage, so that a sum over all ranks counts every token once."""
        micro = [next(batches) for _ in range(n)]
        self.weight, self.n = 1.0 if forward_only else self.state.step_weight(micro), n
        batches = iter(micro)
        self._share_embedding()
        interleaved = len(self.adapters) > 1  # every chunk reads each micro-batch (tokens, targets, positions)
        stats = self.schedule(
            forward_step_func=self._forward_step,
            data_iterator=list(itertools.tee(batches, len(self.adapters))) if interleaved else batches,
            model=self.adapters,
            num_microbatches=n,
            seq_length=self.seq_len,
            micro_batch_size=self.micro_batch_size,
            forward_only=forward_only,
        )
        if not forward_only:
            if self.state.sequence_parallel:  # LayerNorms and residual biases saw this rank's rows only
                _allreduce_non_tensor_model_parallel_grads(self.adapters[:1], self.plan.config)
            self._return_embedding_grad()
            self.engine.allreduce_gradients()  # over megatron's data-parallel group (the mpu's)
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        if self.plan.last_stage and self.state.tp_rank == 0:
            for s in stats:
                total[0] += s["sum"].double()
                total[1] += s["count"]
        return total

    # -- micro-batches -----------------------------------------------------------------------
    def _loss(self, mask: torch.Tensor | None, weight: float, n: int, per_token: torch.Tensor):
        """(loss, count, stats) for megatron-core, which divides the loss by the count and by the
        ``n`` micro-batches: the loss is this rank's (CP block's) sum of scored token losses times
        the step's ``weight`` (``ParallelState.step_weight``) and n, the count 1, so that averaging
        gradients over DP x CP gives the step's mean over its scored tokens. ``stats`` keep this
        rank's own sum and count."""
        total, count = scored_sum(per_token, mask)
        stats = {"sum": total.detach().clone(), "count": count}
        return total * (weight * n), torch.tensor(1, dtype=torch.int), stats

    def _forward_step(self, batches: Iterator[dict], adapter: _ScheduleModel):
        batch = next(batches)
        tokens = batch["tokens"].to(self.device)
        inputs = tokens[:, :-1]
        targets = batch["targets"].to(self.device) if "targets" in batch else tokens[:, 1:]  # scored shards: their own
        positions = batch.get("position_ids")  # packed documents (data.document_masking)
        positions = None if positions is None else positions.to(self.device)
        mask = batch.get("loss_mask")  # scored shards; on the host
        st = self.state
        if st.cp > 1:  # this rank's block of every sequence
            block = inputs.shape[1] // st.cp
            rows = slice(st.cp_rank * block, (st.cp_rank + 1) * block)
            inputs, targets = inputs[:, rows], targets[:, rows]
            positions = None if positions is None else positions[:, rows]
            mask = None if mask is None else mask[:, rows]
        x = inputs if adapter.takes_tokens else adapter.input_tensor.transpose(0, 1)
        # the model's last chunk: per-token loss (B, T); others: (B, T, D)
        out = adapter.module(x, targets=targets, position_ids=positions, chunk=adapter.chunk)
        if not adapter.gives_loss:
            return out.transpose(0, 1).contiguous(), None
        return out, functools.partial(self._loss, mask, self.weight, self.n)

    # -- tied embedding between first and last stage ---------------------------------------
    def _share_embedding(self) -> None:
        """Before the micro-batches: the last stage receives the first stage's embedding rows."""
        if not self.lends_embedding:
            return
        model, group = self.model, ps.get_embedding_group()
        buf = model.embed.weight.data if model.embed is not None else torch.empty_like(model.lm_head.weight)
        comm.broadcast(buf, src=dist.get_global_rank(group, 0), group=group)  # the group is [first, last stage]
        if model.embed is None:
            model.lm_head.weight = buf.requires_grad_()

    def _return_embedding_grad(self) -> None:
        """After the micro-batches: the head's gradient joins the embedding's on the first stage."""
        if not self.lends_embedding:
            return
        model = self.model
        if model.embed is not None:
            grad = model.embed.weight.grad
        else:
            grad = model.lm_head.weight.grad
            if grad is None:
                grad = torch.zeros_like(model.lm_head.weight)
        comm.all_reduce(grad, group=ps.get_embedding_group())
