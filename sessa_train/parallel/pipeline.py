"""One optimizer step's micro-batches through megatron-core's schedule.

``get_forward_backward_func()`` picks 1F1B (``forward_backward_pipelining_without_interleaving``)
when PP > 1 and the plain loop when PP = 1; it runs forward and backward of every micro-batch.
Every rank reads the same micro-batches as the other ranks of its TP x PP x CP group (the loader
is partitioned by data-parallel rank only); a context-parallel rank keeps its block of each
sequence; the first stage uses the inputs, the last the targets. The loss of a micro-batch is
the mean token cross-entropy over the rank's tokens (megatron-core's vocab-parallel one)
divided by the number of micro-batches; averaging gradients over DP x CP then gives the
gradient of the 1-process trainer's loss. Data-parallel gradient
reduction and the optimizer step stay with DeepSpeed (the trainer calls them afterwards).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel as tp
from megatron.core.pipeline_parallel import get_forward_backward_func

from sessa_train.parallel.model import SessaStage


class PipelineRunner:
    def __init__(self, stage: SessaStage, seq_len: int, micro_batch_size: int, device: torch.device) -> None:
        self.stage, self.seq_len, self.micro_batch_size, self.device = stage, seq_len, micro_batch_size, device
        self.schedule = get_forward_backward_func()
        st = stage.state
        self.borrows_embedding = stage.cfg.tie_embeddings and st.pp > 1 and (st.first_stage or st.last_stage)

    # -- tied embedding between first and last stage ---------------------------------------
    def _embedding_source(self) -> int:
        group = ps.get_embedding_group()
        return dist.get_global_rank(group, 0)  # the group is [first stage, last stage]

    def share_embedding(self) -> None:
        """Before the micro-batches: the last stage receives the first stage's embedding rows."""
        if not self.borrows_embedding:
            return
        stage = self.stage
        buf = stage.embed.weight.data if stage.state.first_stage else torch.empty_like(stage.tied_weight)
        dist.broadcast(buf, src=self._embedding_source(), group=ps.get_embedding_group())
        if not stage.state.first_stage:
            stage.tied_weight = buf.requires_grad_()

    def return_embedding_grad(self) -> None:
        """After the micro-batches: the head's gradient joins the embedding's on the first stage."""
        if not self.borrows_embedding:
            return
        stage = self.stage
        if stage.state.first_stage:
            grad = stage.embed.weight.grad
        else:
            grad = stage.tied_weight.grad
            if grad is None:
                grad = torch.zeros_like(stage.tied_weight)
        dist.all_reduce(grad, group=ps.get_embedding_group())

    # -- micro-batches --------------------------------------------------------------------
    @staticmethod
    def _loss(targets: torch.Tensor, logits: torch.Tensor):
        """(sum, count, stats): megatron-core divides the sum by the count and by the number of
        micro-batches, so each rank's loss is the mean over its own tokens."""
        per_token = tp.vocab_parallel_cross_entropy(logits.float(), targets)  # (B, T)
        total, count = per_token.sum(), torch.tensor(per_token.numel(), dtype=torch.int)
        stats = {"loss": total.detach() / count, "sum": total.detach().clone(), "count": per_token.numel()}
        return total, count, stats

    def _forward_step(self, batches: Iterator[dict], model: SessaStage):
        tokens = next(batches)["tokens"].to(self.device)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        st = self.stage.state
        if st.cp > 1:  # this rank's block of every sequence
            block = inputs.shape[1] // st.cp
            rows = slice(st.cp_rank * block, (st.cp_rank + 1) * block)
            inputs, targets = inputs[:, rows], targets[:, rows]
        return model(inputs), partial(self._loss, targets)

    def run(self, batches: Iterator[dict], num_microbatches: int, forward_only: bool = False) -> list[dict]:
        """Forward (and backward) of ``num_microbatches``; per-micro-batch stats on the last stage."""
        self.share_embedding()
        out = self.schedule(
            forward_step_func=self._forward_step,
            data_iterator=batches,
            model=[self.stage],
            num_microbatches=num_microbatches,
            seq_length=self.seq_len,
            micro_batch_size=self.micro_batch_size,
            forward_only=forward_only,
        )
        if not forward_only:
            self.return_embedding_grad()
        return out
