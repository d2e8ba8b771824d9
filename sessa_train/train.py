"""The pretraining entry point: config -> data loader -> Sessa LM -> DeepSpeed engine -> loop.

    python -m sessa_train.train --config configs/tiny.yaml [key=value ...] [--resume auto]
    torchrun --nproc-per-node 2 -m sessa_train.train --config configs/tiny.yaml parallel.zero_stage=2

Bad configuration, data, checkpoints or launch settings end with one line on stderr and exit
status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sessa_train.config import TrainConfig, load_config
from sessa_train.errors import SessaError, argument_parser, user_error
from sessa_train.process_env import apply_runtime_defaults


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argument_parser(prog="sessa-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--config",
        action="append",
        required=True,
        type=Path,
        help="a YAML file; repeat to merge several, later ones win",
    )
    p.add_argument("--resume", help="none | auto | a checkpoint folder (sets checkpoint.resume)")
    # DeepSpeed's launcher passes it; the rank's device comes from LOCAL_RANK, which it sets too
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="key=value, e.g. schedule.train_steps=500")
    return p.parse_intermixed_args(argv)  # overrides may follow --resume


def config_of(args: argparse.Namespace) -> TrainConfig:
    """The run's config from the command line (also checked by ``sessa-launch`` before it starts)."""
    overrides = list(args.overrides) + ([f"checkpoint.resume={args.resume}"] if args.resume else [])
    return load_config(args.config, overrides)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)  # before torch is imported: --help and argument errors answer at once
    apply_runtime_defaults()  # OpenMP and DeepSpeed read them when torch loads (process_env.py)
    try:
        cfg = config_of(args)  # and config errors
    except SessaError as e:
        return user_error("sessa-train", e)
    from sessa_train import distributed

    try:
        from sessa_train.trainer import Trainer

        Trainer(cfg, distributed.init_distributed()).fit()
    except SessaError as e:
        distributed.shutdown()  # every process leaves cleanly after its one line
        return user_error("sessa-train", e)
    except Exception as e:
        if (lost := peer_lost(e)) is None:
            raise  # a bug of ours: its traceback
        import os

        print(f"sessa-train: rank {os.environ.get('RANK', '0')}: {lost}", file=sys.stderr)
        return 1  # the launcher (torchrun --max-restarts, Slurm requeue) starts the group again
    distributed.shutdown()
    return 0


PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "NCCL communicator was aborted",
             "Broken pipe", "connectFullMesh")  # fmt: skip


def peer_lost(error: BaseException) -> str | None:
    """One line when ``error`` is a collective that failed because another rank went away (the
    communication library's own error; the rank that died says why), else None."""
    text = str(error)
    if type(error).__name__ in ("DistBackendError", "DistNetworkError") or any(m in text for m in PEER_LOST):
        first = " ".join(text.split())[:160]
        return f"another rank stopped during a collective ({type(error).__name__}: {first})"
    return None


def cli() -> None:
    """The ``sessa-train`` command (and ``python -m sessa_train.train``): ``main``, then the
    process ends at once with its status, once its output is flushed and its exit handlers (the
    run lock) have run. Skipped: the interpreter's teardown, where the communication libraries'
    C++ threads could abort a finished rank ("terminate called without an active exception",
    exit -6, seen about once in ten 2- and 4-rank gloo runs after the last checkpoint was saved)."""
    import atexit
    import logging
    import os

    code = main()
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    cli()
