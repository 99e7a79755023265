"""Ranks never oversubscribe the CPU: each rank trains with its share of the cores, read in the workers."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapters import threads

from conftest import output, train

MODEL = ["framework.model._target_=my_pkg.ThreadsSeen", "framework.data._target_=my_pkg.Regression",
         "framework.steps=2", "framework.log_every=1"]  # fmt: skip


def seen(workdir: Path, *overrides: str, omp: str | None = None) -> dict[int, int]:
    """Train, and return rank -> torch.get_num_threads() as each rank saw it in its model's forward."""
    env = {"MY_PKG_THREADS_DIR": str(workdir), "OMP_NUM_THREADS": omp}
    proc = train(workdir, *MODEL, *overrides, env=env)
    assert proc.returncode == 0, output(proc)
    return {int(p.stem.removeprefix("threads_rank")): int(p.read_text()) for p in workdir.glob("threads_rank*.txt")}


def test_each_rank_gets_its_share_of_the_cores(workdir):
    share = max(1, threads.available_cpus() // 2)
    assert seen(workdir, "launcher.nproc=2") == {0: share, 1: share}


def test_the_setting_wins(workdir):
    assert seen(workdir, "launcher.nproc=2", "launcher.threads_per_rank=3", omp="2") == {0: 3, 1: 3}


def test_omp_num_threads_from_the_environment_is_kept(workdir):
    assert seen(workdir, "launcher.nproc=2", omp="2") == {0: 2, 1: 2}


@pytest.mark.slow
def test_the_same_under_torchrun(workdir):
    share = max(1, threads.available_cpus() // 2)
    assert seen(workdir, "launcher=torchrun", "launcher.nproc=2") == {0: share, 1: share}
    for old in workdir.glob("threads_rank*.txt"):
        old.unlink()
    assert seen(workdir, "launcher=torchrun", "launcher.nproc=2", "launcher.threads_per_rank=3") == {0: 3, 1: 3}


def test_plan_reads_setting_then_environment_then_cores():
    assert threads.plan(4, 2, {"OMP_NUM_THREADS": "2"})[0] == 4
    assert threads.plan(0, 2, {"OMP_NUM_THREADS": "2"})[0] == 2
    assert threads.plan(0, 2, {"OMP_NUM_THREADS": "junk"})[0] == max(1, threads.available_cpus() // 2)
    assert threads.plan(0, 10_000, {})[0] == 1
    assert threads.plan(0, 2, {"OMP_NUM_THREADS": "3,1"})[0] == 3  # OpenMP's nested list: the outer level
    assert threads.plan(0, 2, {"OMP_NUM_THREADS": "\u00b2"})[0] == max(1, threads.available_cpus() // 2)
