"""`python -m sessa_train.evaluation.report`: task accuracy by length or lag (and validation
perplexity) for several models, as a Markdown table, JSON, a PNG plot and tensorboard scalars.

    python -m sessa_train.evaluation.report --model sessa=runs/needle-sessa/ckpt \\
        --model transformer=runs/needle-tf/ckpt --task needle --seq-len 256 --lags 16 64 128 250 \\
        --samples 256 --out runs/eval-needle
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sessa_train.evaluation.evaluate import perplexity, task_accuracy
from sessa_train.evaluation.tasks import TASKS
from sessa_train.models import SessaLM


def load_model(path: str | Path) -> SessaLM:
    """An export folder (config.json) or a training checkpoint (step_N folder or its root)."""
    from sessa_train.checkpoint import read_weights
    from sessa_train.config import ModelConfig
    from sessa_train.export import load_pretrained

    if (Path(path) / "config.json").is_file():
        return load_pretrained(path)
    weights, client = read_weights(path)
    model = SessaLM(ModelConfig.from_dict(client["config"]["model"]))
    model.load_state_dict(weights)
    return model.eval()


def evaluate(args: argparse.Namespace) -> list[dict]:
    rows = []
    for name, path in args.model:
        model = load_model(path)
        if args.task == "needle":
            points = [("lag", lag, {"seq_len": args.seq_len, "lag": lag}) for lag in args.lags]
        else:
            points = [("seq_len", n, {"seq_len": n}) for n in args.seq_lens]
        for axis, x, kw in points:
            seq_len = kw.pop("seq_len")
            acc = task_accuracy(model, args.task, seq_len, samples=args.samples, seed=args.seed, **kw)
            rows.append({"model": name, "task": args.task, axis: x, "seq_len": seq_len, "accuracy": acc})
        if args.val_shards:
            loss, ppl = perplexity(model, args.val_shards, batches=args.val_batches)
            rows.append({"model": name, "task": "val", "loss": loss, "perplexity": ppl})
    return rows


def write_outputs(rows: list[dict], task: str, out: Path) -> str:
    """Markdown table (returned), eval.json, accuracy.png and tensorboard events under ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torch.utils.tensorboard import SummaryWriter

    out.mkdir(parents=True, exist_ok=True)
    acc = [r for r in rows if "accuracy" in r]
    axis = "lag" if task == "needle" else "seq_len"
    xs = sorted({r[axis] for r in acc})
    models = list(dict.fromkeys(r["model"] for r in rows))
    table = [f"| {axis} | " + " | ".join(models) + " |", "|---" * (len(models) + 1) + "|"]
    for x in xs:
        cells = [next((f"{r['accuracy']:.3f}" for r in acc if r["model"] == m and r[axis] == x), "-") for m in models]
        table.append(f"| {x} | " + " | ".join(cells) + " |")
    for r in rows:
        if r["task"] == "val":
            table.append(f"\nvalidation ({r['model']}): loss {r['loss']:.4f}, perplexity {r['perplexity']:.2f}")
    (out / "eval.json").write_text(json.dumps(rows, indent=1))
    fig, ax = plt.subplots(figsize=(5, 3.2))
    writer = SummaryWriter(str(out / "tb"))
    for m in models:
        points = sorted((r[axis], r["accuracy"]) for r in acc if r["model"] == m)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=m)
        for x, a in points:
            writer.add_scalar(f"eval/{task}/{m}/accuracy", a, x)
    writer.close()
    ax.set_xlabel(axis)
    ax.set_ylabel("answer accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(task)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)
    plt.close(fig)
    return "\n".join(table)


def main(argv: list[str] | None = None) -> int:
    from sessa_train.errors import argument_parser, user_error

    p = argument_parser(prog="python -m sessa_train.evaluation.report", description=__doc__)
    p.add_argument(
        "--model",
        action="append",
        required=True,
        type=lambda s: tuple(s.split("=", 1)),
        help="NAME=PATH (an export or a checkpoint); repeat to compare",
    )
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[64, 128, 256], help="recall / soup")
    p.add_argument("--seq-len", type=int, default=256, help="needle")
    p.add_argument("--lags", type=int, nargs="+", default=[16, 64, 128, 250], help="needle")
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--seed", type=int, default=10_000, help="evaluation samples (training used other seeds)")
    p.add_argument("--val-shards", help="also report validation perplexity on these shards")
    p.add_argument("--val-batches", type=int, default=20)
    p.add_argument("--out", type=Path, default=Path("runs/eval"))
    args = p.parse_args(argv)
    if any(len(m) != 2 or not Path(m[1]).exists() for m in args.model):
        p.error(f"--model takes NAME=PATH with an existing PATH, got {['='.join(m) for m in args.model]}")
    if args.samples < 1:
        p.error(f"--samples must be >= 1, got {args.samples}")
    try:
        rows = evaluate(args)
    except ValueError as e:
        return user_error(p.prog, e)
    print(write_outputs(rows, args.task, args.out))
    print(f"wrote {args.out / 'eval.json'}, {args.out / 'accuracy.png'}, {args.out / 'tb'}")
    return 0
