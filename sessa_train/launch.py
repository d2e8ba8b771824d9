"""Multi-node launch of ``sessa_train.train`` through the DeepSpeed launcher or torchrun.

    sessa-launch deepspeed --hostfile hosts --dry-run -- --config configs/350m.yaml --resume auto
    sessa-launch deepspeed --hostfile hosts --no-ssh --node-rank $NODE_RANK -- --config ...
    sessa-launch torchrun --hostfile hosts --node-rank $NODE_RANK -- --config ...

The hostfile is DeepSpeed's (``host slots=N`` per line, the syntax DeepSpeed's runner reads); its first
host is the master unless ``--master-addr`` says otherwise. ``deepspeed`` without ``--no-ssh``
is started once, on the first host, and DeepSpeed's runner reaches the others over pdsh;
``--no-ssh`` and ``torchrun`` start one launcher per node (Slurm: launch/slurm.sbatch does so
with srun). Every node gets the same environment (NCCL error handling, OMP threads) and appends
its output to ``<log-dir>/node<rank>.log``; OpenMP waits passively and DeepSpeed's extension
builds stay in the environment's own folder unless set otherwise (``process_env.py``).
``--dry-run`` prints each node's exact command.
Arguments after ``--`` go to the trainer unchanged (``--config``, ``--resume auto``, overrides).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from sessa_train.errors import LaunchError, SessaError, argument_parser, user_error
from sessa_train.process_env import runtime_defaults

# DeepSpeed's launcher (its ``deepspeed`` script) run by this very interpreter: no PATH or
# activated environment needed, and its ranks run that interpreter too
DEEPSPEED = [sys.executable, "-m", "deepspeed.launcher.runner"]
ENVIRONMENT = {
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",  # a failed collective ends the job instead of hanging it
    "NCCL_DEBUG": "WARN",
    "PYTHONUNBUFFERED": "1",
}


@dataclass(frozen=True)
class NodeCommand:
    node_rank: int
    host: str
    ranks: range
    argv: list[str] | None  # None: started by DeepSpeed's runner from node 0 (pdsh)

    def shell(self, env: dict[str, str], log_dir: str) -> str:
        if self.argv is None:
            return "(started over pdsh by the DeepSpeed runner on node 0)"
        exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        log = shlex.quote(f"{log_dir}/node{self.node_rank}.log")
        return f"env {exports} {shlex.join(self.argv)} 2>&1 | tee -a {log}"


def read_hostfile(path: str) -> dict[str, int]:
    """host -> slots, in file order. DeepSpeed's hostfile syntax: ``host slots=N`` per line,
    ``#`` comments and blank lines ignored."""
    if not Path(path).is_file():
        raise LaunchError(f"--hostfile {path}: no such file")
    hosts: dict[str, int] = {}
    for number, raw in enumerate(Path(path).read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"(\S+)\s+slots=(\d+)", line)
        if not match or int(match[2]) < 1 or match[1] in hosts:
            raise LaunchError(
                f"--hostfile {path} line {number}: {raw!r} (expected lines like 'node-a slots=8', each host once)"
            )
        hosts[match[1]] = int(match[2])
    if not hosts:
        raise LaunchError(f"--hostfile {path}: no hosts (expected lines like 'node-a slots=8')")
    return hosts


SLURM_SIGNAL_LEAD_S = 120  # launch/slurm.sbatch: --signal=B:USR1@120
CHECKPOINT_BYTES_PER_PARAMETER = 12  # fp32 weight and AdamW's two moments (checkpoint/model.py)


def save_grace_s(parameters: int, nodes: int, gbps_per_node: float) -> int:
    """Seconds a stopping job needs for its last save: the checkpoint's bytes written by every node
    at once at ``gbps_per_node`` GB/s, twice over for safety, plus a minute to stop the step."""
    seconds = parameters * CHECKPOINT_BYTES_PER_PARAMETER / nodes / (gbps_per_node * 1e9)
    return int(2 * seconds + 60 + 0.999)


