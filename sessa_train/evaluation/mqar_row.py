"""`sessa-mqar-row`: one row of the MQAR grid (Zoology's multi-query associative recall), from
data to the results table.

    sessa-mqar-row transformer 64          # CPU: three cells x three learning rates
    sessa-mqar-row sessa 128 --cells 256:16 --lrs 3e-3

A row is an architecture at a width (``model.arch``, ``model.d_model`` over
``configs/mqar/base.yaml``: 2 layers, vocabulary 256 on CPU, 24000 steps of 64 examples; a cell
at least as long as the vocabulary takes the next power of two, as Zoology requires vocab >
length). For
each cell (sequence length, key-value pairs) the command
1. writes the cell's MQAR shards (``mqar.py``; train seed 0, validation seed 1) unless they are
   there: ``train_steps x global_batch_size`` training examples, each seen once;
2. trains one run per learning rate of the sweep (``sessa_train.train``; a finished run is kept
   and not trained again, and a run trained with another model, data, optimizer or schedule is
   refused in one line);
3. measures accuracy on ``--test`` held-out examples (a seed no training example uses): the
   fraction of recalled values predicted exactly (argmax over the vocabulary at each query);
4. keeps the best learning rate per cell, as Zoology does, and replaces the row in
   ``<results>/results.json``, then rewrites ``results.md`` and ``accuracy.png`` (accuracy
   against d_model, one panel per cell, one line per architecture) from all rows there.

The shards are scored (``data/shards.py``): the trainer's loss counts the recalled values only,
against their labels, as Zoology's does, and the input after a query is a random id, not the value
(``mqar.py`` says why: with the value there a Transformer learnt to answer by elimination).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from sessa_train.config import ARCHITECTURES
from sessa_train.errors import ConfigError, SessaError, argument_parser, user_error
from sessa_train.evaluation import mqar
from sessa_train.evaluation.paper import REPO, TEST_SEED, replace_row  # TEST_SEED: the paper rows' held-out seed

CONFIG = REPO / "configs" / "mqar" / "base.yaml"
CELLS = ((64, 4), (128, 8), (256, 16))
LRS = (3e-4, 1e-3, 3e-3)  # Zoology sweeps 1e-4 .. 1e-2
RECIPE = ("model", "data", "optimizer", "schedule")  # what a kept run must have been trained with


def parse_cell(text: str) -> tuple[int, int]:
    """``LENGTH:PAIRS`` as the command line gives it."""
    try:
        length, pairs = (int(x) for x in text.split(":"))
    except ValueError:
        raise ConfigError(f"cell {text!r} is not LENGTH:PAIRS (e.g. 64:4)") from None
    if not mqar.fits(length, pairs):
        raise ConfigError(f"cell {text!r}: MQAR needs an even length >= 4 x pairs (Zoology's bound)")
    return length, pairs


def _rate(text: str) -> float:
    """A learning rate of ``--lrs``; a key=value there is an override that the list swallowed."""
    try:
        return float(text)
    except ValueError:
        hint = "; put key=value overrides before --lrs or after --" if "=" in text else ""
        raise argparse.ArgumentTypeError(f"{text!r} is not a learning rate{hint}") from None


def cell_name(length: int, pairs: int) -> str:
    return f"{length}x{pairs}"


def cell_vocab(vocab: int, length: int) -> int:
    """The vocabulary of a cell: ``model.vocab_size``, or where that is not above the cell's length
    (Zoology requires vocab > length) the smallest power of two that is."""
    return vocab if vocab > length else 1 << length.bit_length()


def write_data(path: Path, length: int, pairs: int, train: int, val: int, vocab: int) -> None:
    from sessa_train.data.shards import INDEX_NAME
    from sessa_train.evaluation.tasks import write_task_shards

    if (path / INDEX_NAME).is_file():
        return
    start = time.perf_counter()
    write_task_shards("mqar", path, seq_len=length, train=train, val=val, seed=0, pairs=pairs, vocab=vocab,
                      samples_per_shard=4096, scored=True)  # fmt: skip
    print(f"wrote MQAR {cell_name(length, pairs)} ({train} train, {val} val) to {path} in "
          f"{time.perf_counter() - start:.0f}s", flush=True)  # fmt: skip


def train_command(run: Path, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "sessa_train.train", "--config", str(CONFIG),
            f"checkpoint.dir={run / 'checkpoints'}", f"logging.dir={run / 'tensorboard'}", *overrides]  # fmt: skip


def train_and_score(run: Path, overrides: list[str], length: int, pairs: int, test: int, vocab: int) -> dict:
    """One run of a cell at one learning rate (trained unless its last checkpoint is there): its
    held-out accuracy, losses, parameters and training seconds."""
    from sessa_train.checkpoint import find_checkpoint, read_config, read_meta
    from sessa_train.config import load_config
    from sessa_train.errors import CheckpointError
    from sessa_train.evaluation.evaluate import task_accuracy
    from sessa_train.evaluation.report import load_model

    cfg = load_config([CONFIG], overrides)
    start = time.perf_counter()
    try:
        found = find_checkpoint(run / "checkpoints")
    except CheckpointError:
        found = None
    if found is not None:
        saved, wanted = read_config(found), cfg.to_dict()
        for section in RECIPE:
            for key, value in wanted[section].items():
                if saved.get(section, {}).get(key) != value:
                    raise ConfigError(
                        f"{run} was trained with {section}.{key}={saved.get(section, {}).get(key)!r}, this row "
                        f"asks for {value!r}: delete that run or give another --runs"
                    )
    done = found is not None and read_meta(found).step >= cfg.schedule.train_steps
    if not done:
        command = train_command(run, [*overrides, "checkpoint.resume=auto"])
        print(f"training {run.name}: {' '.join(command)}", flush=True)
        if subprocess.run(command).returncode != 0:
            raise SessaError(f"training of {run.name} failed (its output is above)")
        (run / "train_seconds.json").write_text(json.dumps(time.perf_counter() - start))
    timed = run / "train_seconds.json"  # a kept run: what training it took when it was trained
    seconds = json.loads(timed.read_text()) if timed.is_file() else time.perf_counter() - start
    model = load_model(run / "checkpoints")
    accuracy = task_accuracy(model, "mqar", length, samples=test, seed=TEST_SEED, batch_size=50, pairs=pairs,
                             vocab=vocab)  # fmt: skip
    rows = [json.loads(line) for line in (run / "tensorboard" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    return {"accuracy": accuracy, "first_loss": losses[0], "final_loss": losses[-1],
            "parameters": model.num_parameters(), "train_seconds": seconds}  # fmt: skip


def write_results(row: dict, out: Path) -> list[dict]:
    """Replace ``row`` in results.json (by its name) and rewrite results.md and accuracy.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = replace_row(row, out, lambda r: (r["arch"], r["d_model"]))
    cells = sorted({c for r in rows for c in r["cells"]}, key=lambda c: [int(x) for x in c.split("x")])
    lines = ["| row | parameters | " + " | ".join(f"{c}: accuracy (lr)" for c in cells) + " | minutes |",
             "|---" * (3 + len(cells)) + "|"]  # fmt: skip
    for r in rows:
        acc = [f"{r['cells'][c]['accuracy']:.3f} ({r['cells'][c]['lr']:g})" if c in r["cells"] else "-" for c in cells]
        lines.append(f"| {r['row']} | {r['parameters']:,} | " + " | ".join(acc) + f" | {r['seconds'] / 60:.1f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    fig, axes = plt.subplots(1, len(cells), figsize=(3.2 * len(cells), 3.0), sharey=True, squeeze=False)
    for ax, cell in zip(axes[0], cells, strict=True):
        for i, arch in enumerate(sorted({r["arch"] for r in rows})):
            points = sorted((r["d_model"], r["cells"][cell]["accuracy"]) for r in rows
                            if r["arch"] == arch and cell in r["cells"])  # fmt: skip
            if points:  # markers of shrinking size, so that equal accuracies stay visible
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=10 - 3 * (i % 3),
                        label=arch)  # fmt: skip
        ax.set_title(f"length {cell.split('x')[0]}, {cell.split('x')[1]} pairs", fontsize=9)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("d_model")
        ax.set_ylim(0, 1.02)
    axes[0][0].set_ylabel("MQAR accuracy")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)
    plt.close(fig)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argument_parser(prog="sessa-mqar-row", description=__doc__)
    p.add_argument("arch", choices=ARCHITECTURES)
    p.add_argument("d_model", type=int)
    p.add_argument("--cells", nargs="+", default=[f"{n}:{k}" for n, k in CELLS], help="LENGTH:PAIRS cells")
    p.add_argument("--lrs", nargs="+", type=_rate, default=list(LRS), help="the learning-rate sweep")
    p.add_argument("--test", type=int, default=1000, help="held-out examples per cell")
    p.add_argument("--data", type=Path, default=Path("data/mqar"),
                   help="each cell's shards in DATA/<cell>-v<V>-n<N>-labels")  # fmt: skip
    p.add_argument("--runs", type=Path, default=Path("runs/mqar"), help="each run in RUNS/<arch>-d<d>-<cell>-lr<lr>")
    p.add_argument("--results", type=Path, default=Path("runs/mqar/results"))
    p.add_argument(
        "overrides", nargs="*", help="key=value overrides of configs/mqar/base.yaml (schedule.train_steps=..)"
    )
    args = p.parse_intermixed_args(argv)
    start = time.perf_counter()
    try:
        from sessa_train.config import load_config

        cells = [parse_cell(c) for c in args.cells]
        if any(lr <= 0 for lr in args.lrs) or args.test < 1:
            raise ConfigError(f"--lrs must be positive and --test >= 1, got --lrs {args.lrs} --test {args.test}")
        base = [f"model.arch={args.arch}", f"model.d_model={args.d_model}", *args.overrides]
        cfg = load_config([CONFIG], base)
        vocab, examples = cfg.model.vocab_size, cfg.schedule.train_steps * cfg.schedule.global_batch_size
        row = {"row": f"{args.arch}-d{args.d_model}", "arch": args.arch, "d_model": args.d_model, "cells": {}}
        for length, pairs in cells:
            name, v = cell_name(length, pairs), cell_vocab(vocab, length)
            if v != vocab:
                print(f"cell {name}: vocabulary {v} (Zoology's bound: more ids than the length)", flush=True)
            data = args.data / f"{name}-v{v}-n{examples}-labels"  # another vocabulary or size: other shards
            write_data(data, length, pairs, examples, 256, v)
            runs = {}
            for lr in args.lrs:
                run = args.runs / f"{row['row']}-{name}-lr{lr:g}"
                overrides = [*base, f"model.vocab_size={v}", f"data.path={data}", f"optimizer.lr={lr}",
                             f"optimizer.min_lr={lr / 10}"]  # fmt: skip
                runs[lr] = train_and_score(run, overrides, length, pairs, args.test, v)
                print(f"{row['row']} {name} lr {lr:g}: accuracy {runs[lr]['accuracy']:.3f}", flush=True)
            best = max(runs, key=lambda lr: runs[lr]["accuracy"])
            row["cells"][name] = {"lr": best, "accuracy": runs[best]["accuracy"], "vocab": v,
                                  "by_lr": {f"{lr:g}": r for lr, r in runs.items()}}  # fmt: skip
            row.setdefault("parameters", runs[best]["parameters"])  # the first cell's (another vocabulary: more)
        # the row's training, kept runs included (as long as each took when it was trained)
        row["seconds"] = sum(r["train_seconds"] for c in row["cells"].values() for r in c["by_lr"].values())
        row["wall_seconds"] = time.perf_counter() - start  # this command's own
        row["command"] = " ".join(["sessa-mqar-row", *(argv if argv is not None else sys.argv[1:])])
    except SessaError as e:
        return user_error(p.prog, e)
    write_results(row, args.results)
    summary = ", ".join(f"{c}: {v['accuracy']:.3f} (lr {v['lr']:g})" for c, v in row["cells"].items())
    print(f"{row['row']}: {summary}; {row['seconds'] / 60:.1f} min of training; wrote {args.results}/results.md, "
          "results.json, accuracy.png")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
