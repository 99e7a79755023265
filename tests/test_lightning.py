"""framework=lightning: PyTorch Lightning's real Trainer, 2 processes, gloo on CPU, the policy in its DDPStrategy."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from adapters.policy import Backend

from adapter_contract import AdapterContract
from conftest import (
    ENV,
    REPO,
    TEAM_PRESET,
    TRAIN,
    alive,
    assert_every_fix_trains,
    assert_same_training,
    auto_choice,
    descendants,
    output,
    replica_digests,
    requires,
    run,
    run_dirs,
    train,
    wait_gone,
)

lightning = requires("lightning")
STRATEGY = "lightning.pytorch.strategies.DDPStrategy"
HEADS_OFF = "framework.deep_supervision=false"  # the demo's two coarser heads get no gradient


class TestLightningAdapter(AdapterContract):
    name = "lightning"

    def native(self, ddp_kwargs, backend):
        accelerator = "gpu" if backend is Backend.nccl else "cpu"
        init_args = {**ddp_kwargs, "process_group_backend": backend.name}
        return {"accelerator": accelerator, "strategy": {"class_path": STRATEGY, "init_args": init_args}}


def test_explain_prints_the_strategy_as_code_and_as_yaml_without_lightning():
    code = ("import sys; from adapters.cli import explain; print(explain(['framework=lightning', 'ddp=safe'])); "
            "print('lightning' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "strategy=DDPStrategy(find_unused_parameters=True, process_group_backend='gloo')" in out
    assert f"    class_path: {STRATEGY}\n    init_args:\n      find_unused_parameters: true" in out
    assert out.strip().endswith("False")


@lightning
@pytest.mark.slow
def test_demo_trains_with_lightnings_trainer(workdir):
    import torch

    proc = train(workdir, "framework=lightning", "ddp=safe")
    assert proc.returncode == 0, output(proc)
    assert proc.stdout.count("`Trainer.fit` stopped: `max_steps=20` reached.") == 1, "Lightning's own, rank 0 only"
    assert "Epoch 1: 100%" in proc.stdout, "Lightning's progress bar"
    [run_dir] = run_dirs(workdir)
    for rank in (0, 1):
        assert "DDP as built: find_unused_parameters=True" in (run_dir / f"rank{rank}.log").read_text()
    [ckpt] = (run_dir / "lightning_logs" / "version_0" / "checkpoints").glob("*.ckpt")
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert saved["global_step"] == 20 and "net.heads.0.weight" in saved["state_dict"]
    assert (run_dir / "lightning_logs" / "version_0" / "metrics.csv").read_text().startswith("epoch,loss,step")
    # After training: Lightning's own loading, and continuing the run from its checkpoint.
    from adapters.frameworks.lightning_parts import DemoSegmenter

    assert DemoSegmenter.load_from_checkpoint(ckpt, map_location="cpu").hparams.deep_supervision is True
    more = train(workdir, "framework=lightning", "ddp=safe", f'framework.ckpt_path="{ckpt}"', "framework.max_steps=24")
    assert more.returncode == 0, output(more)
    assert f"Restoring states from the checkpoint path at {ckpt}" in more.stdout
    assert "finished: steps=24" in more.stdout and "step 5/24" not in more.stdout, "it went on from step 20"


@lightning
@pytest.mark.slow
def test_strict_names_the_parameters_lightning_would_hide(workdir):
    proc = train(workdir, "framework=lightning", "ddp=strict", HEADS_OFF)
    assert proc.returncode == 1, output(proc)
    assert "DDP stopped on ranks 0, 1: 4 parameters got no gradient" in proc.stderr
    assert "net.heads.0 (ranks 0, 1): net.heads.0.weight, net.heads.0.bias" in proc.stderr
    assert "  ddp=auto  " in proc.stderr and "  ddp=safe  " in proc.stderr
    # DDP's own text, with its indices, is what the rank raised: Lightning's rewrite would have dropped them.
    log = (run_dirs(workdir)[0] / "rank1.log").read_text()
    assert "Parameter indices which did not receive grad for rank 1: 20 21 22 23" in log
    named = "Parameters that got no gradient on rank 1, by module:\n  net.heads.0: net.heads.0.weight, net.heads.0.bias"
    assert named in log
    assert "It looks like your LightningModule has parameters" not in log


@lightning
@pytest.mark.slow
def test_auto_is_the_run_of_the_setting_it_chose_with_the_trainer_attached(workdir):
    # The module reads self.trainer in training_step and uses the coarser heads only in odd steps (global_step):
    # ddp=auto must see Lightning's real step, attached to its Trainer, and choose find.
    model = [
        "framework=lightning",
        "framework.model._target_=my_pkg.lightning_models.StepAware",
        "framework.max_steps=8",
    ]
    auto = train(workdir / "auto", *model)
    assert auto.returncode == 0, output(auto)
    assert "ddp=auto chose find: the parameters without a gradient changed between steps" in auto.stdout
    assert auto_choice(auto.stdout) == ["ddp=safe"]
    assert_same_training(workdir, [*model, "ddp=auto"], [*model, "ddp=safe"])


GAN = ["framework=lightning", "framework.model._target_=my_pkg.lightning_models.ToggledGAN", "framework.data=null",
       "framework.max_steps=6"]  # fmt: skip


@lightning
@pytest.mark.slow
def test_a_gan_with_toggle_optimizer_is_named_exactly_and_every_fix_trains(workdir):
    proc = train(workdir / "strict", *GAN, "ddp=strict")
    assert proc.returncode == 1, output(proc)
    err = proc.stderr
    # The generator's backward leaves the discriminator without gradients (toggle_optimizer froze it): its
    # parameters, named as DDP's reducer held them when it was built, not as requires_grad is now.
    assert "discriminator.0 (ranks 0, 1): discriminator.0.weight, discriminator.0.bias" in err
    assert "generator" not in err.split("Parameters that got no gradient, by module:")[1].split("Fix it")[0]
    fixes = assert_every_fix_trains(workdir, proc, GAN, [])
    assert ["ddp=static"] not in fixes and not any("ddp.ignore" in " ".join(f) for f in fixes), fixes
    assert ["ddp=auto"] in fixes and ["ddp=safe"] in fixes


@lightning
@pytest.mark.slow
def test_a_backbone_unfrozen_by_lightnings_own_finetuning_callback_is_reduced_from_then_on(workdir):
    # BackboneFinetuning freezes the encoder before DDP wraps the module and unfreezes it at epoch 1 (step 17):
    # DDP's reducer would never reduce it, and the replicas would drift apart.
    proc = train(workdir, "framework=lightning", "framework.model._target_=my_pkg.lightning_models."
                 "FinetunedBackbone", "framework.max_steps=20", "ddp=strict")  # fmt: skip
    assert proc.returncode == 0, output(proc)  # and run() compared every rank's parameter digests
    assert "were frozen (requires_grad=False) when DDP built its reducer and are trainable now, at training step " \
           "17" in proc.stdout  # fmt: skip
    assert "  net.encoder.0.0: net.encoder.0.0.weight, net.encoder.0.0.bias" in proc.stdout
    [run_dir] = run_dirs(workdir)
    assert "replicas equal at the end of the run" in proc.stdout and replica_digests(run_dir)


@lightning
@pytest.mark.slow
def test_a_schedule_by_epochs_takes_effect(workdir):
    proc = train(workdir, "framework=lightning", "framework.max_steps=null", "+framework.trainer.max_epochs=2",
                 "+framework.data.size=64")  # fmt: skip
    assert proc.returncode == 0, output(proc)
    assert "finished: steps=4, epochs=2" in proc.stdout  # 64 samples / 2 ranks / 16 per step: 2 steps an epoch


@lightning
@pytest.mark.slow
@pytest.mark.parametrize("accumulate", [1, 2])
def test_static_graph_reaches_lightnings_ddp_with_and_without_gradient_accumulation(workdir, accumulate):
    # torch asserts (expect_autograd_hooks_) when a static graph's first iteration is a micro-step under no_sync
    proc = train(workdir, "framework=lightning", "ddp=static", HEADS_OFF, "framework.max_steps=6",
                 f"+framework.trainer.accumulate_grad_batches={accumulate}")  # fmt: skip
    assert proc.returncode == 0, output(proc)  # and run() compared every rank's parameter digests
    assert "DDP as built: find_unused_parameters=False, static_graph=True" in proc.stdout
    assert "INTERNAL ASSERT" not in output(proc) and "finished: steps=6" in proc.stdout


@lightning
@pytest.mark.slow
def test_the_team_preset_runs_auto_on_lightning(workdir):
    proc = train(workdir, "framework=lightning", *TEAM_PRESET, HEADS_OFF, "framework.max_steps=6")
    assert proc.returncode == 0, output(proc)
    assert "ddp=auto chose ignore: the same 4 parameters got no gradient in every observed step" in proc.stdout
    assert "(observed: the first 3 training step(s)" in proc.stdout
    assert "DDP as built: find_unused_parameters=False, static_graph=False" in proc.stdout
    assert "bucket_cap_mb=50.0, gradient_as_bucket_view=False, ignored=4" in proc.stdout
    assert "replicas equal at the end of the run" in proc.stdout


@lightning
@pytest.mark.slow
def test_a_users_own_module_with_its_own_dataloader(workdir):
    proc = train(workdir, "framework=lightning", "ddp=ignore", "framework.model._target_=my_pkg.lightning_models."
                 "PoolerClassifier", "framework.data=null", "framework.max_steps=6")  # fmt: skip
    assert proc.returncode == 0, output(proc)
    assert "DDP leaves out pooler: pooler.weight, pooler.bias" in proc.stdout
    assert "ignored=2" in proc.stdout
    assert "finished: steps=6, epochs=1" in proc.stdout


@lightning
@pytest.mark.slow
def test_a_users_own_lightning_script_takes_the_strategy_from_the_team_preset(workdir):
    out = workdir / "out"
    out.mkdir()
    script = REPO / "tests" / "scripts" / "lightning_own_script.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(REPO / "tests" / "team"), str(out)]  # fmt: skip
    proc = run(cmd, workdir)  # and run() compares the digests every rank wrote
    assert proc.returncode == 0, output(proc)
    said = proc.stdout + proc.stderr
    assert "ddp=auto chose ignore: the same 2 parameters got no gradient in every observed step" in said
    assert "(observed: the first 3 training step(s)" in said
    assert "own script done: ddp_kwargs={'bucket_cap_mb': 50.0}, ignored=['pooler.bias', 'pooler.weight']" in said
    assert "replicas equal at the end of the run" in said
    assert sorted(p.name for p in out.glob("replica_rank*.json")) == ["replica_rank0.json", "replica_rank1.json"]


@pytest.mark.parametrize("override,words", [
    ("+framework.trainer.strategy=ddp", "framework.trainer.strategy: the DDP policy (ddp=..., ddp.*) decides"),
    ("+framework.trainer.max_epoch=3", "lightning.Trainer takes no argument 'max_epoch'. Did you mean max_epochs?"),
    ("framework.model._target_=my_pkg.nowhere.Module", "framework.model._target_=my_pkg.nowhere.Module cannot be"),
    ("framework.ckpt_path=/nowhere/last.ckpt", "framework.ckpt_path=/nowhere/last.ckpt: no such file"),
    ("framework.max_steps=0", "framework.max_steps"),
    ("+framework.trainer.max_epochs=3", "framework.trainer.max_epochs=3 and framework.max_steps=20: Lightning stops at "
                                        "whichever limit comes first"),
    ("+framework.trainer.log_every_n_steps=3", "framework.trainer.log_every_n_steps: use framework.log_every"),
    ("framework.ckpt_path=/x/epoch=0-step=6.ckpt", "Fix: quote the value, as one shell word: "
                                                   "'framework.ckpt_path=\"/x/epoch=0-step=6.ckpt\"'"),
])  # fmt: skip
@lightning
def test_bad_options_name_the_key(workdir, override, words):
    proc = train(workdir, "framework=lightning", override)
    assert proc.returncode == 2, output(proc)
    assert words in proc.stderr
    assert "Traceback" not in output(proc)
    assert run_dirs(workdir) == []


@lightning
@pytest.mark.slow
def test_doctor_names_the_unused_heads(workdir):
    cmd = [sys.executable, "-m", "adapters", "doctor", "framework=lightning", HEADS_OFF]
    proc = subprocess.run(cmd, cwd=workdir, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, output(proc)
    assert "net.heads.1 (ranks 0, 1): net.heads.1.weight, net.heads.1.bias" in proc.stdout
    assert "Recommended: ddp=ignore" in proc.stdout


@lightning
@pytest.mark.slow
def test_a_hydra_sweep_runs_each_job_once(workdir):
    # Lightning's own `ddp` strategy re-launches the script per rank, and under -m every rank re-runs the whole
    # sweep (Hydra issue 2070). Here the ranks are ours: two jobs, two ranks each, the sweep launched once.
    proc = train(workdir, "-m", "framework=lightning", "ddp=safe,static", "framework.max_steps=2",
                 "+framework.trainer.enable_progress_bar=false")  # fmt: skip
    assert proc.returncode == 0, output(proc)
    assert output(proc).count("Launching 2 jobs locally") == 1
    jobs = sorted(p for p in workdir.glob("multirun/*/*/*") if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"]
    for job, built in zip(jobs, ("find_unused_parameters=True", "static_graph=True"), strict=True):
        assert sorted(p.name for p in job.glob("rank*.log")) == ["rank0.log", "rank1.log"]
        assert built in (job / "rank1.log").read_text()


@lightning
@pytest.mark.slow
def test_a_rank_killed_outright_stops_the_run_and_every_process(workdir):
    # Rank 1's process is killed at step 3 (no exception, no Lightning handler): rank 0, waiting in DDP's
    # all-reduce, must not hang, and nothing may be left running.
    started = time.monotonic()
    proc = train(workdir, "framework=lightning", "ddp=safe", "framework.max_steps=100",
                 "framework.model._target_=my_pkg.lightning_models.KilledOnOneRank")  # fmt: skip
    assert proc.returncode == 1, output(proc)
    assert "error: rank 1 failed: the process died with signal SIGKILL" in proc.stderr, proc.stderr
    # Rank 0's error inside Lightning's fit (gloo's lost connection) is told as what followed, not as a cause.
    assert "(rank 0 then lost the connection to it: a consequence, not a cause.)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert time.monotonic() - started < 120, "bounded, not ddp.timeout_s"
    log = (run_dirs(workdir)[0] / "rank0.log").read_text()
    assert "step 100/100" not in log, "rank 0 did not train on alone"


@lightning
@pytest.mark.slow
def test_sigterm_to_train_py_during_lightning_s_fit_leaves_no_process(workdir):
    # Lightning installs its own SIGTERM handler in each rank; the launcher's stop must still end them all.
    cmd = [sys.executable, str(TRAIN), "framework=lightning", "ddp=safe", "framework.max_steps=100000",
           "framework.log_every=1", "+framework.trainer.enable_progress_bar=false"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=workdir, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            logs = list(workdir.glob("outputs/*/*/rank0.log"))
            if logs and "step 2/100000" in logs[0].read_text():
                break
            time.sleep(0.3)
        assert proc.poll() is None, "".join(proc.communicate())
        below = descendants(proc.pid)
        assert len(below) >= 2, "the ranks run"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 128 + signal.SIGTERM, out + err
        assert not wait_gone(below), f"processes left after SIGTERM: {alive(below)}"
        assert "Traceback" not in err, err
        folder = run_dirs(workdir)[0].relative_to(workdir)
        assert [line for line in err.splitlines() if line.strip()][-1] == (
            f"interrupted (SIGTERM): ranks stopped, logs in {folder}"
        ), err
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
