"""Faults a user or an operator causes: runs started together, resuming, a checkpoint killed mid-write, the
launcher stopped by each signal (and killed outright), a frozen rank, stale variables, a slow rank."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ENV, TRAIN, alive, assert_replicas_equal, descendants, output, run_dirs, train, wait_gone

pytestmark = pytest.mark.slow
SHORT = ["framework.steps=4", "framework.log_every=2", "framework.checkpoint_every=2"]


def test_runs_started_in_the_same_second_each_get_their_own_folder(workdir):
    # The same start time for all three, as if started in the same second (the folder name's resolution).
    env = {**ENV, "ADAPTERS_RUN_START": repr(time.time())}
    cmd = [sys.executable, str(TRAIN), "launcher.nproc=1", *SHORT]
    procs = [subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(3)]  # fmt: skip
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(outs)
    folders = run_dirs(workdir)
    assert len(folders) == 3, folders
    assert len({f.name[:8] for f in folders}) == 1, "one second, three folders"
    for folder in folders:
        log = (folder / "rank0.log").read_text()
        assert log.count("training DeepSupervisionNet") == 1 and "resuming from" not in log
        assert torch.load(folder / "checkpoints" / "last.pt", weights_only=False)["step"] == 2
        assert (folder / "model.pt").is_file()


def test_resuming_takes_an_explicit_request_and_says_from_where(workdir):
    first = train(workdir, *SHORT)
    assert first.returncode == 0, output(first)
    [folder] = run_dirs(workdir)
    # Naming a folder that holds a run, without resume=, is refused before anything is written.
    taken = train(workdir, *SHORT, f"hydra.run.dir={folder}")
    assert taken.returncode == 2, output(taken)
    assert f"hydra.run.dir={folder} already holds a run" in taken.stderr and f"resume={folder}" in taken.stderr
    assert "Traceback" not in output(taken) and run_dirs(workdir) == [folder]
    # (A new run never resumes from another's: runs started together above.)
    resumed = train(workdir, "framework.steps=6", "framework.log_every=2", f"resume={folder}")
    assert resumed.returncode == 0, output(resumed)
    assert f"resuming from step 2 of {folder}/checkpoints/last.pt (resume={folder})" in resumed.stdout
    assert "step 6/6" in resumed.stdout and run_dirs(workdir) == [folder]


def test_a_checkpoint_killed_during_its_write_leaves_the_last_one_whole(workdir):
    # Rank 0 is killed after half writing step 4's checkpoint, before it would replace step 2's.
    proc = train(workdir, "framework.steps=6", "framework.log_every=2", "framework.checkpoint_every=2",
                 env={"ADAPTERS_TEST_DIE_IN_CHECKPOINT": "4"})  # fmt: skip
    assert proc.returncode == 1, output(proc)
    assert "rank 0" in proc.stderr and "died with signal SIGKILL" in proc.stderr
    [folder] = run_dirs(workdir)
    last = folder / "checkpoints" / "last.pt"
    [partial] = list(last.parent.glob(".last.pt.*.tmp"))
    assert partial.stat().st_size > 0
    assert torch.load(last, weights_only=False)["step"] == 2  # the previous checkpoint, whole
    resumed = train(workdir, "framework.steps=6", "framework.log_every=2", "framework.checkpoint_every=2",
                    f"resume={folder}")  # fmt: skip
    assert resumed.returncode == 0, output(resumed)
    assert "resuming from step 2" in resumed.stdout and "step 6/6" in resumed.stdout
    assert not list(last.parent.glob("*.tmp")), "the stale partial file is cleaned up"
    assert_replicas_equal(folder)


def _ctrl_c_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(workdir: Path, *overrides: str) -> tuple[subprocess.Popen, Path]:
    """train.py in a session of its own (as a terminal's foreground job is its own group), once training runs."""
    cmd = [sys.executable, str(TRAIN), "framework.steps=100000", "framework.log_every=50",
           "framework.checkpoint_every=0", *overrides]  # fmt: skip
    # A terminal's foreground job has Ctrl-C at its default, whatever this test process inherited (a job started
    # with `&` by a non-interactive shell, as CI scripts do, starts with SIGINT ignored, and so would train.py).
    proc = subprocess.Popen(cmd, cwd=workdir, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=_ctrl_c_default)  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        logs = {p.name: p for p in workdir.glob("outputs/*/*/rank*.log")}
        if {"rank0.log", "rank1.log"} <= set(logs) and "training DeepSupervisionNet" in logs["rank0.log"].read_text():
            return proc, logs["rank0.log"].parent
        if proc.poll() is not None:
            raise AssertionError("".join(proc.communicate()))
        time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError("training did not start")


# With launcher=torchrun every catchable signal takes one path (passed on to the agent as SIGTERM).
@pytest.mark.parametrize(
    "sig,launcher",
    [
        ("SIGINT", "local"),
        ("SIGTERM", "local"),
        ("SIGHUP", "local"),
        ("SIGKILL", "local"),
        ("SIGTERM", "torchrun"),
        ("SIGKILL", "torchrun"),
    ],
)
def test_the_launcher_stopped_by_a_signal_leaves_no_process(workdir, sig, launcher):
    proc, folder = _start(workdir, f"launcher={launcher}")
    try:
        _signal_and_check(proc, folder, workdir, sig, launcher)
    finally:
        if proc.poll() is None:  # the test failed before its signal: leave nothing running
            os.killpg(proc.pid, signal.SIGKILL)


def _signal_and_check(proc: subprocess.Popen, folder: Path, workdir: Path, sig: str, launcher: str) -> None:
    below = descendants(proc.pid)
    assert len(below) >= 2, "the ranks run"
    if sig == "SIGINT":  # Ctrl-C: the terminal signals the whole foreground group
        os.killpg(proc.pid, signal.SIGINT)
    else:  # a scheduler or `kill` signals train.py only; SIGHUP as a closed terminal's shell sends it
        proc.send_signal(getattr(signal, sig))
    out, err = proc.communicate(timeout=60)
    code = -9 if sig == "SIGKILL" else 128 + getattr(signal, sig)
    assert proc.returncode == code, out + err
    assert not wait_gone(below), f"processes left after {sig} of the launcher: {alive(below)}"
    if sig != "SIGKILL":
        lines = [line for line in err.splitlines() if line.strip()]
        assert "Traceback" not in err, err
        what = "Ctrl-C" if sig == "SIGINT" else sig
        last = f"interrupted ({what}): ranks stopped"
        if launcher == "local":
            last += f", logs in {folder.relative_to(workdir)}"
        assert lines[-1] == last, err


def test_a_frozen_rank_is_named_and_every_rank_stopped(workdir):
    started = time.monotonic()
    proc = train(workdir, "framework.steps=100000", "framework.log_every=50", "launcher.heartbeat_s=4",
                 env={"ADAPTERS_TEST_FREEZE_AT_STEP": "3", "ADAPTERS_TEST_FREEZE_RANK": "1"})  # fmt: skip
    took = time.monotonic() - started
    assert proc.returncode == 1, output(proc)
    assert "Rank 1 stopped answering: no heartbeat for" in proc.stderr and "launcher.heartbeat_s=4" in proc.stderr
    assert "(stopped rank 0 with it)" in proc.stderr
    assert took < 120, "bounded by the heartbeat, not by ddp.timeout_s"
    log = (run_dirs(workdir)[0] / "rank0.log").read_text()
    assert "test hook armed: ADAPTERS_TEST_FREEZE_AT_STEP=3" in log


def test_a_rank_stuck_where_the_heartbeat_still_beats_is_bounded_by_the_timeout(workdir):
    # The heartbeat off: the frozen rank is found by the others' collective timing out (ddp.timeout_s).
    proc = train(workdir, "framework.steps=100000", "framework.log_every=50", "launcher.heartbeat_s=0",
                 "ddp.timeout_s=5", env={"ADAPTERS_TEST_FREEZE_AT_STEP": "3"})  # fmt: skip
    assert proc.returncode == 1, output(proc)
    assert "gave up after waiting ddp.timeout_s" in proc.stderr
    assert "rank 1 had not reported" in proc.stderr, proc.stderr


def test_hooks_do_nothing_without_the_opt_in(monkeypatch, caplog):
    from adapters import testhooks

    monkeypatch.setattr(testhooks, "_said", set())
    monkeypatch.setenv("ADAPTERS_TEST_DIE_AT_STEP", "1")
    monkeypatch.delenv("ADAPTERS_TEST_HOOKS", raising=False)
    assert testhooks.armed("ADAPTERS_TEST_DIE_AT_STEP") is None
    assert "ADAPTERS_TEST_DIE_AT_STEP=1 is set but ignored" in caplog.text
    monkeypatch.setenv("ADAPTERS_TEST_HOOKS", "1")
    monkeypatch.setattr(testhooks, "_said", set())
    assert testhooks.armed("ADAPTERS_TEST_DIE_AT_STEP") == "1"
    assert "test hook armed: ADAPTERS_TEST_DIE_AT_STEP=1" in caplog.text


def test_a_rank_stopped_for_not_reporting_is_not_called_failed(workdir):
    # Rank 0 runs out of memory; rank 1, given no time to report (grace_s=0), is stopped, not blamed.
    proc = train(workdir, *SHORT, "launcher.grace_s=0", env={"ADAPTERS_TEST_OOM_ABOVE": "1",
                                                             "ADAPTERS_TEST_OOM_RANKS": "0"})  # fmt: skip
    assert proc.returncode == 1, output(proc)
    assert "The run stopped on rank 0: it ran out of memory" in proc.stderr
    assert "rank 1 had not reported 0 s after the first failure (launcher.grace_s) and was stopped" in proc.stderr
    assert "rank1.log" in proc.stderr and "ranks 0, 1" not in proc.stderr
