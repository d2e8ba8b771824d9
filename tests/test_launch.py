"""sessa-launch: per-node commands for a 2-node x 8-GPU hostfile, and real runs of two "nodes" on
this machine (node ranks 0 and 1 over loopback, one rank each) through each launcher path:
DeepSpeed's launcher without ssh, torchrun, and launch/slurm.sbatch with stub srun/scontrol that
start real processes. Each checkpoints and gives the losses of a 2-process torchrun run."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from sessa_train.launch import main
from tests.helpers import HANG_GUARD_S
from tests.trainer import ENV, REPO, losses, train, write_config

TRAINER = ["--config", "configs/350m.yaml", "--resume", "auto", "schedule.train_steps=10", "schedule.warmup_steps=1"]


@pytest.fixture
def hostfile(tmp_path) -> Path:
    path = tmp_path / "hosts"
    path.write_text("# two nodes\nnode-a slots=8\nnode-b slots=8\n")
    return path


def dry_run(capsys, *args: str) -> list[tuple[str, str]]:
    """[(node header, command)] printed by --dry-run."""
    assert main([*args, "--dry-run", "--", *TRAINER]) == 0
    lines = capsys.readouterr().out.splitlines()
    return list(zip(lines[1::2], lines[2::2], strict=True))


def test_torchrun_dry_run_for_two_nodes(capsys, hostfile):
    nodes = dry_run(capsys, "torchrun", "--hostfile", str(hostfile), "--master-port", "29600")
    assert [h for h, _ in nodes] == ["# node 0 (node-a): ranks 0-7", "# node 1 (node-b): ranks 8-15"]
    for rank, (_, cmd) in enumerate(nodes):
        assert "--nnodes 2 --nproc-per-node 8" in cmd and f"--node-rank {rank} " in cmd
        assert "--master-addr node-a --master-port 29600 -m sessa_train.train" in cmd
        assert cmd.endswith(f"{' '.join(TRAINER)} 2>&1 | tee -a logs/node{rank}.log")
        threads = max(1, os.cpu_count() // 8)  # the node's cores over its 8 ranks
        assert cmd.startswith(
            f"env TORCH_NCCL_ASYNC_ERROR_HANDLING=1 NCCL_DEBUG=WARN PYTHONUNBUFFERED=1 OMP_NUM_THREADS={threads} "
        )


def test_deepspeed_dry_runs_for_two_nodes(capsys, hostfile):
    pdsh = dry_run(capsys, "deepspeed", "--hostfile", str(hostfile))
    assert (
        f"{sys.executable} -m deepspeed.launcher.runner --hostfile {hostfile} --master_addr=node-a "
        "--master_port=29500 --module sessa_train.train" in (pdsh[0][1])
    )
    assert pdsh[1] == ("# node 1 (node-b): ranks 8-15", "(started over pdsh by the DeepSpeed runner on node 0)")
    no_ssh = dry_run(capsys, "deepspeed", "--hostfile", str(hostfile), "--no-ssh", "--master-addr", "10.0.0.1")
    for rank, (_, cmd) in enumerate(no_ssh):
        assert f"--no_ssh --node_rank={rank} --master_addr=10.0.0.1 --master_port=29500" in cmd


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("node-a slots=8\nnode-b slots=4\n", "every host needs the same slots"),
        ("node-a slots=eight\n", "expected lines like 'node-a slots=8'"),
        ("", "no hosts"),
    ],
)
def test_bad_hostfile_is_a_one_line_error(capsys, tmp_path, content, message):
    (tmp_path / "hosts").write_text(content)
    assert main(["torchrun", "--hostfile", str(tmp_path / "hosts"), "--dry-run", "--", *TRAINER]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sessa-launch: error: --hostfile") and message in err[0], err


def test_launch_arguments_are_checked_before_anything_runs(capsys, hostfile):
    assert main(["torchrun", "--hostfile", str(hostfile), "--node-rank", "2", "--dry-run", "--", *TRAINER]) == 2
    assert capsys.readouterr().err.strip() == "sessa-launch: error: --node-rank 2 is not in 0..1"
    with pytest.raises(SystemExit):
        main(["torchrun", "--hostfile", str(hostfile), "--dry-run", "--", "--config", "configs/nope.yaml"])
    assert "--config configs/nope.yaml: no such file" in capsys.readouterr().err
    # the whole trainer config is checked, once, before any node starts
    assert main(["torchrun", "--hostfile", str(hostfile), "--dry-run", "--", *TRAINER, "optimizer.lr=inf"]) == 2
    assert capsys.readouterr().err.strip() == "sessa-launch: error: optimizer.lr must be a finite number, got inf"


# -- two nodes on this machine ----------------------------------------------------------------

STEPS = ["schedule.train_steps=4", "schedule.warmup_steps=1", "checkpoint.every_steps=2", "logging.eval_every_steps=2"]
VENV_BIN = str(Path(sys.executable).parent)
# no activated environment: the venv's scripts are not on PATH, the launcher is found from the interpreter
PLAIN_ENV = ENV | {"PATH": ":".join(p for p in os.environ["PATH"].split(":") if p != VENV_BIN)}


def slurm_env(tmp_path: Path, stubs: dict[str, str], job: str, nodes: str, port: int) -> dict[str, str]:
    """The environment of launch/slurm.sbatch run outside Slurm: the given stub commands
    (scontrol, srun) first on PATH, the job's variables, one CPU and GPU per task."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in stubs.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    env = PLAIN_ENV | {"PATH": f"{bin_dir}:{PLAIN_ENV['PATH']}", "SLURM_JOB_ID": job, "SLURM_JOB_NODELIST": nodes}
    env |= {"SLURM_CPUS_PER_TASK": "1", "GPUS_PER_NODE": "1", "LOG_DIR": str(tmp_path / "logs")}
    return env | {"PYTHON": sys.executable, "MASTER_PORT": str(port)}


