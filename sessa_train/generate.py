"""Text generation from an export with the recurrent decode path (prefill, then O(t·D) per token).

sessa-generate EXPORT --prompt "The module" --max-new-tokens 64 --temperature 0.8 --top-p 0.95
"""

from __future__ import annotations

import argparse
import sys
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
) -> Iterator[torch.Tensor]:
    """Yield the next ids (B,) one step at a time. prompt (B, T0) int64, T0 >= 1.

    ``attention_mask`` (B, T0): a batch of prompts of different lengths, padded (left padding, as
    for generation elsewhere): each row generates what it would alone. ``document_eos``: the EOS
    of a model trained with document masking, after which a new document starts (in the prompt and
    in what is generated). Stops early once every row has produced ``eos_id``.
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


def _device(name: str) -> torch.device:
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


def main(argv: list[str] | None = None) -> int:
    from sessa_train.data import Tokenizer
    from sessa_train.errors import SessaError
    from sessa_train.export import load_pretrained

    p = argparse.ArgumentParser(prog="sessa-generate", description=__doc__.splitlines()[0])
    p.add_argument("export", help="a folder written by sessa-export")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        p.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    try:
        device = _device(args.device)
        model = load_pretrained(args.export, device=device)
        sp = Tokenizer(f"{args.export}/tokenizer.model").sp
    except SessaError as e:
        print(f"sessa-generate: error: {e}", file=sys.stderr)
        return 2
    ids = sp.encode(args.prompt)
    if not ids:
        p.error("--prompt encodes to no tokens")
    generator = torch.Generator(device=device).manual_seed(args.seed)
    try:
        steps = generate(
            model,
            torch.tensor([ids]),
            args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            eos_id=sp.eos_id(),
            generator=generator,
        )
        out, shown = list(ids), sp.decode(ids)
        print(shown, end="", flush=True)
        for next_id in steps:
            out.append(int(next_id[0]))
            text = sp.decode(out)
            print(text[len(shown) :], end="", flush=True)  # stream the new characters
            shown = text
    except ValueError as e:
        print(f"\nsessa-generate: error: {e}", file=sys.stderr)
        return 2
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
