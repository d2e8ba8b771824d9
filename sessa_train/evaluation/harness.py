"""lm-evaluation-harness on an export or a checkpoint: ``sessa-eval``, and during training
(``logging.lm_eval``).

lm-eval's own Python API (``lm_eval.simple_evaluate``) with its ``hf`` model runs the export
through transformers, built from this package's own classes (``export.load_for_transformers``:
no code shipped in the folder is imported), so its numbers are the ones ``lm_eval --model hf
--model_args pretrained=EXPORT,trust_remote_code=True`` gives with the same code. Tasks are
lm-eval task names or local task YAML files (their folders are added to lm-eval's task search
path). A checkpoint is exported to a temporary folder first. The results JSON goes beside what was
evaluated (``<export>/lm_eval.json``; ``<checkpoint root>/lm_eval/step_N.json``) and, for a
checkpoint still where its run saved it, the scalars (``lm_eval/<task>/<metric>``) into the run's
metrics.jsonl and tensorboard.
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
    """lm-eval's results dict of ``tasks`` on an export folder, through lm-eval's ``hf`` model
    given the export as this package's own transformers classes (``export.load_for_transformers``:
    no code shipped in the folder is run)."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise SessaError(f"lm-evaluation-harness is not installed ({e.name}): pip install 'lm-eval[hf]'") from None
    from sessa_train.export import load_for_transformers

    names, folders = task_names(tasks)
    manager = TaskManager(include_path=folders or None)
    if unknown := [n for n in names if n not in manager.all_tasks]:
        raise SessaError(f"lm-eval knows no task {', '.join(unknown)} (local ones: pass their YAML files)")
    if hub := [n for n, t in zip(names, tasks, strict=True) if not t.endswith((".yaml", ".yml"))]:
        _check_hub(hub)
    model, tokenizer = load_for_transformers(export, device=device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    import lm_eval.evaluator

    if hasattr(lm_eval.evaluator, "get_git_commit_hash"):  # lm-eval asks git, whose "fatal: not a git
        lm_eval.evaluator.get_git_commit_hash = _quiet_git_hash  # repository" would reach the user's terminal
    return lm_eval.simple_evaluate(model=lm, tasks=names, limit=limit or None, task_manager=manager, log_samples=True)


def _quiet_git_hash() -> str | None:
    import subprocess

    out = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True)
    return out.stdout.strip() or None


HUB_CHECK_S = 5.0


def _check_hub(names: list[str]) -> None:
    """SessaError in one line, within seconds, when tasks whose data comes from the Hugging Face Hub
    are asked for and the hub cannot be reached (and its data is not marked cached: HF_DATASETS_OFFLINE)."""
    import os
    import socket
    from urllib.parse import urlsplit

    if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        return
    url = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection(
            (url.hostname, url.port or (443 if url.scheme == "https" else 80)), HUB_CHECK_S
        ).close()
    except OSError as e:
        raise SessaError(
            f"task {', '.join(names)} needs its dataset from the Hugging Face Hub and {url.hostname} cannot be reached "
            f"({e.strerror or type(e).__name__}): evaluate offline with a local task YAML (sessa-prepare-default-data "
            "writes data/default/eval/default_cloze.yaml), or with the dataset cached and HF_DATASETS_OFFLINE=1"
        ) from None


def results_path(path: Path) -> tuple[Path, Path | None]:
    """Where the results of ``path`` go, and the run folder whose metrics take the scalars (None:
    not its own). An export: ``<export>/lm_eval.json``. A checkpoint still where its run saved it:
    ``<its logging.dir>/lm_eval/step_N.json``, and the run's metrics take the scalars. A checkpoint
    elsewhere (copied or moved): ``<its checkpoint root>/lm_eval/step_N.json`` only, never into the
    folders of the run it came from."""
    from sessa_train.checkpoint import find_checkpoint, read_config, read_meta

    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return path / "lm_eval.json", None
    checkpoint = find_checkpoint(path)
    step, config = read_meta(checkpoint).step, read_config(checkpoint)
    root = checkpoint.parent
    recorded = config.get("checkpoint", {}).get("dir") if isinstance(config.get("checkpoint"), dict) else None
    log_dir = config.get("logging", {}).get("dir") if isinstance(config.get("logging"), dict) else None
    name = f"step_{step:08d}.json"
    if recorded is not None and log_dir is not None and Path(recorded).resolve() == root.resolve():
        return Path(log_dir) / "lm_eval" / name, Path(log_dir)
    return root / "lm_eval" / name, None


def _writable(out: Path) -> None:
    """SessaError, before anything is evaluated, if the results file ``out`` cannot be written."""
    import os

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = out.parent / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise SessaError(f"cannot write the results into {out.parent} ({e.strerror})") from None
    if out.is_dir():
        raise SessaError(f"cannot write the results to {out}: a folder is in the way")


def evaluate(
    path: str | Path, tasks: list[str], *, batch_size: int = 4, limit: int = 0, device="cpu"
) -> tuple[dict, Path, Path | None]:
    """(results, where they were written, the run folder whose metrics take them or None) for an
    export or a checkpoint (exported first)."""
    from sessa_train.checkpoint import find_checkpoint

    path = Path(path)
    out, run = results_path(path)
    _writable(out)
    if out.name == "lm_eval.json":
        results = evaluate_export(path, tasks, batch_size=batch_size, limit=limit, device=device)
    else:
        from sessa_train.export import export_checkpoint

        with tempfile.TemporaryDirectory(prefix="sessa-eval-") as tmp:
            export = export_checkpoint(find_checkpoint(path), Path(tmp) / "export")
            results = evaluate_export(export, tasks, batch_size=batch_size, limit=limit, device=device)
    out.parent.mkdir(parents=True, exist_ok=True)
    kept = ("results", "configs", "versions", "samples")
    out.write_text(json.dumps({k: results[k] for k in kept if k in results}, indent=1, default=str))
    return results, out, run


def log_to_run(results: dict, checkpoint: Path, log_dir: Path) -> None:
    """Append the scalars to the checkpoint's run: a metrics.jsonl row and tensorboard events."""
    from torch.utils.tensorboard import SummaryWriter

    from sessa_train.checkpoint import find_checkpoint, read_meta

    step = read_meta(find_checkpoint(checkpoint)).step
    scalars = scalars_of(results)
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"step": step, "event": "lm_eval", **scalars}) + "\n")
    writer = SummaryWriter(str(log_dir))
    for key, value in scalars.items():
        writer.add_scalar(key, value, step)
    writer.close()


def main(argv: list[str] | None = None) -> int:

    from sessa_train.errors import argument_parser, user_error

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
        from sessa_train.generate import device_named

        device = device_named(args.device)
        results, out, run = evaluate(args.model, args.tasks, batch_size=args.batch_size, limit=args.limit,
                                     device=device)  # fmt: skip
        if run is not None:
            log_to_run(results, Path(args.model), run)
    except SessaError as e:
        return user_error(p.prog, e)
    for key, value in scalars_of(results).items():
        print(f"{key}: {value:.4f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