def _torchrun_takes_a_grace() -> bool:
    """Whether this torch's torchrun reads TORCH_ELASTIC_SHUTDOWN_TIMEOUT (its LaunchConfig has one)."""
    import dataclasses

    from torch.distributed.launcher.api import LaunchConfig

    return "shutdown_timeout" in {f.name for f in dataclasses.fields(LaunchConfig)}


def node_commands(args: argparse.Namespace, hosts: dict[str, int]) -> list[NodeCommand]:
    names, slots = list(hosts), list(hosts.values())
    if len(set(slots)) != 1:
        raise LaunchError(f"--hostfile {args.hostfile}: every host needs the same slots, got {hosts}")
    master = args.master_addr or names[0]
    per_node, trainer = slots[0], ["-m", "sessa_train.train", *args.trainer_args]
    first = [sum(slots[:i]) for i in range(len(names))]
    commands = []
    for i, host in enumerate(names):
        ranks = range(first[i], first[i] + per_node)
        if args.launcher == "torchrun":
            argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(len(names))]
            argv += ["--nproc-per-node", str(per_node), "--node-rank", str(i), "--max-restarts", str(args.max_restarts)]
            argv += ["--master-addr", master, "--master-port", str(args.master_port), *trainer]
        elif args.no_ssh:
            argv = [*DEEPSPEED, "--hostfile", args.hostfile, "--no_ssh", f"--node_rank={i}"]
            argv += [f"--master_addr={master}", f"--master_port={args.master_port}", "--module", "sessa_train.train"]
            argv += args.trainer_args
        elif i == 0:
            argv = [*DEEPSPEED, "--hostfile", args.hostfile, f"--master_addr={master}"]
            argv += [f"--master_port={args.master_port}", "--module", "sessa_train.train", *args.trainer_args]
        else:
            argv = None
        commands.append(NodeCommand(i, host, ranks, argv))
    return commands


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    trainer_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    ours = argv[: argv.index("--")] if "--" in argv else argv
    p = argument_parser(prog="sessa-launch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("launcher", choices=["deepspeed", "torchrun"])
    p.add_argument("--hostfile", required=True, help="DeepSpeed hostfile: 'host slots=N' per line")
    p.add_argument("--node-rank", type=int, help="this node's index in the hostfile (no-ssh / torchrun)")
    p.add_argument("--no-ssh", action="store_true", help="deepspeed: one launcher per node, no pdsh")
    p.add_argument("--master-addr", help="default: the hostfile's first host")
    p.add_argument("--master-port", type=int, default=29500)
    cores = os.cpu_count()
    p.add_argument("--omp-threads", type=int, default=None,
                   help=f"OMP_NUM_THREADS of every rank (default: this node's {cores} cores / its ranks)")  # fmt: skip
    p.add_argument("--log-dir", default="logs")
    p.add_argument("--max-restarts", type=int, default=0,
                   help="torchrun: restart the worker group this often after a failure; the restarted ranks "
                   "resume from the newest complete checkpoint on their own")  # fmt: skip
    p.add_argument("--save-gbps", type=float, default=1.0,
                   help="checkpoint write speed per node in GB/s (sizes torchrun's grace between SIGTERM and "
                   "SIGKILL to the last save; default 1.0)")  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="print every node's command and exit")
    args = p.parse_args(ours)
    args.trainer_args = trainer_args
    if not trainer_args or "--config" not in trainer_args:
        p.error("pass the trainer's arguments after '--', at least --config FILE")
    if not 0 < args.master_port < 65536:
        p.error(f"--master-port must be in 1..65535, got {args.master_port}")
    if args.omp_threads is not None and args.omp_threads < 1:
        p.error(f"--omp-threads must be >= 1, got {args.omp_threads}")
    if args.max_restarts < 0:
        p.error(f"--max-restarts must be >= 0, got {args.max_restarts}")
    if not args.save_gbps > 0:
        p.error(f"--save-gbps must be > 0, got {args.save_gbps}")
    if args.max_restarts and args.launcher != "torchrun":
        p.error("--max-restarts needs the torchrun launcher (DeepSpeed's launcher does not restart workers)")
    configs = [trainer_args[i + 1] for i, a in enumerate(trainer_args[:-1]) if a == "--config"]
    if missing := [c for c in configs if not Path(c).is_file()]:
        p.error(f"--config {missing[0]}: no such file (paths are relative to {Path.cwd()})")
    return args


