"""framework=fastnlp: fastNLP's real Trainer, 2 processes, gloo on CPU (fastNLP's "DDP initialised outside" mode)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from adapters.policy import Backend, DDPPolicy, UnusedParams

from adapter_contract import AdapterContract
from conftest import assert_same_training, output, requires, run_dirs, train

fastnlp = requires("fastnlp")


class TestFastNLPAdapter(AdapterContract):
    name = "fastnlp"

    def native(self, ddp_kwargs, backend):
        torch_kwargs = {"torch_kwargs": {"ddp_kwargs": ddp_kwargs}}
        if backend is Backend.nccl:
            return {"trainer_kwargs": {"driver": "torch", **torch_kwargs}}
        return {"outside_ddp_kwargs": ddp_kwargs, "trainer_kwargs": {"driver": "torch", "device": None, **torch_kwargs}}


def test_trainer_kwargs_for_your_own_script():
    from adapters.frameworks.fastnlp import trainer_kwargs

    assert trainer_kwargs(DDPPolicy(unused_params=UnusedParams.static, bucket_cap_mb=50)) == {
        "torch_kwargs": {"ddp_kwargs": {"static_graph": True, "bucket_cap_mb": 50}}
    }
    assert trainer_kwargs(DDPPolicy()) == {"torch_kwargs": {"ddp_kwargs": {}}}


def test_explain_prints_trainer_arguments_without_fastnlp():
    code = ("import sys; from adapters.cli import explain; print(explain(['framework=fastnlp', 'ddp=safe'])); "
            "print('fastNLP' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "torch_kwargs={'ddp_kwargs': {'find_unused_parameters': True}}" in out
    assert "device=None" in out
    assert out.strip().endswith("False")


@fastnlp
@pytest.mark.slow
def test_demo_trains_with_fastnlps_trainer(workdir):
    proc = train(workdir, "framework=fastnlp", "ddp=safe")
    assert proc.returncode == 0, output(proc)
    out = proc.stdout
    assert "Rank: 0 - Epoch:1/2, Batch:8" in out, "fastNLP's own progress"
    assert "Rank: 1 - Epoch" not in out, "from rank 0 only"
    [run_dir] = run_dirs(workdir)
    for rank in (0, 1):
        assert "DDP as built: find_unused_parameters=True" in (run_dir / f"rank{rank}.log").read_text()


@fastnlp
@pytest.mark.slow
def test_strict_names_the_auxiliary_head(workdir):
    proc = train(workdir, "framework=fastnlp", "framework.aux_loss=false", "ddp=strict")
    assert proc.returncode == 1, output(proc)
    assert "DDP stopped on ranks 0, 1: 2 parameters got no gradient" in proc.stderr
    assert "aux_head (ranks 0, 1): aux_head.weight, aux_head.bias" in proc.stderr
    assert "  ddp=auto  " in proc.stderr and "  ddp=safe  " in proc.stderr


@fastnlp
@pytest.mark.slow
@pytest.mark.parametrize("preset", ["safe", "static"])
def test_one_word_fixes_it(workdir, preset):
    proc = train(workdir, "framework=fastnlp", "framework.aux_loss=false", f"ddp={preset}", "framework.n_epochs=1")
    assert proc.returncode == 0, output(proc)
    assert "finished: epochs=1, batches=8" in proc.stdout


@pytest.mark.parametrize("override,words", [
    ("framework.aux_loss=maybe", "framework.aux_loss"),
    ("framework.n_epochs=two", "framework.n_epochs"),
    ("framework.progress_bar=fancy", "framework.progress_bar=fancy is not one of: raw, rich, tqdm, auto"),
])  # fmt: skip
@fastnlp
def test_bad_options_name_the_key(workdir, override, words):
    proc = train(workdir, "framework=fastnlp", override)
    assert proc.returncode == 2, output(proc)
    assert words in proc.stderr
    assert run_dirs(workdir) == []


@fastnlp
@pytest.mark.slow
def test_auto_leaves_out_the_switched_off_head_and_is_the_run_of_that_setting(workdir):
    model = ["framework=fastnlp", "framework.aux_loss=false", "framework.n_epochs=1"]
    auto, _ = assert_same_training(workdir, [*model, "ddp=auto"], [*model, "ddp=ignore", "ddp.ignore=[aux_head]"])
    assert "ddp=auto chose ignore: the same 2 parameters got no gradient" in auto
    assert "DDP leaves out aux_head: aux_head.weight, aux_head.bias" in auto


@fastnlp
@pytest.mark.slow
def test_memory_batch_size_reaches_the_dataloader(workdir):
    proc = train(workdir, "framework=fastnlp", "framework.n_epochs=1", "memory.batch_size=8")
    assert proc.returncode == 0, output(proc)
    assert "finished: epochs=1, batches=16" in proc.stdout  # 256 samples / 2 ranks / 8


@fastnlp
@pytest.mark.slow
def test_a_used_head_named_in_ignore_is_kept_in_sync(workdir):
    # fastNLP's Trainer runs its own loop and optimizer step; the guard acts inside backward, before it.
    proc = train(workdir, "framework=fastnlp", "framework.n_epochs=1", "ddp=ignore", "ddp.ignore=[head]")
    assert proc.returncode == 0, output(proc)  # and run() compared every rank's parameter digests
    assert "left out of DDP got a gradient in training step 1, on 2 of 2 ranks (they are named in ddp.ignore)" in (
        proc.stdout
    )
    assert "head: head.weight, head.bias" in proc.stdout


@fastnlp
@pytest.mark.slow
def test_a_users_own_fastnlp_script_takes_the_policy_from_a_team_preset(workdir):
    from conftest import REPO, run

    out = workdir / "out"
    out.mkdir()
    script = REPO / "tests" / "scripts" / "fastnlp_own_script.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(REPO / "tests" / "team"), str(out)]  # fmt: skip
    proc = run(cmd, workdir)  # and run() compares the digests every rank wrote
    assert proc.returncode == 0, output(proc)
    said = proc.stdout + proc.stderr
    assert "ddp=auto chose ignore: the same 2 parameters got no gradient in every observed step" in said
    assert "(observed: the first 3 training step(s)" in said
    assert "own script done: ddp_kwargs={'bucket_cap_mb': 50.0}, ignored=2" in proc.stdout
    assert "replicas equal at the end of the run" in said
    assert sorted(p.name for p in out.glob("replica_rank*.json")) == ["replica_rank0.json", "replica_rank1.json"]


@fastnlp
@pytest.mark.slow
def test_fastnlp_checkpoints_and_resumes_its_own_trainer(workdir):
    first = train(workdir, "framework=fastnlp", "ddp=safe", "framework.n_epochs=1", "framework.checkpoint_every=1")
    assert first.returncode == 0, output(first)
    [run_dir] = run_dirs(workdir)
    [last] = run_dir.glob("checkpoints/*/trainer-last")
    assert (last / "fastnlp_checkpoint.pkl.tar").is_file()
    resumed = train(workdir, "framework=fastnlp", "ddp=safe", "framework.n_epochs=2", f"framework.resume_from={last}")
    assert resumed.returncode == 0, output(resumed)
    assert "Rank: 0 - Epoch:1/2, Batch:8" in resumed.stdout, "fastNLP counts epochs from 0: the second one ran"
    assert "Epoch:0/2" not in resumed.stdout, "and only the second"
    assert "batches=16" in resumed.stdout, "fastNLP's batch counter went on from the checkpoint"


def test_resume_from_a_folder_without_a_checkpoint_is_refused(workdir):
    proc = train(workdir, "framework=fastnlp", f"framework.resume_from={workdir}")
    if "not installed" in proc.stderr:
        pytest.skip("fastNLP not installed: the install hint is tested in test_bad_input")
    assert proc.returncode == 2, output(proc)
    assert "no fastNLP trainer checkpoint there (fastnlp_checkpoint.pkl.tar missing)" in proc.stderr
    assert run_dirs(workdir) == []


@fastnlp
@pytest.mark.slow
def test_doctor_names_the_auxiliary_head(workdir):
    from conftest import ENV

    cmd = [sys.executable, "-m", "adapters", "doctor", "framework=fastnlp", "framework.aux_loss=false"]
    proc = subprocess.run(cmd, cwd=workdir, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, output(proc)
    assert "aux_head (ranks 0, 1): aux_head.weight, aux_head.bias" in proc.stdout
    assert "Recommended: ddp=ignore" in proc.stdout
