"""`sessa-paper-row`: one row of the paper's SymbolSoup table, from data to the results table.

    sessa-paper-row 125m mamba2 --nproc 8      # one node, 8 GPUs (torchrun)
    sessa-paper-row tiny sessa                 # CPU, minutes

A row is a size of ``configs/paper/rows.yaml`` and an architecture. The command
1. writes the size's SymbolSoup shards (``symbol_soup.py``) unless they are there,
2. trains the size's config with ``model.arch`` set (``sessa_train.train``; ``--nproc N`` runs N
   ranks through torchrun; an interrupted row resumes from its newest checkpoint),
3. measures test accuracy at every evaluation length (the class predicted at ``<label>``, argmax
   over the vocabulary, on examples of a seed no training example uses),
4. replaces the row in ``<results>/results.json`` and rewrites ``results.md`` and
   ``accuracy.png`` from all rows there.
Multi-node: run step 2 through ``sessa-launch`` with the config and overrides ``--dry-run``
prints (``--print-train``), then ``--skip-train`` on one node for steps 3-4.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from sessa_train.config import ARCHITECTURES
from sessa_train.errors import ConfigError, SessaError, argument_parser, user_error

# the repository's files, found from the package (not from the working directory): the rows and
# the configs they name (relative to the repository's root)
REPO = Path(__file__).resolve().parents[2]
ROWS = REPO / "configs" / "paper" / "rows.yaml"
TEST_SEED = 1_000_003  # training uses seed 0, validation seed 1


@dataclass(frozen=True)
class Size:
    name: str
    config: str
    length: int
    train: int
    val: int
    test: int
    eval_lengths: list[int]

    def __post_init__(self) -> None:
        for key in ("length", "train", "val", "test"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ConfigError(f"{ROWS} {self.name}.{key} must be a positive integer, got {getattr(self, key)!r}")
        if not self.eval_lengths or any(not isinstance(n, int) or n < 24 for n in self.eval_lengths):
            raise ConfigError(f"{ROWS} {self.name}.eval_lengths must be integers >= 24, got {self.eval_lengths!r}")


def read_sizes(path: Path = ROWS) -> dict[str, Size]:
    import yaml

    if not path.is_file():
        raise ConfigError(f"{path}: no such file (the paper's rows; pass --rows FILE)")
    try:
        raw = yaml.safe_load(path.read_text())
        sizes = {name: Size(name, **spec) for name, spec in raw.items()}
        return {n: Size(**{**vars(s), "config": str(REPO / s.config)}) if not Path(s.config).is_absolute() else s
                for n, s in sizes.items()}  # fmt: skip
    except (OSError, yaml.YAMLError, TypeError, AttributeError) as e:
        raise ConfigError(f"{path}: not a mapping of sizes to {{config, length, train, val, test, eval_lengths}} "
                          f"({type(e).__name__}: {e})") from None  # fmt: skip


def write_data(size: Size, data_path: Path) -> None:
    from sessa_train.data.shards import INDEX_NAME
    from sessa_train.evaluation.tasks import write_task_shards

    if (data_path / INDEX_NAME).is_file():
        return
    start = time.perf_counter()
    write_task_shards("symbol_soup", data_path, seq_len=size.length, train=size.train, val=size.val, seed=0)
    print(f"wrote SymbolSoup-{size.length} ({size.train} train, {size.val} val) to {data_path} "
          f"in {time.perf_counter() - start:.0f}s", flush=True)  # fmt: skip


def train_command(size: Size, arch: str, run: Path, nproc: int, extra: list[str]) -> list[str]:
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    overrides = [f"model.arch={arch}", f"checkpoint.dir={run / 'checkpoints'}", f"logging.dir={run / 'tensorboard'}",
                 "checkpoint.resume=auto", *extra]  # fmt: skip
    return [*launcher, "-m", "sessa_train.train", "--config", size.config, *overrides]


def evaluate_row(size: Size, arch: str, run: Path, cfg) -> dict:
    import torch

    from sessa_train.evaluation.evaluate import task_accuracy
    from sessa_train.evaluation.report import load_model

    model = load_model(run / "checkpoints")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device)
    accuracy = {}
    for n in size.eval_lengths:
        accuracy[str(n)] = task_accuracy(model, "symbol_soup", n, samples=size.test, seed=TEST_SEED, batch_size=8)
    metrics = [json.loads(line) for line in (run / "tensorboard" / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in metrics if "train/loss" in m]
    val = [m["val/loss"] for m in metrics if "val/loss" in m]
    return {
        "row": f"{size.name}-{arch}",
        "size": size.name,
        "arch": arch,
        "parameters": model.num_parameters(),
        "train_length": size.length,
        "steps": train[-1]["step"],
        "tokens": train[-1]["step"] * cfg.schedule.global_batch_size * size.length,
        "first_loss": train[0]["train/loss"],
        "final_loss": train[-1]["train/loss"],
        "val_loss": val[-1] if val else None,
        "accuracy": accuracy,
    }


def replace_row(row: dict, out: Path, order) -> list[dict]:
    """``row`` in place of the one of its name in ``out``/results.json (written whole, then renamed
    into place); every row there, sorted by ``order``."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    rows = [r for r in (json.loads(path.read_text()) if path.is_file() else []) if r["row"] != row["row"]]
    rows = sorted([*rows, row], key=order)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows, indent=1))
    os.replace(tmp, path)
    return rows


