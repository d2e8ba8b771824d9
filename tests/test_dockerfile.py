"""The Dockerfile cannot be built here (no GPU base image): lint it, and check that every
`pip install` in it asks only for what the project declares (pyproject.toml, bootstrap.sh) and
takes the lock's versions."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent
BUILD_TOOLS = {"setuptools", "wheel"}


def pip_installs() -> list[list[str]]:
    """The arguments of every `pip install` in the Dockerfile's RUN lines (continuations joined)."""
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    runs = [line[4:] for line in text.splitlines() if line.startswith("RUN ")]
    found = []
    for run in runs:
        for part in re.split(r"&&|;", run):
            words = shlex.split(part)
            if words[:2] == ["pip", "install"]:
                args = words[2:]
                values = {i + 1 for i, w in enumerate(args) if w in ("--constraint", "-c")}  # a file, not a package
                found.append([w for i, w in enumerate(args) if not w.startswith("-") and i not in values])
    return found


def declared() -> dict[str, list[Requirement]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    by_name: dict[str, list[Requirement]] = {}
    for r in reqs:
        by_name.setdefault(r.name.lower(), []).append(r)
    return by_name


def test_every_pip_install_takes_the_lock():
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    installs = [part for part in re.split(r"&&|\n", text) if "pip install" in part]
    assert installs and all("--constraint /opt/constraints.txt" in part for part in installs), installs
    assert "COPY requirements.lock /opt/requirements.lock" in text


def test_every_pip_install_resolves_against_the_declared_dependencies():
    deps = declared()
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    torch_pin = re.search(r'TORCH_VERSION="([^"]+)"', (REPO / "tools" / "bootstrap.sh").read_text())[1]
    installs = [arg for args in pip_installs() for arg in args]
    assert installs, "no pip install found in the Dockerfile"
    for arg in installs:
        if arg.startswith("."):  # the package itself, with extras that must exist
            for extra in re.findall(r"\[([^\]]+)\]", arg)[0].split(",") if "[" in arg else []:
                assert extra in extras, f"Dockerfile installs .[{extra}], pyproject has extras {sorted(extras)}"
            continue
        req = Requirement(arg)
        if req.name == "torch":
            assert str(req.specifier) == f"=={torch_pin}", f"Dockerfile torch {req.specifier} != bootstrap {torch_pin}"
        if req.name in BUILD_TOOLS:
            continue
        assert req.name.lower() in deps, f"Dockerfile installs {req.name}, which pyproject.toml does not declare"
        pinned = [s.version for s in req.specifier if s.operator in ("==", ">=")]
        for ours in deps[req.name.lower()]:
            for version in pinned:
                assert ours.specifier.contains(version, prereleases=True), f"{arg} conflicts with pyproject's {ours}"


@pytest.mark.skipif(shutil.which("hadolint", path=str(Path(sys.executable).parent)) is None, reason="dev extra")
def test_hadolint_is_clean():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    out = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
