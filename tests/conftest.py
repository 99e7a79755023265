"""Helpers shared by the tests: run train.py for real, in its own folder, and read what it left behind."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "train.py"
# my_pkg (a user's own model and data) is importable in every rank through PYTHONPATH.
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)]), "HYDRA_FULL_ERROR": ""}


def run(cmd: list[str], cwd: Path, timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command to the end. The timeout is a hang guard, not a speed goal."""
    return subprocess.run(cmd, cwd=cwd, env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=timeout)


def train(cwd: Path, *overrides: str, **kwargs) -> subprocess.CompletedProcess:
    return run([sys.executable, str(TRAIN), *overrides], cwd, **kwargs)


def run_dirs(cwd: Path) -> list[Path]:
    """The run folders train.py created under ``cwd`` (Hydra's outputs/<date>/<time>)."""
    return sorted(p for p in (cwd / "outputs").glob("*/*") if p.is_dir())


def output(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


def requires(framework: str):
    """Skip a test when the framework is not installed here; fail instead where the session requires it.

    The framework's nox session sets ADAPTERS_REQUIRE=<name>, so a broken install can never pass as skips.
    """
    from adapters import registry

    missing = [m for m in registry.entry(framework).requires if importlib.util.find_spec(m) is None]
    required = framework in os.environ.get("ADAPTERS_REQUIRE", "").split(",")
    return pytest.mark.skipif(bool(missing) and not required, reason=f"{framework} not installed: {missing}")


def _parents() -> dict[int, int]:
    """pid -> parent pid, for every process (Linux /proc)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return parents


def grandchildren(pid: int) -> list[int]:
    """train.py's children are the ranks (and multiprocessing's resource tracker); theirs, the augmenters."""
    parents = _parents()
    children = [p for p, parent in parents.items() if parent == pid]
    return [p for p, parent in parents.items() if parent in children]
