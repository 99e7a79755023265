"""framework=accelerate: a loop written the Accelerate way, 2 processes, gloo on CPU, the policy in its DDP handler."""

from __future__ import annotations

import subprocess
import sys

import pytest

from adapter_contract import AdapterContract
from conftest import REPO, TEAM_PRESET, assert_same_training, output, requires, run, run_dirs, train

accelerate = requires("accelerate")
HEADS_OFF = "framework.deep_supervision=false"  # the demo's two coarser heads get no gradient


class TestAccelerateAdapter(AdapterContract):
    name = "accelerate"

    def native(self, ddp_kwargs, backend):
        return {"cpu": backend.name != "nccl", "kwargs_handlers": {"DistributedDataParallelKwargs": ddp_kwargs}}


def test_explain_prints_the_handler_without_accelerate():
    code = ("import sys; from adapters.cli import explain; print(explain(['framework=accelerate', 'ddp=static'])); "
            "print('accelerate' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "Accelerator(cpu=True, kwargs_handlers=[DistributedDataParallelKwargs(static_graph=True)])" in out
    assert out.strip().endswith("False")


@pytest.mark.parametrize("override,words", [
    ("+ddp.kwargs.init_sync=false", "ddp.kwargs.init_sync: framework=accelerate has no place for DDP's 'init_sync': "
                                    "DistributedDataParallelKwargs takes only dim, broadcast_buffers"),
    ("framework.steps=0", "framework.steps"),
    ("framework.model._target_=my_pkg.nowhere.Net", "framework.model._target_=my_pkg.nowhere.Net cannot be imported"),
])  # fmt: skip
def test_bad_options_name_the_key(workdir, override, words):
    proc = train(workdir, "framework=accelerate", override)
    if "not installed" in proc.stderr:
        pytest.skip("accelerate not installed: the install hint is tested in test_bad_input")
    assert proc.returncode == 2, output(proc)
    assert words in proc.stderr
    assert "Traceback" not in output(proc)
    assert run_dirs(workdir) == []


@accelerate
@pytest.mark.slow
def test_strict_names_the_heads(workdir):
    proc = train(workdir, "framework=accelerate", "ddp=strict", HEADS_OFF, "framework.steps=4")
    assert proc.returncode == 1, output(proc)
    assert "DDP stopped on ranks 0, 1: 4 parameters got no gradient" in proc.stderr
    assert "heads.0 (ranks 0, 1): heads.0.weight, heads.0.bias" in proc.stderr


@accelerate
@pytest.mark.slow
@pytest.mark.parametrize("overrides,built", [
    (["ddp=safe"], "find_unused_parameters=True, static_graph=False"),
    (["ddp=static", HEADS_OFF], "find_unused_parameters=False, static_graph=True"),
    (["ddp=ignore", "ddp.ignore=[heads.0,heads.1]", HEADS_OFF], "find_unused_parameters=False, static_graph=False"),
])  # fmt: skip
def test_each_preset_reaches_accelerates_ddp(workdir, overrides, built):
    proc = train(workdir, "framework=accelerate", *overrides, "framework.steps=6")
    assert proc.returncode == 0, output(proc)  # and run() compared every rank's parameter digests
    [run_dir] = run_dirs(workdir)
    for rank in (0, 1):
        assert f"DDP as built: {built}" in (run_dir / f"rank{rank}.log").read_text()
    assert "step 6/6" in proc.stdout and "replicas equal at the end of the run" in proc.stdout


@accelerate
@pytest.mark.slow
def test_auto_is_the_run_of_the_setting_it_chose_with_gradient_accumulation(workdir):
    model = ["framework=accelerate", HEADS_OFF, "framework.steps=6", "framework.gradient_accumulation_steps=2"]
    auto, _ = assert_same_training(
        workdir, [*model, "ddp=auto"], [*model, "ddp=ignore", "ddp.ignore=[heads.0,heads.1]"]
    )
    assert "ddp=auto chose ignore: the same 4 parameters got no gradient" in auto


@accelerate
@pytest.mark.slow
def test_static_graph_with_accelerates_gradient_accumulation_trains(workdir):
    proc = train(workdir, "framework=accelerate", "ddp=static", HEADS_OFF, "framework.steps=4",
                 "framework.gradient_accumulation_steps=2")  # fmt: skip
    assert proc.returncode == 0, output(proc)  # and run() compared every rank's parameter digests
    assert "INTERNAL ASSERT" not in output(proc) and "DDP as built: find_unused_parameters=False, static_graph=True" \
        in proc.stdout  # fmt: skip


@accelerate
@pytest.mark.slow
def test_the_team_preset_runs_auto_on_accelerate(workdir):
    proc = train(workdir, "framework=accelerate", *TEAM_PRESET, HEADS_OFF, "framework.steps=6")
    assert proc.returncode == 0, output(proc)
    assert "ddp=auto chose ignore: the same 4 parameters got no gradient in every observed step" in proc.stdout
    assert "(observed: the first 3 training step(s)" in proc.stdout
    assert "bucket_cap_mb=50.0, gradient_as_bucket_view=False, ignored=4" in proc.stdout


def _own_script(workdir, *extra):
    out = workdir / "out"
    out.mkdir(exist_ok=True)
    script = REPO / "tests" / "scripts" / "accelerate_own_script.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(REPO / "tests" / "team"), str(out), *extra]  # fmt: skip
    return run(cmd, workdir), out  # and run() compares the digests every rank wrote


@accelerate
@pytest.mark.slow
def test_a_users_own_accelerate_loop_with_tied_weights_takes_the_team_preset(workdir):
    proc, out = _own_script(workdir)
    assert proc.returncode == 0, output(proc)
    said = proc.stdout + proc.stderr
    assert "ddp=auto chose ignore: the same 2 parameters got no gradient in every observed step" in said
    assert "(observed: the first 3 training step(s)" in said
    assert ("own script done: kwargs={'bucket_cap_mb': 50.0}, ignored=['bert.pooler.dense.bias', "
            "'bert.pooler.dense.weight']") in said  # fmt: skip
    assert "replicas equal at the end of the run" in said
    assert sorted(p.name for p in out.glob("replica_rank*.json")) == ["replica_rank0.json", "replica_rank1.json"]


@accelerate
@pytest.mark.slow
def test_an_accelerator_that_set_up_no_ddp_is_refused(workdir):
    # torchrun, two processes, Accelerator() without cpu=True on a machine without a GPU: Accelerate's own
    # behaviour is two single-process trainings that exit 0.
    proc, _ = _own_script(workdir, "plain")
    assert proc.returncode != 0, output(proc)
    assert "Accelerate set itself up as DistributedType.NO with 1 process(es), not DDP over 2" in proc.stderr


@accelerate
@pytest.mark.slow
def test_data_smaller_than_a_step_stops_with_a_message_not_a_hang(workdir):
    # Accelerate shards whole batches across the ranks: with fewer than one per rank each gets none, and a loop
    # that draws batches until it has one would wait for ever.
    proc = train(workdir, "framework=accelerate", "+framework.data.size=8", "framework.batch_size=16", timeout=120)
    assert proc.returncode == 1, output(proc)
    assert "framework.data gives this rank no batch" in proc.stderr
