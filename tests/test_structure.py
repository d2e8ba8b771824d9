"""The package's structure: imports run downward (errors/files/config/distributed -> ops -> models ->
parallel -> checkpoint -> trainer, export, tools) and light entry points do not import torch."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import HANG_GUARD_S

PACKAGE = Path(__file__).resolve().parent.parent / "sessa_train"
# a module of a layer may import its own layer and the ones before it, never a later one
LAYERS = ["errors", "files", "hardware", "config", "distributed", "ops", "models", "parallel", "checkpoint"]
DATA = "data"  # beside the model stack: errors and config only; the checkpoint's loader part reads it


def _layer(module: str) -> int:
    """Index in LAYERS of ``sessa_train.<part>...``; len(LAYERS) for anything above them."""
    part = module.split(".")[1] if module.count(".") else ""
    return LAYERS.index(part) if part in LAYERS else len(LAYERS)


def _imports(path: Path) -> set[str]:
    """Every sessa_train module ``path`` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("sessa_train")}
        elif isinstance(node, ast.ImportFrom) and node.module == "sessa_train":  # from sessa_train import x
            found |= {f"sessa_train.{a.name}" for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sessa_train"):
            found.add(node.module)
    return found


def _modules(part: str) -> list[Path]:
    return sorted((PACKAGE / part).rglob("*.py")) if (PACKAGE / part).is_dir() else [PACKAGE / f"{part}.py"]


@pytest.mark.parametrize("part", [*LAYERS, DATA])
def test_imports_run_downward(part):
    allowed = LAYERS.index(part) if part in LAYERS else LAYERS.index("config")
    wrong = {
        f"{path.relative_to(PACKAGE)} imports {target}"
        for path in _modules(part)
        for target in _imports(path)
        if _layer(target) > allowed and not (part in (DATA, "checkpoint") and target.startswith("sessa_train.data"))
    }
    assert not wrong, sorted(wrong)


def test_the_rule_sees_a_wrong_import(tmp_path):
    """The check above can fail: a models module that imports the trainer is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from sessa_train.trainer.build import build_engine\n")
    assert any(_layer(t) > LAYERS.index("models") for t in _imports(bad))


def test_config_and_launcher_do_not_import_torch():
    code = "import sys, sessa_train.config, sessa_train.errors, sessa_train.launch; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_context_parallel_honours_the_backend_choice(monkeypatch):
    """The one dispatch point decides under context parallelism too: the environment's choice is
    taken (chunked, or the Triton kernels with their own block size), and the dense reference,
    which cannot be split over ranks, is a one-line error."""
    pytest.importorskip("megatron.core")
    import torch

    from sessa_train.config import ComputeConfig
    from sessa_train.errors import ConfigError
    from sessa_train.ops import Solver
    from sessa_train.parallel.plan import MegatronPlan
    from sessa_train.parallel.state import ParallelState

    state = ParallelState(tp=1, pp=1, dp=1, tp_rank=0, pp_rank=0, dp_rank=0, cp=2, cp_rank=1)
    cpu = torch.device("cpu")

    def plan():
        return MegatronPlan(ComputeConfig(), state, config=None)

    monkeypatch.setenv("SESSA_FEEDBACK_BACKEND", "chunked")
    chosen = plan()
    assert chosen.solver(cpu) == Solver("chunked")
    monkeypatch.setenv("SESSA_FEEDBACK_BACKEND", "triton")
    assert chosen.solver(cpu) == Solver("chunked")  # chosen once, at set-up: the environment is read then
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert plan().solver(cpu) == Solver("triton")
    monkeypatch.setenv("SESSA_FEEDBACK_BACKEND", "reference")
    with pytest.raises(ConfigError, match=r"^feedback backend 'reference' .* cannot be split by parallel\.context"):
        plan().solver(cpu)
    tensor_only = dataclasses.replace(state, cp=1, cp_rank=0)  # without CP the reference stays available
    assert MegatronPlan(ComputeConfig(), tensor_only, config=None).solver(cpu) == Solver("reference")
