"""Text generation with the recurrent decode path (prefill, then O(t·D) per token); the command
``sessa-generate`` is ``cli.generate_main``.

sessa-generate EXPORT --prompt "The module" --max-new-tokens 64 --temperature 0.8 --top-p 0.95
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from sessa_train.models import SessaLM
from sessa_train.models.positions import positions_of

PREALLOCATED = 256  # decode positions a cache holds beyond the prompt before it grows (doubling)


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator) -> torch.Tensor:
    """logits (B, V) -> next ids (B,). temperature 0 = greedy; top_k 0 / top_p 1 = no filtering."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token once the tokens before it already cover top_p (the first always stays)
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: SessaLM,
    prompt: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    attention_mask: torch.Tensor | None = None,
    document_eos: int | None = None,
    vocab: int | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next ids (B,) one step at a time. prompt (B, T0) int64, T0 >= 1.

    ``attention_mask`` (B, T0): a batch of prompts of different lengths, padded (left padding, as
    for generation elsewhere): each row generates what it would alone. ``document_eos``: the EOS
    of a model trained with document masking, after which a new document starts (in the prompt and
    in what is generated). ``vocab``: only ids below it are generated (the tokenizer's, where the
    model's vocabulary is padded beyond it). Stops early once every row has produced ``eos_id``.
    """
    if prompt.dim() != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be (batch, >=1 tokens), got shape {tuple(prompt.shape)}")
    if not (temperature >= 0 and top_k >= 0 and 0 < top_p <= 1):
        raise ValueError(f"need temperature >= 0, top_k >= 0, 0 < top_p <= 1; got {temperature}, {top_k}, {top_p}")
    p = next(model.parameters())
    prompt = prompt.to(p.device)
    position_ids = positions_of(prompt, None if attention_mask is None else attention_mask.to(p.device), document_eos)
    room = prompt.shape[1] + min(max_new_tokens, PREALLOCATED)
    cache = model.init_cache(prompt.shape[0], room, device=p.device, dtype=p.dtype)
    logits = model(prompt, cache, position_ids=position_ids)[:, -1]
    for _ in range(max_new_tokens):
        if vocab is not None and vocab < logits.shape[-1]:
            logits[:, vocab:] = float("-inf")  # ids the tokenizer has no token for
        ids = sample_next(logits, temperature, top_k, top_p, generator)
        yield ids
        if eos_id is not None and bool((ids == eos_id).all()):
            return
        positions = None  # every row's document goes on
        if document_eos is not None:
            current = cache.length - (0 if cache.doc_start is None else cache.doc_start)
            positions = torch.where(ids == document_eos, 0, current).to(torch.int64).view(-1, 1)
        cache.reserve(1)
        logits = model(ids.unsqueeze(1), cache, position_ids=positions)[:, -1]


def device_named(name: str) -> torch.device:
    """The --device argument, checked against this machine."""
    from sessa_train.errors import ConfigError

    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name}: not a device; valid: cpu, cuda, cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: this machine has no CUDA device; valid: cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA devices")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name}: valid: cpu, cuda, cuda:N")
    return device


def check_room(model: SessaLM, positions: int, device: torch.device) -> None:
    """A one-line error when the decode state of ``positions`` tokens cannot fit the device's
    memory (the caches grow as generation goes; this says at once that they could not grow so far)."""
    from sessa_train.errors import ConfigError

    probe = model.init_cache(1, 1, device="meta")
    per_token = sum(t.numel() * t.element_size() for c in probe.layers for t in vars(c).values() if torch.is_tensor(t))
    need = per_token * positions
    if device.type == "cuda":
        have = torch.cuda.get_device_properties(device).total_memory
    else:
        with open("/proc/meminfo") as fh:
            have = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("MemAvailable:"))
    if need > have:
        raise ConfigError(
            f"{positions:,} tokens of prompt and --max-new-tokens need {need / 2**30:,.1f} GiB of decode state, more "
            f"than the {have / 2**30:.1f} GiB available; lower --max-new-tokens to at most {have // per_token:,}"
        )
