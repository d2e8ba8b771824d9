"""Data pipeline throughput on this machine: shard writing and loading, in tokens/s,
against the tokens/s one tiny-model training step consumes on the same CPU.

    python tools/bench_data.py            # uses (and if needed builds) data/default/
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from sessa_train.config import load_config
from sessa_train.data import PackedTokenLoader
from sessa_train.data.cli import prepare_default_data_main
from sessa_train.data.documents import iter_documents
from sessa_train.data.shards import write_shards
from sessa_train.models import SessaLM

TINY_PRESET = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"


def bench_write(corpus: Path, tokenizer: Path, seq_len: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        index = write_shards(iter_documents([corpus]), tokenizer, out, seq_len=seq_len, samples_per_shard=128)
        seconds = time.perf_counter() - start
    tokens = sum(s["tokens"] for s in index["splits"].values())
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def bench_load(shards: Path, micro_batch: int, workers: int) -> dict:
    loader = PackedTokenLoader(shards, micro_batch_size=micro_batch, num_workers=workers, max_epochs=1)
    start = time.perf_counter()
    tokens = sum(b["tokens"].numel() for b in loader)
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def bench_train_step(seq_len: int, micro_batch: int, steps: int) -> dict:
    """Forward + backward + AdamW of the `tiny` preset's model (what the trainer runs on CPU)."""
    torch.manual_seed(0)
    cfg = load_config([TINY_PRESET]).model
    vocab_size = cfg.vocab_size
    model = SessaLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, vocab_size, (micro_batch, seq_len + 1))

    def step() -> None:
        logits = model(ids[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - start
    return {
        "tokens": steps * micro_batch * seq_len,
        "seconds": seconds,
        "tokens_per_s": steps * micro_batch * seq_len / seconds,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=Path("data/default"))
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--train-steps", type=int, default=5)
    p.add_argument("--json", type=Path, default=Path("runs/bench_data.json"))
    args = p.parse_args()
    if args.micro_batch < 1 or args.train_steps < 1:
        p.error(f"--micro-batch and --train-steps must be >= 1, got {args.micro_batch} and {args.train_steps}")
    if not (args.data_dir / "shards" / "index.json").exists():
        prepare_default_data_main(["--out-dir", str(args.data_dir)])
    shards = args.data_dir / "shards"
    index = json.loads((shards / "index.json").read_text())
    seq_len = index["seq_len"]
    rows = {
        f"write shards ({os.cpu_count()} processes)": bench_write(
            args.data_dir / "corpus.jsonl", args.data_dir / "tokenizer.model", seq_len
        ),
        "load, 0 workers": bench_load(shards, args.micro_batch, 0),
        "load, 2 workers": bench_load(shards, args.micro_batch, 2),
        f"train step, tiny preset, batch {args.micro_batch}x{seq_len}": bench_train_step(
            seq_len, args.micro_batch, args.train_steps
        ),
    }
    consume = rows[next(k for k in rows if k.startswith("train step"))]["tokens_per_s"]
    print(f"# data pipeline, {os.cpu_count()} cores, torch {torch.__version__}, seq_len {seq_len}")
    print("| what | tokens | seconds | tokens/s | x training consumption |\n|---|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['tokens']} | {r['seconds']:.2f} | {r['tokens_per_s']:,.0f} | "
            f"{r['tokens_per_s'] / consume:.1f}x |"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
