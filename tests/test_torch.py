"""framework=torch end to end: real DDP, several processes, gloo on CPU."""

from __future__ import annotations

import re
import sys

import pytest

from adapters.native import buffer_sync_kwarg

from adapter_contract import AdapterContract
from conftest import TRAIN, output, run, run_dirs, train

STRICT_FAILS = ["framework.deep_supervision=false", "ddp=strict"]


def rank_logs(run_dir):
    return {p.name: p.read_text() for p in sorted(run_dir.glob("rank*.log"))}


@pytest.mark.slow
def test_demo_trains_with_no_overrides(workdir):
    proc = train(workdir)
    assert proc.returncode == 0, output(proc)
    progress = re.findall(r"\[rank (\d)\].*step (\d+)/40 \| loss ([\d.]+) \| [\d.]+ steps/s", proc.stdout)
    assert [int(step) for _, step, _ in progress] == [10, 20, 30, 40]
    assert {rank for rank, _, _ in progress} == {"0"}, "progress comes from rank 0 only"
    losses = [float(loss) for _, _, loss in progress]
    assert losses[-1] < losses[0], "the demo learns"
    [run_dir] = run_dirs(workdir)  # one folder for the run
    assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / "model.pt").is_file()
    assert set(rank_logs(run_dir)) == {"rank0.log", "rank1.log"}


@pytest.mark.slow
def test_strict_names_the_unused_parameters_and_the_fix(workdir):
    proc = train(workdir, *STRICT_FAILS)
    assert proc.returncode == 1, output(proc)
    err = proc.stderr
    assert "DDP stopped on ranks 0, 1: 4 parameters got no gradient" in err
    assert "heads.0 (ranks 0, 1): heads.0.weight, heads.0.bias" in err
    assert "heads.1 (ranks 0, 1): heads.1.weight, heads.1.bias" in err
    assert "heads.2" not in err.split("torch's original error")[0]
    assert "  ddp=auto  " in err and "  ddp=safe  " in err
    assert "torch's original error" in err and "Expected to have finished reduction" in err
    assert "Parameter indices which did not receive grad for rank 0: 20 21 22 23" in err


@pytest.mark.parametrize("preset,applied", [("safe", "find_unused_parameters=True"), ("static", "static_graph=True")])
@pytest.mark.slow
def test_one_word_fixes_it(workdir, preset, applied):
    proc = train(workdir, "framework.deep_supervision=false", f"ddp={preset}", "framework.steps=20")
    assert proc.returncode == 0, output(proc)
    assert "step 20/20" in proc.stdout
    [run_dir] = run_dirs(workdir)
    found = "True" if preset == "safe" else "False"
    for name, text in rank_logs(run_dir).items():
        assert f"DDP as built: find_unused_parameters={found}" in text, name
        assert applied in text, name


@pytest.mark.slow
def test_debug_preset_sets_the_debug_level_in_every_rank(workdir):
    proc = train(workdir, "framework.deep_supervision=false", "ddp=debug", "framework.steps=10")
    assert proc.returncode == 0, output(proc)
    assert "gloo runs use INFO" in proc.stdout
    [run_dir] = run_dirs(workdir)
    for text in rank_logs(run_dir).values():
        assert "TORCH_DISTRIBUTED_DEBUG=INFO (torch.distributed reads: INFO)" in text


@pytest.mark.slow
def test_debug_info_is_in_effect_before_the_process_group(workdir):
    # torch only adds parameter names to its own text when the level was read before DDP was built.
    proc = train(workdir, *STRICT_FAILS, "ddp.debug=info")
    assert proc.returncode == 1, output(proc)
    [run_dir] = run_dirs(workdir)
    for rank, text in enumerate(rank_logs(run_dir).values()):
        assert f"Parameters which did not receive grad for rank {rank}: heads.1.bias, heads.1.weight" in text


@pytest.mark.slow
def test_overrides_reach_ddp_in_every_rank(workdir):
    proc = train(workdir, "ddp.unused_params=find", "ddp.broadcast_buffers=false", "ddp.bucket_cap_mb=50",
                 "launcher.nproc=4", "framework.steps=4", "framework.batch_size=4",
                 "framework.log_every=2")  # fmt: skip
    assert proc.returncode == 0, output(proc)
    assert "step 4/4" in proc.stdout
    assert "is deprecated" not in output(proc), "torch's FutureWarning for a deprecated DDP argument"
    [run_dir] = run_dirs(workdir)
    logs = rank_logs(run_dir)
    assert len(logs) == 4
    for text in logs.values():
        assert (f"DDP as built: find_unused_parameters=True, static_graph=False, {buffer_sync_kwarg()}=False, "
                "bucket_cap_mb=50.0") in text  # fmt: skip


@pytest.mark.slow
def test_torchrun_runs_the_same_app_with_one_run_folder(workdir):
    # python -m torch.distributed.run is the torchrun command, from the same environment as the tests.
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    proc = run([*torchrun, "--nproc_per_node=2", str(TRAIN), "ddp=safe", "framework.steps=10"], workdir)
    assert proc.returncode == 0, output(proc)
    assert "running under torchrun: 2 rank(s)" in proc.stdout
    assert proc.stdout.count("step 10/10") == 1
    [run_dir] = run_dirs(workdir)
    assert (run_dir / ".hydra").is_dir() and set(rank_logs(run_dir)) == {"rank0.log", "rank1.log"}


@pytest.mark.slow
def test_torchrun_strict_failure_is_explained(workdir):
    proc = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(TRAIN), *STRICT_FAILS],
               workdir)  # fmt: skip
    assert proc.returncode != 0
    assert "heads.0 (rank 0): heads.0.weight, heads.0.bias" in proc.stderr
    assert len(run_dirs(workdir)) == 1


class TestTorchAdapter(AdapterContract):
    name = "torch"

    def native(self, ddp_kwargs, backend):
        return {"ddp_kwargs": ddp_kwargs}
