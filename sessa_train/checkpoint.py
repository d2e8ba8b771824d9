"""The on-disk checkpoint format: writing, finding, verifying and reading checkpoints.

A checkpoint is a folder ``step_NNNNNNNN/`` under ``checkpoint.dir``:

    meta.json        format, step, tokens, optimizer steps, learning-rate schedule, engine counters,
                     the layout it was saved with, the identity of its data, the loader state
    config.json      the resolved config (read before anything else is loaded)
    tokenizer.model  the run's sentencepiece model, when it has one
    model/tp{t}-pp{p}-{k}.safetensors
                     fp32 weight, exp_avg and exp_avg_sq of parameters held by tensor-parallel rank t
                     of pipeline stage p, under the plain model's names (part k: the parameters that
                     data-parallel rank k wrote); whole over ZeRO partitions, so any layout can read them
    rng/rank{r:05d}.safetensors
                     rank r's torch (and CUDA) random state
    manifest.json    every other file with its size and sha256, written last
    latest           (beside the folders) the name of the newest complete checkpoint

Nothing is a pickle: safetensors and JSON only, so loading a checkpoint runs no code.

Saving (collective): every rank writes its files into ``step_N.partial/`` and fsyncs them; rank 0
writes meta, config, tokenizer and manifest, fsyncs the folder, renames it to ``step_N``, fsyncs
the parent, and replaces ``latest`` the same way. A crash of a process or a node at any point
leaves ``latest`` naming a complete checkpoint that is on disk; ``*.partial`` folders are cleared
at the next start.

Loading: a checkpoint is verified against its manifest first (the files split over the ranks);
``--resume auto`` takes the newest one that verifies and says which it skipped and why; an
explicit path that does not verify is a one-line error naming the file. ``ParamReader`` gives a
parameter's whole (plain-layout) weight and moments, joined from the tensor-parallel shards it
was saved in; ``parallel/layout.py`` cuts them for the loading rank. ``read_weights`` gives the
plain fp32 weights of any checkpoint, also of the earlier DeepSpeed-format ones (``legacy``:
pickles, to be read from trusted storage only).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from sessa_train import distributed as comm
from sessa_train.config import ModelConfig
from sessa_train.errors import CheckpointError
from sessa_train.files import file_sha256, fsync, replace_durably

FORMAT = "sessa-checkpoint-v2"
STEP_DIR = re.compile(r"^step_(\d{8})$")
MOMENTS = ("exp_avg", "exp_avg_sq")
# the earlier format: DeepSpeed's module file of model-parallel rank m
LEGACY_MODULE_FILE = "mp_rank_{:02d}_model_states.pt"
LEGACY_ZERO3_FILE = "zero_pp_rank_0_mp_rank_00_model_states.pt"
LEGACY_HINT = "export it (sessa-export) and start a run from the export with checkpoint.init_from"


def write_json(path: Path, value) -> Path:
    path.write_text(json.dumps(value, indent=1))
    fsync(path)
    return path


def model_file(folder: Path, tensor_rank: int, stage: int, part: int) -> Path:
    return folder / "model" / f"tp{tensor_rank}-pp{stage}-{part}.safetensors"


def rng_file(folder: Path, rank: int) -> Path:
    return folder / "rng" / f"rank{rank:05d}.safetensors"


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": FORMAT})
    return path


def step_of(path: Path) -> int:
    return int(STEP_DIR.match(path.name)[1])


class CheckpointManager:
    """Checkpoints under ``root`` for a job of ``world`` ranks, this process being ``rank``."""

    def __init__(self, root: str | Path, keep_last: int, rank: int, world: int, log: Callable[[str], None]) -> None:
        self.root, self.keep_last, self.rank, self.world, self.log = Path(root), keep_last, rank, world, log

    # -- finding -----------------------------------------------------------------------------
    def check_writable(self) -> None:
        """Collective: the folder can be created and written, now rather than at the first save."""
        problem = None
        if self.rank == 0:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                probe = self.root / f".writable-{os.getpid()}"
                probe.write_text("")
                probe.unlink()
            except OSError as e:
                problem = f"checkpoint.dir={self.root} is not writable ({e.strerror})"
        if problem := comm.all_gather_objects(problem)[0]:
            raise CheckpointError(problem)

    def clear_partial(self) -> None:
        """Rank 0 removes leftovers of an interrupted save (call before the first barrier)."""
        if self.rank == 0 and self.root.is_dir():
            for p in self.root.glob("*.partial"):
                shutil.rmtree(p, ignore_errors=True)

    def verify(self, path: Path) -> str | None:
        """Collective ``check_files``, the files split over the ranks."""
        problem = check_files(path, self.rank, self.world)
        return next((p for p in comm.all_gather_objects(problem) if p), None)

    def resolve(self, resume: str, allow_older: bool) -> Path | None:
        """Collective. The checkpoint to resume from: ``none``, ``auto`` (the newest that verifies)
        or a checkpoint folder (which must verify, and be the newest unless ``allow_older``)."""
        if resume == "none":
            if found := checkpoint_folders(self.root):
                raise CheckpointError(
                    f"checkpoint.dir={self.root} already holds checkpoints (newest {found[-1].name}); pass --resume "
                    "auto to go on from them, or choose another checkpoint.dir"
                )
            return None
        if resume == "auto":
            found, damaged = checkpoint_folders(self.root), []
            for path in reversed(found):
                if legacy(path):
                    raise CheckpointError(check_files(path))
                if (problem := self.verify(path)) is None:
                    self._set_aside(damaged, "damaged", path)
                    return path
                self.log(f"skipping checkpoint {path.name}: {problem}")
                damaged.append(path)
            if found:
                raise CheckpointError(
                    f"no checkpoint in {self.root} verifies (see above); move them aside to start from scratch "
                    "or repair the newest"
                )
            return None
        path = Path(resume)
        if not (path.is_dir() and STEP_DIR.match(path.name)):
            raise CheckpointError(f"checkpoint.resume={resume!r} is not a checkpoint folder (step_NNNNNNNN)")
        if problem := self.verify(path):
            raise CheckpointError(f"checkpoint.resume={resume}: {problem}")
        newer = [p for p in checkpoint_folders(path.parent) if step_of(p) > step_of(path)]
        if newer and not allow_older:
            raise CheckpointError(
                f"checkpoint.resume={resume} is older than {newer[-1].name} in the same folder: resuming would write "
                "over the newer ones; set checkpoint.resume_older=true to go on from it (they are kept aside)"
            )
        self._set_aside(newer, "superseded", path)
        return path

    def _set_aside(self, paths: list[Path], why: str, resumed: Path) -> None:
        """Collective: rank 0 moves checkpoints newer than the one resumed to ``<why>/<time>/``
        beside them, so that later saves neither write over nor prune the resumed one for them."""
        if paths and self.rank == 0:
            aside = resumed.parent / why / time.strftime("%Y%m%d-%H%M%S")
            aside.mkdir(parents=True, exist_ok=True)
            for p in paths:
                os.replace(p, aside / p.name)
            (resumed.parent / "latest.tmp").write_text(resumed.name)
            replace_durably(resumed.parent / "latest.tmp", resumed.parent / "latest")
            self.log(f"resuming from {resumed.name}: moved {', '.join(p.name for p in paths)} to {aside}")
        comm.barrier()

    # -- saving ------------------------------------------------------------------------------
    def save(self, step: int, write: Callable[[Path], list[Path]], meta: dict, config: dict, tokenizer) -> Path:
        """Collective: every rank calls it with the same ``step``; ``write(folder)`` writes this
        rank's files there and returns them; rank 0 adds meta, config and the tokenizer."""
        name = f"step_{step:08d}"
        partial = self.root / f"{name}.partial"
        if self.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
            for sub in ("model", "rng"):
                (partial / sub).mkdir(parents=True)
        comm.barrier()
        records = {}
        for file in write(partial):
            fsync(file)
            records[str(file.relative_to(partial))] = {"bytes": file.stat().st_size, "sha256": file_sha256(file)}
        every = comm.all_gather_objects(records)
        final = self.root / name
        if self.rank == 0:
            write_json(partial / "meta.json", {"format": FORMAT, **meta})
            write_json(partial / "config.json", config)
            own = [partial / "meta.json", partial / "config.json"]
            if tokenizer is not None:
                shutil.copyfile(tokenizer, partial / "tokenizer.model")
                fsync(partial / "tokenizer.model")
                own.append(partial / "tokenizer.model")
            files = {k: v for rank_records in every for k, v in rank_records.items()}
            files |= {f.name: {"bytes": f.stat().st_size, "sha256": file_sha256(f)} for f in own}
            write_json(partial / "manifest.json", {"files": dict(sorted(files.items()))})
            for sub in ("model", "rng", "."):
                fsync(partial / sub)
            if final.exists():  # saved again at the same step (e.g. at exit right after a periodic save)
                shutil.rmtree(final)
            os.replace(partial, final)
            fsync(self.root)
            (self.root / "latest.tmp").write_text(name)
            replace_durably(self.root / "latest.tmp", self.root / "latest")
            for old in checkpoint_folders(self.root)[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        comm.barrier()
        return final


def check_files(path: Path, part: int = 0, parts: int = 1) -> str | None:
    """None if every file of the manifest (every ``parts``-th from ``part``) is there with its size
    and checksum, else why not."""
    manifest = path / "manifest.json"
    if not manifest.is_file():
        if legacy(path):
            return f"{path} is in the earlier DeepSpeed format, which does not resume: {LEGACY_HINT}"
        return f"{manifest} is missing"
    try:
        files = sorted(json.loads(manifest.read_text())["files"].items())
    except (ValueError, KeyError, AttributeError):
        return f"{manifest} is not a manifest (damaged)"
    for name, record in files[part::parts]:
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        if file.stat().st_size != record["bytes"]:
            return f"{file} has {file.stat().st_size} bytes, the manifest says {record['bytes']}"
        if file_sha256(file) != record["sha256"]:
            return f"{file} does not match its checksum in the manifest"
    return None


def checkpoint_folders(root: str | Path) -> list[Path]:
    """The ``step_N`` folders under ``root``, oldest first (unverified)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name))


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a checkpoint root whose ``latest`` names one."""
    path = Path(path)
    if (path / "latest").is_file():
        path = path / (path / "latest").read_text().strip()
    if (path / "meta.json").is_file() or legacy(path):
        return path
    raise CheckpointError(f"{path} is not a complete checkpoint (no meta.json); pass a step_N folder or its parent")


def legacy(path: Path) -> bool:
    """A checkpoint of the earlier DeepSpeed format (module and optimizer pickles)."""
    return not (path / "meta.json").is_file() and any(
        (path / n).is_file() for n in (LEGACY_MODULE_FILE.format(0), LEGACY_ZERO3_FILE)
    )


def read_meta(path: Path) -> dict:
    meta = json.loads((path / "meta.json").read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}/meta.json has format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def read_config(path: Path) -> dict:
    """The resolved config a checkpoint was saved with."""
    if (path / "config.json").is_file():
        return json.loads((path / "config.json").read_text())
    return _legacy_load(path / LEGACY_MODULE_FILE.format(0))["config"]


class ParamReader:
    """Whole (plain-layout) fp32 weights and AdamW moments of a checkpoint, one parameter at a
    time, joined from the tensor-parallel shards they were saved in."""

    def __init__(self, path: Path, cfg: ModelConfig, tensor: int, pipeline: int) -> None:
        from safetensors import safe_open

        from sessa_train.parallel.layout import stage_splits

        self.tensor = tensor
        self.splits = {n: split for stage in range(pipeline) for n, split in stage_splits(cfg, pipeline, stage).items()}
        self.where: dict[str, dict[int, object]] = {}  # key -> tensor rank -> open file
        for file in sorted((path / "model").glob("*.safetensors")):
            fh = safe_open(str(file), "pt")
            for key in fh.keys():  # noqa: SIM118 (safe_open has no __iter__)
                self.where.setdefault(key, {})[int(file.name[2 : file.name.index("-")])] = fh
        # a tied LM head is the embedding: only the embedding is a parameter
        self.names = [n for n in self.splits if n in self.where]

    def full(self, name: str, what: str = "") -> torch.Tensor:
        """The whole tensor of parameter ``name`` (``what``: "" for the weight, or a moment)."""
        from sessa_train.parallel.layout import join

        key = f"{name}.{what}" if what else name
        held = self.where.get(key, {})
        split = self.splits.get(name)
        ranks = [min(held, default=0)] if split is None else range(self.tensor)
        if any(r not in held for r in ranks):
            lacking = [r for r in ranks if r not in held]
            raise CheckpointError(f"the checkpoint holds no {key!r} of tensor rank(s) {lacking}")
        pieces = [held[r].get_tensor(key) for r in ranks]
        return pieces[0] if split is None else join(pieces, split)


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(plain fp32 model state dict, about) of a checkpoint, whatever its layout; ``about`` has
    the resolved ``config``, ``step``, ``tokens`` and the ``tokenizer`` file it carries (None
    when it carries none) with its ``tokenizer_sha256``."""
    path = find_checkpoint(path)
    if legacy(path):
        weights, client = _legacy_weights(path)
        about = {k: client[k] for k in ("config", "step", "tokens")}
        return weights, about | {"tokenizer": None, "tokenizer_sha256": None}
    if problem := check_files(path):
        raise CheckpointError(problem)
    config, meta = read_config(path), read_meta(path)
    cfg = ModelConfig.from_dict(config["model"])
    layout = meta["layout"]
    reader = ParamReader(path, cfg, layout["tensor"], layout["pipeline"])
    weights = {name: reader.full(name).float() for name in reader.names}
    if cfg.tie_embeddings:
        weights["lm_head.weight"] = weights["embed.weight"]
    tokenizer = path / "tokenizer.model"
    about = {"config": config, "step": meta["step"], "tokens": meta["tokens"]}
    about["tokenizer"] = tokenizer if tokenizer.is_file() else None
    about["tokenizer_sha256"] = meta["data"]["tokenizer_sha256"]
    return weights, about


def _legacy_load(file: Path) -> dict:
    return torch.load(file, map_location="cpu", weights_only=False)  # a pickle: trusted storage only


def _legacy_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The earlier format: DeepSpeed's module files (per model-parallel rank, joined by
    ``layout.merge_states``), or its ZeRO shards consolidated by ``zero_to_fp32``."""
    names = (LEGACY_MODULE_FILE.format(0), LEGACY_ZERO3_FILE)
    first = _legacy_load(next(path / n for n in names if (path / n).is_file()))
    if "config" not in first:
        raise CheckpointError(f"{path} was not written by sessa-train (no resolved config in its client state)")
    parallel = first["config"].get("parallel", {})
    tensor, pipeline = parallel.get("tensor", 1), parallel.get("pipeline", 1)
    if tensor * pipeline * parallel.get("context", 1) > 1:
        from sessa_train.parallel.layout import merge_states

        stages = {}
        for m in range(tensor * pipeline):
            file = path / LEGACY_MODULE_FILE.format(m)
            if not file.is_file():
                raise CheckpointError(f"{path} lacks {file.name}: a tensor={tensor} x pipeline={pipeline} checkpoint")
            stages[divmod(m, tensor)] = (first if m == 0 else _legacy_load(file))["module"]
        weights = merge_states(stages, ModelConfig.from_dict(first["config"]["model"]))
    elif any(path.glob("*zero_pp_rank_*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        weights = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    else:
        weights = first["module"]
    return {k: v.float() for k, v in weights.items()}, first


def rng_tensors() -> dict[str, torch.Tensor]:
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out |= {f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    return out


def set_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
