"""Packed documents (``position_ids`` restarting at each document, ``data.document_masking``): no
attention and no feedback across a document start, in every solve backend, under recomputation,
in prefill + decode, and in the loader that derives the positions from EOS."""

from __future__ import annotations

import pytest
import torch

from sessa_train.config import ComputeConfig, ModelConfig
from sessa_train.data import document_positions
from sessa_train.models import ModelPlan, SessaLM
from sessa_train.models.positions import positions_of

VOCAB = 61
LENGTHS = ([13, 30, 7, 21], [40, 1, 30])  # per row of the batch: documents of different lengths; one of 1 token


def packed(lengths=LENGTHS) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, T), position_ids (B, T)) of the packed rows."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, VOCAB, (len(lengths), sum(lengths[0])), generator=g)
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    return ids, pos


def model(arch: str = "sessa", backend: str = "chunked", recompute: str = "none", dtype=torch.float64) -> SessaLM:
    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, feedback_heads=2, arch=arch)
    torch.manual_seed(0)
    chunk = 16 if backend == "triton" else 8
    compute = ComputeConfig(feedback_backend=backend, feedback_chunk_size=chunk, recompute=recompute)
    m = SessaLM(cfg, ModelPlan(compute)).to(dtype)
    with torch.no_grad():  # gates well away from 0, so that the feedback matters
        for layer in m.layers.values():
            if hasattr(layer.mixer, "gamma_bias"):
                layer.mixer.gamma_bias.uniform_(0.5, 3.0)
    return m


def packed_and_alone(m: SessaLM, position_ids: torch.Tensor | None):
    """Logits of the packed rows (with ``position_ids``) and of each document run alone, and the
    parameter gradients of the same weighted loss both ways."""
    ids = packed()[0]
    w = torch.randn(ids.shape, generator=torch.Generator().manual_seed(6), dtype=next(m.parameters()).dtype)
    targets = ids.roll(-1, dims=1)
    loss = (m(ids, targets=targets, position_ids=position_ids) * w).sum()
    logits = m(ids, position_ids=position_ids).detach()
    packed_grads = torch.autograd.grad(loss, list(m.parameters()))
    alone_logits, loss = torch.zeros_like(logits), 0.0
    for b, row in enumerate(LENGTHS):
        start = 0
        for n in row:
            doc = slice(start, start + n)
            alone_logits[b, doc] = m(ids[b : b + 1, doc]).detach()[0]
            loss = loss + (m(ids[b : b + 1, doc], targets=targets[b : b + 1, doc]) * w[b : b + 1, doc]).sum()
            start += n
    alone_grads = torch.autograd.grad(loss, list(m.parameters()))
    return (logits, packed_grads), (alone_logits, alone_grads)


def largest_difference(a, b) -> float:
    (la, ga), (lb, gb) = a, b
    rel = [((x - y).abs().max() / y.abs().max()).item() for x, y in zip(ga, gb, strict=True)]
    return max([((la - lb).abs().max() / lb.abs().max()).item(), *rel])


@pytest.mark.parametrize(
    ("arch", "backend", "recompute"),
    [
        ("sessa", "reference", "none"),
        ("sessa", "chunked", "none"),
        ("sessa", "chunked", "selective"),
        ("sessa", "chunked", "full"),
        ("transformer", "chunked", "none"),
    ],
)
def test_each_document_of_a_packed_sample_computes_as_if_alone(arch, backend, recompute):
    """fp64: logits and every parameter gradient of a packed batch equal each document's own."""
    m = model(arch, backend, recompute)
    got, want = packed_and_alone(m, packed()[1])
    assert largest_difference(got, want) < 1e-10


def test_triton_kernels_honour_documents_too():
    """The Triton kernels (interpreter, float32) on the same packed batch."""
    m = model("sessa", "triton", dtype=torch.float32)
    got, want = packed_and_alone(m, packed()[1])
    assert largest_difference(got, want) < 1e-4


def test_without_masking_the_comparison_fails():
    """The mutation: the same packed batch without its positions reads across the joins."""
    m = model()
    got, want = packed_and_alone(m, None)
    assert largest_difference(got, want) > 1e-3


def test_prefill_and_decode_start_a_fresh_document_at_each_eos():
    """Decoding token by token with positions from EOS equals the parallel packed forward, and a
    document after an EOS continues exactly as that document alone."""
    from sessa_train.generate import generate

    m = model().eval()
    eos = 3
    ids, _ = packed(([20, 25],))
    ids[0, 19] = eos  # the first document ends with EOS
    pos = positions_of(ids, eos_id=eos)
    assert pos is not None and pos[0, 20].item() == 0 and pos[0, 19].item() == 19
    with torch.no_grad():
        full = m(ids, position_ids=pos)
        cache = m.init_cache(1, ids.shape[1])
        steps = [m(ids[:, :10], cache, position_ids=pos[:, :10])]
        steps += [m(ids[:, t : t + 1], cache, position_ids=pos[:, t : t + 1]) for t in range(10, ids.shape[1])]
    assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-10
    # generation after a prompt that ends in EOS: what the model generates from an empty document
    prompt = torch.cat([ids[:, :20], ids[:, 20:23]], dim=1)
    after_eos = list(generate(m, prompt, 8, document_eos=eos))
    alone = list(generate(m, ids[:, 20:23], 8))
    assert torch.equal(torch.stack(after_eos), torch.stack(alone))


def test_position_ids_must_count_within_documents():
    m = model()
    ids, pos = packed()
    bad = pos.clone()
    bad[0, 5] = 7  # neither the next position nor a restart
    with pytest.raises(ValueError, match="position_ids must restart at 0 at each document and count up by 1"):
        m(ids, position_ids=bad)


def test_the_loader_derives_positions_from_eos(tmp_path):
    """A document starts at a sample's first token and after every EOS; the batches carry the
    inputs' position_ids only when asked to."""
    import numpy as np

    from sessa_train.data import PackedTokenLoader
    from sessa_train.data.shards import write_sample_shards

    eos, seq = 2, 15
    rng = np.random.default_rng(0)
    rows = [rng.integers(3, 50, seq + 1) for _ in range(8)]
    for r in rows[::2]:
        r[[4, 9]] = eos
    write_sample_shards({"train": rows, "val": rows[:2]}, tmp_path, seq_len=seq, vocab_size=50, eos_id=eos,
                        samples_per_shard=4)  # fmt: skip
    common = {"micro_batch_size": 4, "global_batch_size": 4, "shuffle": False, "max_epochs": 1}
    batch = next(iter(PackedTokenLoader(tmp_path, "train", document_masking=True, **common)))
    plain = next(iter(PackedTokenLoader(tmp_path, "train", **common)))
    assert "position_ids" not in plain and torch.equal(plain["tokens"], batch["tokens"])
    for tokens, pos in zip(batch["tokens"], batch["position_ids"], strict=True):
        expected, p = [], 0
        for t, token in enumerate(tokens[:-1].tolist()):
            expected.append(p)
            p = 0 if token == eos else p + 1
            assert t < seq
        assert pos.tolist() == expected
    assert torch.equal(batch["position_ids"], document_positions(batch["tokens"][:, :-1], eos))