def main(argv: list[str] | None = None) -> int:
    from sessa_train import train

    args = parse_args(argv)
    try:
        cfg = train.config_of(train.parse_args(args.trainer_args))  # a bad config fails here, not on every node
        hosts = read_hostfile(args.hostfile)
        from sessa_train.sizing import stage_parameters

        args.grace_s = save_grace_s(stage_parameters(cfg.model, 1, 1), len(hosts), args.save_gbps)
        commands = node_commands(args, hosts)
    except SessaError as e:
        return user_error("sessa-launch", e)
    threads = args.omp_threads or max(1, (os.cpu_count() or 1) // len(commands[0].ranks))
    env = {**ENVIRONMENT, "OMP_NUM_THREADS": str(threads)}
    if args.launcher == "torchrun":  # torchrun's wait between SIGTERM and SIGKILL: the last save's time
        env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = str(args.grace_s)
        if not _torchrun_takes_a_grace():
            print(f"sessa-launch: warning: this torch's torchrun waits 30 s between SIGTERM and SIGKILL, not the "
                  f"{args.grace_s} s the last save needs (a newer torch reads TORCH_ELASTIC_SHUTDOWN_TIMEOUT)",
                  file=sys.stderr)  # fmt: skip
    env |= {k: os.environ.get(k, v) for k, v in runtime_defaults().items()}  # the user's values win
    world = sum(len(c.ranks) for c in commands)
    if args.node_rank is not None and not 0 <= args.node_rank < len(commands):
        print(f"sessa-launch: error: --node-rank {args.node_rank} is not in 0..{len(commands) - 1}", file=sys.stderr)
        return 2
    if args.dry_run:
        master = args.master_addr or commands[0].host
        head = f"# {args.launcher}: {len(commands)} nodes, {world} ranks, master {master}:{args.master_port}"
        if args.launcher == "torchrun":
            head += f"; a stop gives the ranks {args.grace_s} s to save before SIGKILL (--save-gbps {args.save_gbps})"
            if args.grace_s > SLURM_SIGNAL_LEAD_S:
                head += f"; under Slurm warn that early: #SBATCH --signal=B:USR1@{args.grace_s}"
        print(head)
        for c in commands:
            print(f"# node {c.node_rank} ({c.host}): ranks {c.ranks.start}-{c.ranks.stop - 1}")
            print(c.shell(env, args.log_dir))
        return 0
    rank = args.node_rank if args.node_rank is not None else 0
    if commands[rank].argv is None:
        print(
            f"sessa-launch: error: node {rank} is started by DeepSpeed's runner from node 0 over pdsh; "
            "run this on node 0, or use --no-ssh",
            file=sys.stderr,
        )
        return 2
    Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(args.log_dir) / f"node{rank}.log", "ab") as log:
        proc = subprocess.Popen(
            commands[rank].argv, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        # a stop asked of the launcher (Slurm's signal before preemption: USR1; TERM; INT) reaches the
        # ranks as SIGTERM, on which every rank saves the same step and ends
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(sig, lambda signum, frame: proc.send_signal(signal.SIGTERM))
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.buffer.write(line)
            sys.stdout.flush()
            log.write(line)
        return proc.wait()


if __name__ == "__main__":
    sys.exit(main())
