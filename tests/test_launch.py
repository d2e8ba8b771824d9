"""sessa-launch: per-node commands for a 2-node x 8-GPU hostfile, a real 2-rank run, Slurm."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from sessa_train.launch import main
from tests.trainer import ENV, REPO, losses, write_config

TRAINER = ["--config", "configs/350m.yaml", "--resume", "auto", "schedule.train_steps=10"]


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
        assert cmd.startswith(
            "env TORCH_NCCL_ASYNC_ERROR_HANDLING=1 NCCL_DEBUG=WARN PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4"
        )


def test_deepspeed_dry_runs_for_two_nodes(capsys, hostfile):
    pdsh = dry_run(capsys, "deepspeed", "--hostfile", str(hostfile))
    assert (
        f"deepspeed --hostfile {hostfile} --master_addr=node-a --master_port=29500 --module sessa_train.train"
        in (pdsh[0][1])
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


@pytest.mark.slow
def test_torchrun_launch_trains_two_ranks_and_logs_per_node(shards, tmp_path):
    (tmp_path / "hosts").write_text("localhost slots=2\n")
    cfg = write_config(tmp_path / "c.yaml", shards, tmp_path / "run")
    cmd = [sys.executable, "-m", "sessa_train.launch", "torchrun", "--hostfile", str(tmp_path / "hosts")]
    cmd += ["--node-rank", "0", "--master-addr", "127.0.0.1", "--master-port", str(29700 + os.getpid() % 200)]
    cmd += ["--omp-threads", "1", "--log-dir", str(tmp_path / "logs"), "--", "--config", str(cfg)]
    out = subprocess.run(
        [*cmd, "schedule.train_steps=3"], capture_output=True, text=True, env=ENV, cwd=REPO, timeout=600
    )
    assert out.returncode == 0, out.stdout[-3000:]
    log = (tmp_path / "logs" / "node0.log").read_text()
    assert "2 ranks" in log and "step 3/3" in log
    assert [s for s, _ in losses(tmp_path / "run")] == [1, 2, 3]


def test_slurm_script_writes_the_hostfile_and_starts_one_launcher_per_node(tmp_path):
    """scontrol and srun are stubs: the job's node list, and srun showing what each node runs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stubs = {
        "scontrol": "#!/bin/bash\nprintf 'gpu-01\\ngpu-02\\n'\n",
        # srun --kill-on-bad-exit=1 bash -c "sessa-launch ...": echo what each node would run
        "srun": '#!/bin/bash\nshift\nfor id in 0 1; do SLURM_NODEID=$id "$1" "$2" "echo ${3#sessa-launch }"; done\n',
    }
    for name, text in stubs.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    env = {**ENV, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "gpu-[01-02]"}
    env |= {"SLURM_CPUS_PER_TASK": "64", "LOG_DIR": str(tmp_path / "logs")}
    out = subprocess.run(
        ["bash", str(REPO / "launch" / "slurm.sbatch"), "--config", "configs/1.3b.yaml", "--resume", "auto"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "logs" / "hostfile").read_text() == "gpu-01 slots=8\ngpu-02 slots=8\n"
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2
    for node_id, line in enumerate(lines):
        assert re.search(rf"torchrun --hostfile \S+/logs/hostfile --node-rank {node_id} --omp-threads 8 ", line), line
        assert line.endswith("-- --config configs/1.3b.yaml --resume auto"), line
