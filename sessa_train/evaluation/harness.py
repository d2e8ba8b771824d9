"""lm-evaluation-harness on an export or a checkpoint: ``sessa-eval``, and during training
(``logging.lm_eval``).

lm-eval's own Python API (``lm_eval.simple_evaluate``) with its ``hf`` model runs the export
through transformers (``trust_remote_code``: the export's own model and tokenizer code), so its
numbers are the ones ``lm_eval --model hf --model_args pretrained=EXPORT,trust_remote_code=True``
gives. Tasks are lm-eval task names or local task YAML files (their folders are added to lm-eval's
task search path). A checkpoint is exported to a temporary folder first. The results JSON goes
next to the run (``<logging.dir>/lm_eval/step_N.json`` for a checkpoint, ``<export>/lm_eval.json``
for an export) and the scalars (``lm_eval/<task>/<metric>``) into its metrics.jsonl and
tensorboard.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from sessa_train.errors import SessaError


def task_names(tasks: list[str]) -> tuple[list[str], list[str]]:
    """(the task names, the folders of the local task files among them)."""
    names, folders = [], []
    for task in tasks:
        path = Path(task)
        if path.suffix in (".yaml", ".yml"):
            if not path.is_file():
                raise SessaError(f"task file {task} does not exist")
            import yaml

            spec = yaml.safe_load(path.read_text()) or {}
            if not isinstance(spec, dict) or "task" not in spec:
                raise SessaError(f"task file {task} names no task (a 'task:' key)")
            names.append(str(spec["task"]))
            folders.append(str(path.resolve().parent))
        else:
            names.append(task)
    return names, sorted(set(folders))


def scalars_of(results: dict) -> dict[str, float]:
    """``lm_eval/<task>/<metric>`` of every numeric metric lm-eval reports (not the stderrs)."""
    out = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            name = key.split(",")[0]
            numeric = isinstance(value, int | float) and not isinstance(value, bool)
            if numeric and not name.endswith("_stderr") and name != "sample_len":
                out[f"lm_eval/{task}/{name}"] = float(value)
    return out


def evaluate_export(export: str | Path, tasks: list[str], *, batch_size: int = 4, limit: int = 0, device="cpu") -> dict:
    """lm-eval's results dict of ``tasks`` on an export folder."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise SessaError(f"lm-evaluation-harness is not installed ({e.name}): pip install 'lm-eval[hf]'") from None
    names, folders = task_names(tasks)
    manager = TaskManager(include_path=folders or None)
    if unknown := [n for n in names if n not in manager.all_tasks]:
        raise SessaError(f"lm-eval knows no task {', '.join(unknown)} (local ones: pass their YAML files)")
    return lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={Path(export).resolve()},trust_remote_code=True,dtype=float32",
        tasks=names,
        batch_size=batch_size,
        limit=limit or None,
        device=str(device),
        task_manager=manager,
        log_samples=True,
    )


def evaluate(
    path: str | Path, tasks: list[str], *, batch_size: int = 4, limit: int = 0, device="cpu"
) -> tuple[dict, Path]:
    """(results, where they were written) for an export or a checkpoint (exported first)."""
    from sessa_train.checkpoint import find_checkpoint, read_config, read_meta

    path = Path(path)
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        results = evaluate_export(path, tasks, batch_size=batch_size, limit=limit, device=device)
        out = path / "lm_eval.json"
    else:
        from sessa_train.export import export_checkpoint

        checkpoint = find_checkpoint(path)
        with tempfile.TemporaryDirectory(prefix="sessa-eval-") as tmp:
            export = export_checkpoint(checkpoint, Path(tmp) / "export")
            results = evaluate_export(export, tasks, batch_size=batch_size, limit=limit, device=device)
        step = read_meta(checkpoint).step
        out = Path(read_config(checkpoint)["logging"]["dir"]) / "lm_eval" / f"step_{step:08d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    kept = ("results", "configs", "versions", "samples")
    out.write_text(json.dumps({k: results[k] for k in kept if k in results}, indent=1, default=str))
    return results, out


def log_to_run(results: dict, checkpoint: Path) -> None:
    """Append the scalars to the checkpoint's run: a metrics.jsonl row and tensorboard events."""
    from torch.utils.tensorboard import SummaryWriter

    from sessa_train.checkpoint import find_checkpoint, read_config, read_meta

    checkpoint = find_checkpoint(checkpoint)
    step, log_dir = read_meta(checkpoint).step, Path(read_config(checkpoint)["logging"]["dir"])
    scalars = scalars_of(results)
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"step": step, "event": "lm_eval", **scalars}) + "\n")
    writer = SummaryWriter(str(log_dir))
    for key, value in scalars.items():
        writer.add_scalar(key, value, step)
    writer.close()


def main(argv: list[str] | None = None) -> int:
    import sys

    from sessa_train.errors import argument_parser

    p = argument_parser(prog="sessa-eval", description="lm-evaluation-harness on an export or a checkpoint.")
    p.add_argument("model", help="an export folder, or a checkpoint (a step_N folder or a checkpoint.dir)")
    p.add_argument("--tasks", nargs="+", required=True, help="lm-eval task names or local task YAML files")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--limit", type=int, default=0, help="documents per task (0: all)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.limit < 0:
        p.error(f"need --batch-size >= 1 and --limit >= 0, got {args.batch_size}, {args.limit}")
    try:
        results, out = evaluate(args.model, args.tasks, batch_size=args.batch_size, limit=args.limit,
                                device=args.device)  # fmt: skip
        if out.name.startswith("step_"):
            log_to_run(results, Path(args.model))
    except SessaError as e:
        print(f"sessa-eval: error: {e}", file=sys.stderr)
        return 2
    for key, value in scalars_of(results).items():
        print(f"{key}: {value:.4f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
