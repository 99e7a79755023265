"""Beyond one machine: two torchrun "nodes" on loopback, submitit (local, and the SLURM job it would submit),
restarts that resume from a checkpoint with equal final weights, and a failed rank named across machines."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adapters import launch

from conftest import ENV, TRAIN, assert_replicas_equal, output, run_dirs, train

pytestmark = pytest.mark.slow


def free_port() -> int:
    return launch.free_port("127.0.0.1")


def two_nodes(workdir: Path, *overrides: str, env: dict | None = None, timeout: float = 240):
    """Two torchrun agents on this machine, one worker each, meeting at one rendezvous endpoint."""
    common = ["launcher=torchrun", "launcher.nnodes=2", "launcher.nproc=1",
              f"launcher.rdzv_endpoint=127.0.0.1:{free_port()}", *overrides]  # fmt: skip
    procs = [
        subprocess.Popen([sys.executable, str(TRAIN), *common, f"launcher.node_rank={node}"], cwd=workdir,
                         env={**ENV, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for node in (0, 1)
    ]  # fmt: skip
    started = time.monotonic()
    outs = [p.communicate(timeout=timeout) for p in procs]
    return [p.returncode for p in procs], ["".join(o) for o in outs], time.monotonic() - started


# Two presets that build DDP differently (an ignore list chosen by the first steps, static_graph) through two agents;
# every preset trains on one machine in the other test files.
@pytest.mark.parametrize("preset", ["auto", "static"])
def test_two_nodes_through_the_rendezvous_train(workdir, preset):
    codes, outs, _ = two_nodes(workdir, f"ddp={preset}", "framework.steps=4", "framework.log_every=2")
    assert codes == [0, 0], "\n".join(outs)
    assert sum("step 4/4" in o for o in outs) == 1, "progress from global rank 0 only"
    [run_dir] = run_dirs(workdir)  # one folder for the run, on both "nodes"
    assert (run_dir / ".hydra").is_dir() and {p.name for p in run_dir.glob("rank*.log")} == {"rank0.log", "rank1.log"}
    assert_replicas_equal(run_dir)


def test_submitit_local_runs_each_task_as_a_rank(workdir):
    proc = subprocess.run(
        [sys.executable, str(TRAIN), "-m", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2",
         "hydra.launcher.timeout_min=5", "framework.steps=4", "framework.log_every=2", "ddp=auto"],
        cwd=workdir, env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, output(proc)
    [job] = [p for p in workdir.glob("multirun/*/*/0") if p.is_dir()]
    logs = {p.name: p.read_text() for p in job.glob("rank*.log")}
    assert set(logs) == {"rank0.log", "rank1.log"}
    assert "step 4/4" in logs["rank0.log"] and "rank 1/2 on cpu" in logs["rank1.log"]
    assert (job / "model.pt").is_file()
    assert_replicas_equal(job)


FAKE_SBATCH = """#!/bin/sh
# Records the job script submitit hands to sbatch, as a SLURM cluster would receive it.
cp "$(eval echo \\${$#})" "$SBATCH_RECORD"
echo "Submitted batch job 4242"
"""


def test_the_slurm_job_submitit_would_submit(workdir, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("sbatch", FAKE_SBATCH), ("srun", "#!/bin/sh\nexit 0\n")):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    record = tmp_path / "job.sh"
    env = {**ENV, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SBATCH_RECORD": str(record)}
    cmd = [sys.executable, str(TRAIN), "-m", "hydra/launcher=submitit_slurm", "hydra.launcher.nodes=2",
           "hydra.launcher.tasks_per_node=8", "hydra.launcher.gpus_per_task=1", "hydra.launcher.cpus_per_task=10",
           "hydra.launcher.timeout_min=600", "hydra.launcher.partition=gpu", "launcher.backend=nccl",
           "framework=mmdet", "ddp=auto"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not record.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.kill()  # nothing will ever run the job: it was only recorded
    out = proc.communicate()[0]
    assert record.exists(), out
    script = record.read_text()
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-task=1",
                 "#SBATCH --cpus-per-task=10", "#SBATCH --partition=gpu", "#SBATCH --time=600"):  # fmt: skip
        assert line in script, script
    # srun starts the 16 tasks; each unpickles the Hydra job and runs as one rank (adapters.cli).
    assert "srun" in script and "submitit.core._submit" in script


def test_a_killed_worker_is_restarted_and_the_run_ends_with_the_same_weights(tmp_path):
    common = ["launcher=torchrun", "framework.steps=30", "framework.checkpoint_every=5", "framework.log_every=10"]
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    clean.mkdir()
    killed.mkdir()
    proc = train(clean, *common, f"launcher.rdzv_endpoint=127.0.0.1:{free_port()}")
    assert proc.returncode == 0, output(proc)
    proc = train(killed, *common, "launcher.max_restarts=2", f"launcher.rdzv_endpoint=127.0.0.1:{free_port()}",
                 env={"ADAPTERS_TEST_DIE_AT_STEP": "17", "ADAPTERS_TEST_DIE_RANK": "1"})  # fmt: skip
    assert proc.returncode == 0, output(proc)
    assert "exitcode: -9" in proc.stderr, "rank 1 really died"
    assert "resuming from step 15" in proc.stdout
    [run_dir] = run_dirs(killed)  # the restarted workers found the same folder and its checkpoint
    assert not list((run_dir / "checkpoints").glob(".*tmp")), "no half-written checkpoint left"
    import torch

    a = torch.load(run_dirs(clean)[0] / "model.pt")
    b = torch.load(run_dir / "model.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "equal final weights"


def test_a_rank_that_fails_for_good_is_named_on_every_node(workdir):
    codes, outs, seconds = two_nodes(
        workdir, "framework.model._target_=my_pkg.TrickyNet", "framework.data._target_=my_pkg.Regression",
        "+framework.model.unused=none", "+framework.model.fail_on_rank=1", "+framework.model.fail_how=raise",
        "+framework.model.fail_at_step=3", "ddp.timeout_s=30",
    )  # fmt: skip
    assert codes[0] != 0 and codes[1] != 0
    assert seconds < 30 + 30, "every rank exits within ddp.timeout_s (plus start-up)"
    for out in outs:
        assert "rank 1 failed: ValueError: boom on rank 1" in out
    assert any("(rank 0 then lost the connection to it: a consequence, not a cause.)" in o for o in outs)
