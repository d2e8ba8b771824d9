"""Causal language model: embedding -> N layers -> final LayerNorm -> LM head.

The layers are those of ``model.arch`` (``models/registry.py``): Sessa layers, or a baseline's.
A pipeline stage (``ModelPlan.stages`` > 1) holds the embedding only on the first stage, its
block of layers (with interleaved stages, a block per model chunk), and the final norm and head
only on the last; layers keep their global index
as their name, so every weight has the same name in every layout.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch
from torch import nn

from sessa_train.config import ModelConfig
from sessa_train.models.plan import ModelPlan
from sessa_train.models.positions import DecodeCache
from sessa_train.models.registry import RECORDS


def unit_seed(seed: int, name: str) -> int:
    """The RNG seed a unit of the model (``embed``, ``layers.<i>``, ``norm``, ``lm_head``) is
    built under: from the model's seed and the unit's name only, so that a unit's initial weights
    do not depend on which other units a rank builds."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little") >> 1


class _ShapesOnly(torch.overrides.TorchFunctionMode):
    """Random normal initialisation is skipped on the meta device, where it has no values to
    make (torch runs it there through its Python reference decompositions: ~2 s of a 1.3B plan)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (nn.init.normal_, torch.Tensor.normal_):
            tensor = args[0] if args else kwargs.get("tensor", kwargs.get("self"))
            if tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


def build_unit(seed: int, name: str, make: Callable[[], nn.Module]) -> nn.Module:
    """``make()`` under the unit's own seed, leaving the caller's RNG as it was."""
    if torch.empty(()).is_meta:  # under torch.device("meta"): shapes only
        with _ShapesOnly():
            return make()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(unit_seed(seed, name))
        return make()


class SessaLM(nn.Module):
    def __init__(self, cfg: ModelConfig, plan: ModelPlan | None = None) -> None:
        """Each unit is built under ``unit_seed(torch.initial_seed(), name)``: with
        ``torch.manual_seed(s)`` before, the plain model's weights are a function of ``s``, and
        ``parallel/layout.rank_initial_state`` builds any rank's part of them unit by unit."""
        super().__init__()
        plan = plan or ModelPlan()
        self.cfg, self.plan = cfg, plan
        seed = torch.initial_seed()
        built = {name: build_unit(seed, name, make) for name, make in self.units(cfg, plan).items()}
        self.embed = built.get("embed")
        self.layers = nn.ModuleDict({n.removeprefix("layers."): m for n, m in built.items() if n.startswith("layers.")})
        self.norm, self.lm_head = built.get("norm"), built.get("lm_head")
        if self.lm_head is not None and cfg.tie_embeddings and self.embed is not None:
            self.lm_head.weight = self.embed.weight
        elif self.lm_head is not None and cfg.tie_embeddings:  # the embedding lives on the first pipeline
            weight = self.lm_head.weight.detach()  # stage: it lends it every step (parallel/pipeline.py)
            del self.lm_head.weight
            self.lm_head.register_buffer("weight", weight, persistent=False)

    @staticmethod
    def units(cfg: ModelConfig, plan: ModelPlan) -> dict[str, Callable[[], nn.Module]]:
        """The constructors of this stage's units in order: embedding (first stage), its layers
        (global indices), final norm and LM head (last stage)."""
        D, V = cfg.d_model, cfg.vocab_size
        layer = RECORDS[cfg.arch].layer

        def normal(module: nn.Module) -> nn.Module:
            nn.init.normal_(module.weight, std=cfg.init_std)
            return module

        units: dict[str, Callable[[], nn.Module]] = {}
        if plan.first_stage:
            units["embed"] = lambda: normal(plan.embedding(V, D))
        for i in plan.layer_ids(cfg.n_layers):
            units[f"layers.{i}"] = lambda: layer(cfg, plan)
        if plan.last_stage:
            units["norm"] = lambda: plan.norm(D, cfg.ln_eps)
            head = lambda: plan.column(D, V, bias=False, residual=True)  # noqa: E731
            units["lm_head"] = head if cfg.tie_embeddings else lambda: normal(head())
        return units

    def init_cache(self, batch_size: int, max_len: int, *, device=None, dtype=None) -> DecodeCache:
        """The decode state of every layer for prefill + token-by-token decoding, for ``max_len``
        positions (``DecodeCache.reserve`` grows it)."""
        layers = [m.init_cache(batch_size, max_len, device=device, dtype=dtype) for m in self.layers.values()]
        return DecodeCache(layers)

    def forward(
        self,
        inputs: torch.Tensor,
        cache: DecodeCache | None = None,
        *,
        targets: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        chunk: int | None = None,
    ) -> torch.Tensor:
        """inputs (B, T) int64 token ids -> logits (B, T, vocab_size), or with ``targets`` (B, T)
        the per-token cross-entropy (B, T) in float32.

        ``position_ids`` (B, T): packed documents, transformers' convention (each token's position
        in its document, restarting at 0 where one starts; ``models/positions.py``): no attention
        or feedback crosses a document start, and RoPE takes these positions. None: one document.
        With ``cache`` (from ``init_cache``): the first call prefills, later calls take one token.
        A pipeline stage without the embedding takes hidden states (B, T, D) as ``inputs``; one
        without the head returns hidden states. Under tensor parallelism logits hold this rank's
        vocabulary rows (the loss is taken over all of them). ``chunk``: only that model chunk of
        an interleaved pipeline stage (``ModelPlan.chunk_layers``; the embedding is the first
        chunk's, the head the last's).
        """
        embeds, heads = self.chunk_ends(chunk)
        if embeds:
            if inputs.dim() != 2 or inputs.dtype not in (torch.int32, torch.int64):
                got = f"{inputs.dtype} {tuple(inputs.shape)}"
                raise ValueError(f"SessaLM expects integer token ids of shape (batch, seq), got {got}")
            if inputs.numel():
                low, high = (int(x) for x in torch.aminmax(inputs))
                if low < 0 or high >= self.cfg.vocab_size:
                    bad = low if low < 0 else high
                    raise ValueError(f"token id {bad} is outside the vocabulary of {self.cfg.vocab_size} (0 .. "
                                     f"{self.cfg.vocab_size - 1})")  # fmt: skip
            x = self.embed(inputs)
        else:
            x = inputs
        if cache is None:
            pos = self.plan.positions(x.shape[1], position_ids)
            ids = self.layers if chunk is None else map(str, self.plan.chunk_layers(self.cfg.n_layers, chunk))
            for i in ids:
                x = self.plan.recompute("full", self.compiled(self.layers[i]), x, pos)
        else:
            if len(cache.layers) != len(self.layers):
                raise ValueError(f"cache has {len(cache.layers)} layers, model has {len(self.layers)}")
            pos = cache.positions(x.shape[1], position_ids)
            for layer, state in zip(self.layers.values(), cache.layers, strict=True):
                x = layer(x, pos, state)
            cache.length += x.shape[1]
        if not heads:
            return x
        logits = self.lm_head(self.norm(x))
        return logits if targets is None else self.plan.token_loss(logits, targets)

    def chunk_ends(self, chunk: int | None) -> tuple[bool, bool]:
        """Whether model chunk ``chunk`` of this stage (None: the whole stage) starts with the
        embedding (takes token ids) and ends with the head (gives logits or the loss)."""
        return (
            self.embed is not None and chunk in (None, 0),
            self.lm_head is not None and chunk in (None, self.plan.virtual - 1),
        )

    def compiled(self, layer: nn.Module) -> nn.Module:
        """``layer``, or with ``compute.compile`` its ``torch.compile`` (made once, kept beside it)."""
        if not self.plan.compute.compile:
            return layer
        if "compiled" not in layer.__dict__:
            layer.__dict__["compiled"] = torch.compile(layer)  # not a submodule: no second state-dict entry
        return layer.__dict__["compiled"]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
