"""omegaconf composition of the typed configs: presets, overrides, one-line errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from sessa_train.config import ConfigError, load_config
from sessa_train.models import SessaLM

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize(("preset", "millions"), [("tiny", 1.1), ("125m", 125), ("350m", 350), ("1.3b", 1300)])
def test_presets_load_and_have_their_size(preset, millions):
    """Each preset builds the model SESSA.md's equations count (tests/test_model.py's hand count),
    within 3% of the size its name gives."""
    from tests.test_model import expected_parameter_count

    cfg = load_config([CONFIGS / f"{preset}.yaml"])
    with torch.device("meta"):
        n = SessaLM(cfg.model).num_parameters()
    assert n == expected_parameter_count(cfg.model)
    assert abs(n / 1e6 / millions - 1) < 0.03


def test_files_merge_in_order_then_overrides_win(tmp_path):
    extra = tmp_path / "extra.yaml"
    extra.write_text("model:\n  n_layers: 2\nschedule:\n  train_steps: 50\n  warmup_steps: 5\n")
    cfg = load_config([CONFIGS / "tiny.yaml", extra], ["schedule.train_steps=40", "model.n_kv_heads=2"])
    assert (cfg.model.n_layers, cfg.model.d_model, cfg.model.n_kv_heads) == (2, 128, 2)
    assert (cfg.schedule.train_steps, cfg.schedule.warmup_steps, cfg.data.micro_batch_size) == (40, 5, 8)
    assert cfg.to_dict()["optimizer"]["lr"] == 3e-3


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.dmodel=3"], "config key model.dmodel (command-line overrides): Key 'dmodel' not in 'ModelConfig'"),
        (["model.d_model=abc"], "config key model.d_model (command-line overrides): Value 'abc'"),
        (["model.rope=maybe"], "config key model.rope (command-line overrides): Value 'maybe' is not a valid bool"),
        (["trainer.steps=1"], "config key trainer (command-line overrides): Key 'trainer' not in 'TrainConfig'"),
        (["optimizer.lr=-1"], "optimizer.lr must be > 0, got -1.0"),
        (["model.d_model=30"], "model.d_model=30 must be divisible by model.n_heads=4"),
        (["schedule.decay=step"], "schedule.decay='step'; valid: cosine, linear, constant"),
        (["parallel.zero_stage=4"], "parallel.zero_stage must be 0, 1, 2 or 3, got 4"),
        (["schedule.train_steps=10"], "schedule.warmup_steps must be in [0, train_steps=10], got 30"),
        (["train_steps"], "override 'train_steps' is not of the form key=value"),
        (["optimizer.lr=inf"], "optimizer.lr must be a finite number, got inf"),
        (["model.init_std=inf"], "model.init_std must be a finite number, got inf"),
        (["data.max_skipped_fraction=1.5"], "data.max_skipped_fraction must be in [0, 1), got 1.5"),
        (["data.reader_slots=-1"], "data.reader_slots must be >= 0 (0: automatic), got -1"),
    ],
)
def test_bad_values_are_one_line_errors_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        load_config([CONFIGS / "tiny.yaml"], overrides)
    assert "\n" not in str(info.value)


def test_bad_file_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  d_modle: 64\n")
    with pytest.raises(ConfigError, match=re.escape(f"config key model.d_modle ({bad})")):
        load_config([CONFIGS / "tiny.yaml", bad])
    with pytest.raises(ConfigError, match=re.escape("config file not found: /nonexistent.yaml")):
        load_config(["/nonexistent.yaml"])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("model: [1,\n", "is not valid YAML (did not find expected node content at line 2, column 1)"),
        ("model:\n  d_model: 64\n d_layers: 2\n", "is not valid YAML"),
        ("- model\n- data\n", "must be a mapping of sections (model:, data:, schedule:, ...), got a list"),
    ],
)
def test_yaml_that_is_not_a_config_mapping_is_a_one_line_error(tmp_path, text, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        load_config([bad])
    assert str(info.value).startswith(str(bad)) and "\n" not in str(info.value)


def test_a_bad_yaml_file_through_the_cli_is_rc_2_and_one_line(tmp_path, capsys):
    from sessa_train.train import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1,\n")
    assert main(["--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"sessa-train: error: {bad} is not valid YAML"), err
