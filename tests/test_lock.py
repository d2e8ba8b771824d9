"""requirements.lock: what tools/bootstrap.sh installs. The running environment is exactly the
lock, and the lock satisfies every range pyproject.toml declares (the ranges library users get)."""

from __future__ import annotations

import subprocess
import sys

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.trainer import REPO


def pins(lines: list[str]) -> dict[str, str]:
    """{canonical name: version} of ``name==version`` lines (comments and blanks skipped)."""
    out = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            out[canonicalize_name(name)] = version
    return out


def locked() -> dict[str, str]:
    return pins((REPO / "requirements.lock").read_text().splitlines())


def test_the_environment_is_the_lock():
    freeze = [sys.executable, "-m", "pip", "freeze", "--all", "--exclude-editable"]
    out = subprocess.run(freeze, capture_output=True, text=True, check=True)
    installed = pins([line for line in out.stdout.splitlines() if not line.lower().startswith("pip==")])
    lock = locked()
    differ = {
        n: (installed.get(n), lock.get(n)) for n in installed.keys() | lock.keys() if installed.get(n) != lock.get(n)
    }
    assert not differ, f"installed vs requirements.lock (run bash tools/bootstrap.sh): {dict(sorted(differ.items()))}"


def test_the_lock_satisfies_every_declared_range():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    lock = locked()
    for text in declared:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        assert name in lock, f"{req.name} is declared but not locked"
        version = Version(lock[name])
        assert req.specifier.contains(version, prereleases=True), f"locked {req.name}=={version} is outside {text!r}"
    assert Version(lock["torch"]).public == "2.13.0"  # tools/bootstrap.sh's pin (the local CPU wheel)