def write_results(row: dict, out: Path) -> list[dict]:
    """Replace ``row`` in results.json (by its name) and rewrite results.md and accuracy.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = replace_row(row, out, lambda r: (r["size"], r["arch"]))
    lengths = sorted({int(n) for r in rows for n in r["accuracy"]})
    lines = [
        "| row | parameters | trained at | tokens | final train loss | val loss | "
        + " | ".join(f"acc@{n}" for n in lengths)
        + " |",
        "|---" * (6 + len(lengths)) + "|",
    ]
    for r in rows:
        acc = [f"{r['accuracy'][str(n)]:.3f}" if str(n) in r["accuracy"] else "-" for n in lengths]
        val = f"{r['val_loss']:.4f}" if r["val_loss"] is not None else "-"
        lines.append(f"| {r['row']} | {r['parameters']:,} | {r['train_length']} | {r['tokens']:,} | "
                     f"{r['final_loss']:.4f} | {val} | " + " | ".join(acc) + " |")  # fmt: skip
    (out / "results.md").write_text("\n".join(lines) + "\n\nChance: 0.050 (20 classes).\n")
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for r in rows:
        points = sorted((int(n), a) for n, a in r["accuracy"].items())
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=r["row"])
    ax.axhline(1 / 20, color="k", lw=0.6, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("test length (tokens)")
    ax.set_ylabel("SymbolSoup accuracy")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)
    plt.close(fig)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argument_parser(prog="sessa-paper-row", description=__doc__)
    p.add_argument("size", help=f"a size of {ROWS} (tiny, 125m, 350m)")
    p.add_argument("arch", choices=ARCHITECTURES)
    p.add_argument("--rows", type=Path, default=ROWS, help=f"the rows file (default: {ROWS})")
    p.add_argument("--nproc", type=int, default=1, help="ranks on this node (torchrun), e.g. 8 GPUs")
    p.add_argument("--results", type=Path, default=Path("runs/paper/results"))
    p.add_argument("--runs", type=Path, default=Path("runs/paper"), help="each row trains in RUNS/<size>-<arch>")
    p.add_argument("--skip-train", action="store_true", help="evaluate the row's newest checkpoint only")
    p.add_argument("--print-train", action="store_true", help="print the training command and stop")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the size's config (schedule.train_steps=..)")
    args = p.parse_intermixed_args(argv)
    if args.nproc < 1:
        p.error(f"argument --nproc: must be >= 1, got {args.nproc}")
    try:
        from sessa_train.config import load_config

        sizes = read_sizes(args.rows)
        if args.size not in sizes:
            raise ConfigError(f"size {args.size!r} is not in {args.rows}; valid: {', '.join(sizes)}")
        size = sizes[args.size]
        run = args.runs / f"{size.name}-{args.arch}"
        cfg = load_config([size.config], [f"model.arch={args.arch}", *args.overrides])
        command = train_command(size, args.arch, run, args.nproc, args.overrides)
        if args.print_train:
            print(" ".join(command))
            return 0
        write_data(size, Path(cfg.data.path))
        if not args.skip_train:
            print(f"training {run.name}: {' '.join(command)}", flush=True)
            if subprocess.run(command).returncode != 0:
                raise SessaError(f"training of {run.name} failed (its output is above)")
        row = evaluate_row(size, args.arch, run, cfg)
    except SessaError as e:
        return user_error(p.prog, e)
    write_results(row, args.results)
    accuracy = ", ".join(f"{n}: {a:.3f}" for n, a in row["accuracy"].items())
    print(f"{row['row']}: accuracy {accuracy}; wrote {args.results}/results.md, results.json, accuracy.png")
    return 0