@pytest.fixture(scope="module")
def two_processes(shards, tmp_path_factory) -> list:
    """The reference: the same run as 2 processes of one torchrun."""
    root = tmp_path_factory.mktemp("two_processes")
    train(write_config(root / "c.yaml", shards, root / "run"), *STEPS, nproc=2)
    return losses(root / "run")


def _node(launcher: list[str], node: int, tmp_path: Path, cfg: Path, port: int) -> subprocess.Popen:
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    cmd = [sys.executable, "-m", "sessa_train.launch", *launcher, "--hostfile", str(hosts), "--node-rank", str(node)]
    cmd += ["--master-addr", "127.0.0.1", "--master-port", str(port), "--omp-threads", "1"]
    cmd += ["--log-dir", str(tmp_path / "logs"), "--", "--config", str(cfg), *STEPS]
    return subprocess.Popen(cmd, env=PLAIN_ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", [["deepspeed", "--no-ssh"], ["torchrun"]])
def test_two_nodes_through_the_launcher_train_like_two_processes(launcher, shards, tmp_path, two_processes):
    cfg = write_config(tmp_path / "c.yaml", shards, tmp_path / "run")
    port = 29100 + os.getpid() % 300 + len(launcher)
    nodes = [_node(launcher, node, tmp_path, cfg, port) for node in (0, 1)]
    codes = [n.wait(timeout=HANG_GUARD_S) for n in nodes]
    logs = "\n".join(f.read_text()[-2000:] for f in sorted((tmp_path / "logs").glob("node*.log")))
    assert codes == [0, 0], logs
    assert "2 ranks" in (tmp_path / "logs" / "node0.log").read_text()
    assert (tmp_path / "run" / "ckpt" / "latest").read_text().strip() == "step_00000004"
    assert losses(tmp_path / "run") == two_processes


@pytest.mark.slow
def test_slurm_script_runs_two_nodes(shards, tmp_path, two_processes):
    """scontrol and srun are stubs: the job's node list, and one real task per node."""
    stubs = {
        "scontrol": "#!/bin/bash\nprintf 'localhost\\n127.0.0.1\\n'\n",
        # srun --kill-on-bad-exit=1 bash -c CMD: CMD once per node, concurrently, as Slurm does
        "srun": '#!/bin/bash\nshift\nfor id in 0 1; do SLURM_NODEID=$id "$@" & done\nfail=0\n'
        "for job in $(jobs -p); do wait $job || fail=1; done\nexit $fail\n",
    }
    cfg = write_config(tmp_path / "c.yaml", shards, tmp_path / "run")
    env = slurm_env(tmp_path, stubs, job="77", nodes="n[1-2]", port=29500 + os.getpid() % 300)
    out = subprocess.run(
        ["bash", str(REPO / "launch" / "slurm.sbatch"), "--config", str(cfg), *STEPS],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=HANG_GUARD_S,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert (tmp_path / "logs" / "hostfile").read_text() == "localhost slots=1\n127.0.0.1 slots=1\n"
    assert "2 ranks" in (tmp_path / "logs" / "node0.log").read_text()
    assert (tmp_path / "run" / "ckpt" / "latest").read_text().strip() == "step_00000004"
    assert losses(tmp_path / "run") == two_processes


LONG = ["schedule.train_steps=8", "schedule.warmup_steps=1", "checkpoint.every_steps=2", "logging.eval_every_steps=0"]


def _ranks(parent: int) -> dict[int, int]:
    """RANK -> pid of the trainer processes below ``parent``."""
    found = {}
    for pid in subprocess.run(["pgrep", "-f", "sessa_train.train"], capture_output=True, text=True).stdout.split():
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            stat_ppid = Path(f"/proc/{pid}/stat").read_text().split()[3]
        except OSError:
            continue
        rank = next((e.split(b"=", 1)[1] for e in env if e.startswith(b"RANK=")), None)
        if rank is not None and _descends(int(pid), parent):
            found[int(rank)] = int(pid)
        del stat_ppid
    return found


def _descends(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().split()[3])
        except OSError:
            return False
    return False


def _wait_for_step(run: Path, step: int) -> None:
    import json
    import time

    metrics, deadline = run / "tb" / "metrics.jsonl", time.time() + HANG_GUARD_S
    while time.time() < deadline:
        if metrics.exists() and any(json.loads(x).get("step", 0) >= step for x in metrics.read_text().splitlines()
                                    if x.strip().endswith("}")):  # fmt: skip
            return
        time.sleep(0.1)
    raise AssertionError(f"{run} never reached step {step}")


@pytest.mark.slow
def test_a_killed_worker_restarts_and_the_job_follows_the_uninterrupted_run(shards, tmp_path):
    """sessa-launch torchrun --max-restarts 1: rank 1 killed (SIGKILL) mid-way; torchrun restarts the
    worker group, which resumes from the newest complete checkpoint by itself; the losses equal an
    uninterrupted run's."""
    import signal

    reference = tmp_path / "reference"
    train(write_config(tmp_path / "r.yaml", shards, reference), *LONG, nproc=2)
    cfg = write_config(tmp_path / "c.yaml", shards, tmp_path / "run")
    (tmp_path / "hosts").write_text("localhost slots=2\n")
    cmd = [sys.executable, "-m", "sessa_train.launch", "torchrun", "--hostfile", str(tmp_path / "hosts"),
           "--master-addr", "127.0.0.1", "--master-port", str(29400 + os.getpid() % 300), "--omp-threads", "1",
           "--max-restarts", "1", "--log-dir", str(tmp_path / "logs"), "--", "--config", str(cfg), *LONG]  # fmt: skip
    job = subprocess.Popen(cmd, env=PLAIN_ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_step(tmp_path / "run", 3)
    os.kill(_ranks(job.pid)[1], signal.SIGKILL)
    out, _ = job.communicate(timeout=HANG_GUARD_S)
    assert job.returncode == 0, out[-3000:]
    assert "restart 1 of this job: resuming from the newest complete checkpoint" in out
    assert losses(tmp_path / "run") == losses(reference)
    assert "Traceback" not in out, out[-3000:]  # the surviving rank says in one line what happened


@pytest.mark.slow
def test_slurm_preemption_saves_and_requeues(shards, tmp_path):
    """USR1 to the batch shell (Slurm's --signal=B:USR1@120): the ranks save the same step and stop,
    then the script requeues its job (scontrol requeue, a stub that records it)."""
    import signal
    import time

    record = tmp_path / "scontrol.log"
    stubs = {
        "scontrol": f'#!/bin/bash\necho "$@" >> {record}\n[ "$1" = show ] && printf "localhost\\n"\nexit 0\n',
        # as srun does, USR1 and TERM are passed on to the tasks
        "srun": "#!/bin/bash\nshift\nSLURM_NODEID=0 \"$@\" &\ntask=$!\ntrap 'kill -USR1 $task' USR1\n"
        "wait $task; wait $task\n",
    }
    cfg = write_config(tmp_path / "c.yaml", shards, tmp_path / "run")
    env = slurm_env(tmp_path, stubs, job="78", nodes="n1", port=29450 + os.getpid() % 300)
    steps = ["schedule.train_steps=100000", "checkpoint.every_steps=1000", "logging.eval_every_steps=0"]
    job = subprocess.Popen(["bash", str(REPO / "launch" / "slurm.sbatch"), "--config", str(cfg), *steps], env=env,
                           cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    _wait_for_step(tmp_path / "run", 2)
    time.sleep(0.5)
    job.send_signal(signal.SIGUSR1)
    out, _ = job.communicate(timeout=HANG_GUARD_S)
    assert job.returncode == 0, out[-3000:]
    assert "requeue 78" in record.read_text()
    last = losses(tmp_path / "run")[-1][0]
    assert (tmp_path / "run" / "ckpt" / "latest").read_text().strip() == f"step_{last:08d}"
    assert "on SIGTERM received by rank 0: saving" in (tmp_path / "logs" / "node0.log").read_text()


def test_passive_openmp_and_a_per_environment_extension_folder_unless_set(capsys, hostfile, monkeypatch):
    """The launcher's ranks and the trainer itself get OMP_WAIT_POLICY=PASSIVE and
    TORCH_EXTENSIONS_DIR under this environment's prefix (values the user set are kept), and
    the environment's bin folder first on PATH, so one ninja builds the extensions."""
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    own = f"{sys.prefix}/torch_extensions"
    for _, cmd in dry_run(capsys, "torchrun", "--hostfile", str(hostfile)):
        assert " OMP_WAIT_POLICY=PASSIVE " in cmd and f" TORCH_EXTENSIONS_DIR={own} " in cmd
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    for _, cmd in dry_run(capsys, "torchrun", "--hostfile", str(hostfile)):
        assert " OMP_WAIT_POLICY=ACTIVE " in cmd
    probe = (
        "import os; from sessa_train.train import main; main(['--config', 'configs/tiny.yaml', 'model.d_model=0']);"
        "import shutil; print(os.environ['OMP_WAIT_POLICY'], os.environ['TORCH_EXTENSIONS_DIR'], shutil.which('ninja'))"
    )
    env = {k: v for k, v in PLAIN_ENV.items() if k not in ("OMP_WAIT_POLICY", "TORCH_EXTENSIONS_DIR")}
    ninja = f"{VENV_BIN}/ninja"
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True)
    assert out.stdout.split() == ["PASSIVE", own, ninja] and "model.d_model must be a positive integer" in out.stderr
    activated = env | {"TORCH_EXTENSIONS_DIR": "/x", "PATH": f"{VENV_BIN}:{env['PATH']}"}
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=activated, capture_output=True, text=True)
    assert out.stdout.split() == ["PASSIVE", "/x", ninja]
