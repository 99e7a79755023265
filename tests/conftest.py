"""Helpers shared by the tests: run train.py for real, in its own folder, and read what it left behind."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "train.py"
# my_pkg (a user's own model and data) is importable in every rank through PYTHONPATH. Every rank writes a
# digest of its parameters at the end of a run (ADAPTERS_TEST_SAVE_REPLICAS), which `run` compares; test
# hooks act only with ADAPTERS_TEST_HOOKS=1. Stale torch.distributed variables of the calling shell are
# dropped. Threads per rank are left to the launcher (launcher.threads_per_rank), as a user's runs have them.
_STALE = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")
ENV = {**{k: v for k, v in os.environ.items() if k not in _STALE},
       "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)]), "HYDRA_FULL_ERROR": "",
       "ADAPTERS_TEST_HOOKS": "1", "ADAPTERS_TEST_SAVE_REPLICAS": "1"}  # fmt: skip


# A team's preset, framework-neutral (ddp=auto, probe_steps=3, bucket_cap_mb=50): every framework's tests run it.
TEAM_PRESET = ("preset=team-all", f"hydra.searchpath=[file://{REPO / 'tests' / 'team'}]")


def run(cmd: list[str], cwd: Path, timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command to the end. The timeout is a hang guard, not a speed goal.

    Every multi-process run that finished checks here that its replicas agree: each rank's parameter
    digests, written by the rank itself, must be the same as rank 0's (independently of the run's own
    replica check, which is on by default and fails the run).
    """
    env = {k: v for k, v in {**ENV, **(env or {})}.items() if v is not None}  # None: unset it
    Path(cwd).mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode == 0:
        for folder in {p.parent for p in Path(cwd).rglob("replica_rank*.json")}:
            assert_replicas_equal(folder)
    return proc


def replica_digests(run_dir: Path) -> dict[int, dict[str, str]]:
    """rank -> {parameter name: SHA-256 of its bytes}, as each rank wrote them at the end of its run."""
    return {int(p.stem.removeprefix("replica_rank")): json.loads(p.read_text())
            for p in sorted(run_dir.glob("replica_rank*.json"))}  # fmt: skip


def assert_replicas_equal(run_dir: Path) -> None:
    digests = replica_digests(run_dir)
    assert len(digests) > 1 or digests.keys() == {0}, f"replica digests missing in {run_dir}"
    differ = sorted({n for rank, d in digests.items() for n in d if d[n] != digests[0].get(n)})
    assert not differ, f"the replicas differ in {run_dir}: {differ}"


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


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc)."""
    parents = _parents()
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def alive(pids: list[int]) -> list[int]:
    """The pids that still run (zombies, whose parent has not reaped them yet, count as gone)."""
    out = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.append(pid)
    return out


def wait_gone(pids: list[int], within: float = 10.0) -> list[int]:
    deadline = time.monotonic() + within
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive(pids)


def offered_fixes(text: str, code_fixes: dict[str, list[str]] | None = None) -> list[list[str]]:
    """The fixes a failure message lists under "Fix it on the command line:", as override lists; a fix given as
    code ("in your code: ...") is mapped through ``code_fixes`` to the same change made to a test model."""
    import re
    import shlex

    from adapters.advice import CODE

    block = text.split("Fix it on the command line:\n", 1)[1]
    found = []
    for line in block.splitlines():
        if not line.startswith("  ") or not line.strip():
            break
        if line.startswith("    "):  # the reason of a long override, on the line under it
            continue
        override = re.split(r"\s{2,}", line.strip(), maxsplit=1)[0]
        if override.startswith(CODE):
            found.append((code_fixes or {})[override.removeprefix(CODE)])
        else:
            found.append(shlex.split(override))
    return found


def assert_every_fix_trains(workdir: Path, failing: subprocess.CompletedProcess, base: list[str], model: list[str],
                            *, code_fixes: dict | None = None, **kwargs) -> list[list[str]]:  # fmt: skip
    """Run ``base + model + fix`` for every fix ``failing``'s message offers; each must train (exit 0, replicas
    equal). A fix's overrides replace the model's overrides of the same key. Returns the fixes."""
    found = offered_fixes(failing.stderr, code_fixes)
    assert found, failing.stderr
    for i, fix in enumerate(found):
        keys = {o.lstrip("+").split("=", 1)[0] for o in fix}
        kept = [o for o in model if o.lstrip("+").split("=", 1)[0] not in keys]
        command = (*base, *kept, *fix)
        if command in _TRAINED:  # another failure offered the same fix for the same model: it trained then
            continue
        done = train(workdir / f"fix{i}", *command, **kwargs)
        assert done.returncode == 0, f"the offered fix {fix} fails:\n{output(done)}"
        _TRAINED.add(command)
    return found


_TRAINED: set[tuple[str, ...]] = set()  # commands that trained in this session (the runs are deterministic)


def assert_same_training(workdir: Path, a: list[str], b: list[str], **kwargs) -> tuple[str, str]:
    """Train with overrides ``a`` and with ``b``: both must exit 0 and end with bit-equal weights (rank 0's digest
    of every parameter). Returns both runs' console output."""
    first = train(workdir / "a", *a, **kwargs)
    assert first.returncode == 0, output(first)
    second = train(workdir / "b", *b, **kwargs)
    assert second.returncode == 0, output(second)
    [da], [db] = run_dirs(workdir / "a"), run_dirs(workdir / "b")
    ra, rb = replica_digests(da)[0], replica_digests(db)[0]
    differ = sorted(n for n in ra if ra[n] != rb.get(n))
    assert not differ, f"the two trainings differ in {differ[:6]}"
    return output(first), output(second)


def auto_choice(text: str) -> list[str]:
    """The overrides that set by hand what ddp=auto chose, read from its log lines."""
    import re

    chosen = re.search(r"ddp=auto chose (\w+):", text).group(1)
    if chosen == "strict":
        return ["ddp=strict"]
    if chosen == "find":
        return ["ddp=safe"]
    left = [n for line in re.findall(r"DDP leaves out [^:]+: (.*)", text) for n in line.split(", ")]
    return ["ddp=ignore", f"ddp.ignore=[{','.join(dict.fromkeys(left))}]"]
