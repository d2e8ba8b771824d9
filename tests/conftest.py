"""Test-session set-up: Triton kernels run in its CPU interpreter when no GPU is present
(TRITON_INTERPRET must be set before triton is first imported, so it is set here, before any
test module is collected), and the trainer's environment defaults (sessa_train/process_env.py);
the small tokenized corpus the trainer and export tests train on; the one full run of
configs/tiny.yaml that the learning and the parallel-trajectory tests share; the small 2-process
ZeRO-2 run and its export that the export and transformers tests share.
"""

import os
from pathlib import Path

import pytest
import torch

from sessa_train.data import train_tokenizer, write_shards
from sessa_train.process_env import apply_runtime_defaults

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
# as in every trainer process: the ranks the tests spawn themselves load DeepSpeed's CPU
# communication op from <venv>/torch_extensions, where tools/bootstrap.sh built it, instead of
# building a second copy under ~/.cache (about 32 s on this 2-core machine)
apply_runtime_defaults()


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    """Tokenizer (vocab 400) and shards (samples of 32 tokens) of 40 pydoc topics."""
    from pydoc_data.topics import topics

    root = tmp_path_factory.mktemp("train_data")
    docs = [topics[name][:1500] for name in sorted(topics)][:40]
    model = train_tokenizer(docs, root / "tok.model", vocab_size=400)
    write_shards(docs, model, root / "shards", seq_len=31, samples_per_shard=40, val_fraction=0.1)
    return root / "shards"


@pytest.fixture(scope="session")
def default_data(tmp_path_factory) -> Path:
    """The offline default corpus, its tokenizer and shards (sessa-prepare-default-data)."""
    from sessa_train.data.cli import prepare_default_data_main

    data = tmp_path_factory.mktemp("default") / "default"
    assert prepare_default_data_main(["--out-dir", str(data)]) == 0
    return data


@pytest.fixture(scope="session")
def tiny_run(default_data, tmp_path_factory) -> dict[str, Path]:
    """configs/tiny.yaml for the first 150 of its 300 steps (its schedule unchanged) in one process
    on the offline default corpus (checkpoints at 100 and 150); {"data": prepared data folder,
    "run": run folder}."""
    from tests.trainer import REPO, train

    data, run = default_data, tmp_path_factory.mktemp("tiny") / "run"
    train(
        REPO / "configs" / "tiny.yaml",
        *tiny_overrides(data, run),
        "logging.eval_every_steps=0",
        f"schedule.stop_after_steps={TINY_STEPS}",
        threads=2,
    )
    return {"data": data, "run": run}


TINY_STEPS = 150


def tiny_overrides(data: Path, run: Path) -> list[str]:
    return [
        f"data.path={data / 'shards'}",
        f"data.tokenizer={data / 'tokenizer.model'}",
        f"checkpoint.dir={run / 'ckpt'}",
        f"logging.dir={run / 'tb'}",
    ]


@pytest.fixture(scope="session")
def zero2_run(shards, tmp_path_factory) -> Path:
    """8 steps of the small model in 2 processes with ZeRO-2 (optimizer state sharded)."""
    from tests.trainer import train, write_config

    root = tmp_path_factory.mktemp("export_run")
    cfg = write_config(root / "c.yaml", shards, root, n_heads=2, feedback_heads=2)
    train(cfg, "parallel.zero_stage=2", "logging.eval_every_steps=0", nproc=2)
    assert len(list((root / "ckpt" / "step_00000008" / "model").glob("*.safetensors"))) == 2  # a part per rank
    return root


@pytest.fixture(scope="session")
def exported(zero2_run, tmp_path_factory) -> Path:
    """The export of ``zero2_run`` with the tokenizer its checkpoint carries."""
    from sessa_train.export import export_checkpoint

    return export_checkpoint(zero2_run / "ckpt", tmp_path_factory.mktemp("export") / "sessa-small")
