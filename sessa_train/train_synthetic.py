"""Short CPU training run of a tiny Sessa LM on a synthetic copy task.

Each sequence is ``x_1 .. x_n SEP x_1 .. x_n``; the loss is taken on the copied half,
which the model can only predict by retrieving tokens n+1 positions back. Chance level
is ln(vocab - 2). This is the main job until the full trainer lands; it needs no data.

    python -m sessa_train.train_synthetic --steps 300
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sessa_train.config import ModelConfig
from sessa_train.models import SessaLM
from sessa_train.ops.feedback import BACKENDS

SEP = 0


def copy_batch(batch_size: int, n: int, vocab_size: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Token ids (B, 2n+1) and next-token targets with -100 outside the copied half."""
    x = torch.randint(1, vocab_size, (batch_size, n), generator=generator)
    ids = torch.cat([x, torch.full((batch_size, 1), SEP), x], dim=1)
    targets = torch.full_like(ids, -100)
    targets[:, n:-1] = x  # position n (SEP) predicts x_1, ..., position 2n-1 predicts x_n
    return ids, targets


def train(
    cfg: ModelConfig,
    *,
    steps: int,
    batch_size: int,
    copy_len: int,
    lr: float,
    seed: int,
    log_every: int = 0,
) -> list[float]:
    """Train with AdamW + linear warmup/cosine decay; return the loss of every step."""
    torch.manual_seed(seed)
    model = SessaLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
    )
    data = torch.Generator().manual_seed(seed + 1)
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        ids, targets = copy_batch(batch_size, copy_len, cfg.vocab_size, data)
        logits = model(ids)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log_every and (step % log_every == 0 or step == steps):
            elapsed = time.perf_counter() - start
            eta = elapsed / step * (steps - step)
            print(f"step {step:5d}/{steps}  loss {loss.item():.4f}  lr {sched.get_last_lr()[0]:.2e}  "
                  f"{elapsed:6.1f}s elapsed  eta {eta:5.1f}s", flush=True)  # fmt: skip
    return losses


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=positive_int, default=400)
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--copy-len", type=positive_int, default=32, help="n: tokens to copy (sequence is 2n+1)")
    p.add_argument("--vocab-size", type=positive_int, default=18)
    p.add_argument("--d-model", type=positive_int, default=64)
    p.add_argument("--n-layers", type=positive_int, default=2)
    p.add_argument("--n-heads", type=positive_int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=BACKENDS, default="auto")
    p.add_argument("--log-every", type=positive_int, default=25)
    p.add_argument("--out", type=Path, default=Path("runs/synthetic"), help="where losses.json is written")
    args = p.parse_args(argv)
    if args.vocab_size < 3:
        p.error(f"--vocab-size must be >= 3 (separator + at least 2 symbols), got {args.vocab_size}")
    if not args.lr > 0:
        p.error(f"--lr must be > 0, got {args.lr}")
    try:
        cfg = ModelConfig(
            vocab_size=args.vocab_size,
            d_model=args.d_model,
            n_layers=args.n_layers,
            n_heads=args.n_heads,
            feedback_backend=args.backend,
            feedback_chunk_size=32,
        )
    except ValueError as e:
        p.error(str(e))
    model_size = SessaLM(cfg).num_parameters()
    print(f"Sessa LM: {model_size / 1e3:.1f}k parameters, copy task n={args.copy_len}, "
          f"chance loss ln({args.vocab_size - 1}) = {math.log(args.vocab_size - 1):.3f}")  # fmt: skip
    losses = train(
        cfg,
        steps=args.steps,
        batch_size=args.batch_size,
        copy_len=args.copy_len,
        lr=args.lr,
        seed=args.seed,
        log_every=args.log_every,
    )
    first, last = sum(losses[:10]) / min(10, len(losses)), sum(losses[-10:]) / min(10, len(losses))
    print(f"loss: first 10 steps {first:.4f} -> last 10 steps {last:.4f} ({100 * last / first:.1f}% of start)")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "losses.json").write_text(json.dumps({"config": cfg.to_dict(), "losses": losses}, indent=1))
    print(f"wrote {args.out / 'losses.json'}")


if __name__ == "__main__":
    main()
