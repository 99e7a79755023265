"""framework=nnunet: nnU-Net v2's real trainer, planning and preprocessing, 2 processes, gloo on CPU."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adapters.policy import Backend

from adapter_contract import AdapterContract
from conftest import ENV, TRAIN, grandchildren, output, requires, run_dirs, train

nnunet = requires("nnunet")
SEG_LAYERS = [
    "decoder.seg_layers.0 (ranks 0, 1): decoder.seg_layers.0.weight, decoder.seg_layers.0.bias",
    "decoder.seg_layers.1 (ranks 0, 1): decoder.seg_layers.1.weight, decoder.seg_layers.1.bias",
    "decoder.seg_layers.2 (ranks 0, 1): decoder.seg_layers.2.weight, decoder.seg_layers.2.bias",
]


class TestNNUNetAdapter(AdapterContract):
    name = "nnunet"

    def native(self, ddp_kwargs, backend):
        device = "cuda:<rank>" if backend is Backend.nccl else "cpu"
        return {"trainer": "nnUNetTrainerDDPPolicy(nnUNetTrainer)", "ddp_kwargs": ddp_kwargs, "device": device}


def test_explain_shows_what_changes_in_the_trainer():
    code = ("import sys; from adapters.cli import explain; "
            "print(explain(['framework=nnunet', 'ddp=static', 'framework.deep_supervision=false', "
            "'framework.num_workers=2', 'framework.pin_memory=false'])); print('nnunetv2' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "DDP(self.network, device_ids=None, static_graph=True)  # inside nnUNetTrainer.initialize()" in out
    assert "enable_deep_supervision = False" in out
    assert "nnUNet_n_proc_DA = 2" in out and "pin_memory = False" in out
    assert out.strip().endswith("False"), "explain imports no nnU-Net"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The demo end to end, once: synthetic data planned and preprocessed by nnU-Net, trained with ddp=safe."""
    if importlib.util.find_spec("nnunetv2") is None and "nnunet" not in os.environ.get("ADAPTERS_REQUIRE", ""):
        pytest.skip("nnunetv2 not installed")
    workdir = tmp_path_factory.mktemp("nnunet-demo")
    proc = train(workdir, "framework=nnunet", "ddp=safe", "framework.deep_supervision=false", timeout=600)
    [run_dir] = run_dirs(workdir)
    return proc, run_dir


def own_data_env(run_dir: Path) -> dict:
    root = run_dir / "nnunet"
    return {var: str(root / var) for var in ("nnUNet_raw", "nnUNet_preprocessed")}


@nnunet
@pytest.mark.slow
def test_demo_plans_preprocesses_and_trains_with_safe(trained):
    proc, run_dir = trained
    assert proc.returncode == 0, output(proc)
    assert "Epoch 0" in proc.stdout and "train_loss" in proc.stdout
    assert "Training done." in proc.stdout
    pre = run_dir / "nnunet" / "nnUNet_preprocessed" / "Dataset001_Blobs"
    assert (pre / "nnUNetPlans.json").is_file() and (pre / "dataset_fingerprint.json").is_file()
    results = run_dir / "nnunet" / "nnUNet_results" / "Dataset001_Blobs"
    assert list(results.glob("nnUNetTrainerDDPPolicy__nnUNetPlans__2d/fold_0/checkpoint_final.pth"))
    for rank in (0, 1):
        assert "DDP as built: find_unused_parameters=True" in (run_dir / f"rank{rank}.log").read_text()


@nnunet
@pytest.mark.slow
def test_strict_names_the_decoder_seg_layers(trained, workdir):
    env = own_data_env(trained[1])
    proc = train(workdir, "framework=nnunet", "framework.dataset=Dataset001_Blobs", "ddp=strict",
                 "framework.deep_supervision=false", env=env)  # fmt: skip
    assert proc.returncode == 1, output(proc)
    assert "DDP stopped on ranks 0, 1: 6 parameters got no gradient" in proc.stderr
    for line in SEG_LAYERS:
        assert line in proc.stderr
    assert "ddp=static" in proc.stderr and "ddp=safe" in proc.stderr


@nnunet
@pytest.mark.slow
def test_static_trains_on_your_own_preprocessed_dataset_by_id(trained, workdir):
    env = own_data_env(trained[1])
    proc = train(workdir, "framework=nnunet", "framework.dataset=1", "ddp=static", "framework.deep_supervision=false",
                 env=env)  # fmt: skip
    assert proc.returncode == 0, output(proc)
    [run_dir] = run_dirs(workdir)
    assert "DDP as built: find_unused_parameters=False, static_graph=True" in (run_dir / "rank0.log").read_text()
    assert not (run_dir / "nnunet" / "nnUNet_preprocessed").exists(), "their dataset was used"


@nnunet
@pytest.mark.slow
def test_dead_augmentation_workers_are_explained(trained, workdir):
    # A real death: the test SIGKILLs the ranks' data-augmentation processes, as the OOM killer would.
    env = {**ENV, **own_data_env(trained[1])}
    cmd = [sys.executable, str(TRAIN), "framework=nnunet", "framework.dataset=Dataset001_Blobs", "ddp=safe",
           "framework.num_workers=1", "framework.iterations_per_epoch=500"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed, deadline = [], time.monotonic() + 240
    while not killed and time.monotonic() < deadline and proc.poll() is None:
        workers = grandchildren(proc.pid)
        if len(workers) >= 2:  # the augmenters have started
            time.sleep(1)
            for pid in grandchildren(proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    pass
        time.sleep(0.2)
    stdout, stderr = proc.communicate(timeout=240)
    assert killed, "no augmentation worker was found to kill"
    assert proc.returncode == 1, stdout + stderr
    assert "its background data-loading workers died" in stderr
    assert "framework.batch_size" in stderr and "framework.num_workers" in stderr and "pin_memory" in stderr
    assert "out-of-memory killer" in stderr
    assert "background workers are no longer alive" in stderr, "nnU-Net's own text stays underneath"


@nnunet
@pytest.mark.parametrize("overrides,words", [
    (["framework.dataset=Dataset042_Nope"], ["framework.dataset=Dataset042_Nope: no such preprocessed dataset",
                                             "Dataset001_Blobs", "nnUNetv2_plan_and_preprocess"]),
    (["framework.dataset=Dataset001_Blobs", "framework.configuration=3d_fullres"],
     ["framework.configuration=3d_fullres", "They have: 2d"]),
])  # fmt: skip
def test_bad_dataset_or_configuration_is_refused(trained, workdir, overrides, words):
    proc = train(workdir, "framework=nnunet", *overrides, env=own_data_env(trained[1]))
    assert proc.returncode == 2, output(proc)
    for w in words:
        assert w in proc.stderr
    assert run_dirs(workdir) == []


def test_dataset_without_nnunet_folders_says_where_to_look(workdir):
    env = {k: v for k, v in ENV.items() if not k.startswith("nnUNet_")}
    proc = subprocess.run([sys.executable, str(TRAIN), "framework=nnunet", "framework.dataset=Dataset001_X"],
                          cwd=workdir, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    if "nnunetv2" in proc.stderr and "not installed" in proc.stderr:
        pytest.skip("nnunetv2 not installed: the install hint is tested in test_bad_input")
    assert proc.returncode == 2
    assert "nnUNet_preprocessed is not set" in proc.stderr


@nnunet
@pytest.mark.slow
def test_doctor_names_the_decoder_seg_layers(trained, workdir):
    proc = subprocess.run(
        [sys.executable, "-m", "adapters", "doctor", "framework=nnunet", "framework.dataset=Dataset001_Blobs",
         "framework.deep_supervision=false"],
        cwd=workdir, env={**ENV, **own_data_env(trained[1])}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Unused in every step on every rank (6; while unused their gradients stay None" in proc.stdout
    for line in SEG_LAYERS:
        assert line in proc.stdout
    assert "Recommended: ddp=ignore" in proc.stdout


@nnunet
@pytest.mark.slow
def test_auto_leaves_out_the_seg_layers_and_trains(trained, workdir):
    proc = train(workdir, "framework=nnunet", "framework.dataset=1", "framework.deep_supervision=false", "ddp=auto",
                 env=own_data_env(trained[1]))  # fmt: skip
    assert proc.returncode == 0, output(proc)
    assert "ddp=auto chose ignore: the same 6 parameters got no gradient" in proc.stdout
    [run_dir] = run_dirs(workdir)
    assert "ignored=6" in (run_dir / "rank1.log").read_text()


@nnunet
@pytest.mark.slow
def test_memory_batch_size_becomes_the_plan_s_global_batch(trained, workdir):
    plans = trained[1] / "nnunet" / "nnUNet_preprocessed" / "Dataset001_Blobs" / "nnUNetPlans.json"
    planned = json.loads(plans.read_text())["configurations"]["2d"]["batch_size"]
    per_process = 3 if planned != 6 else 2  # a global batch the plan does not have
    proc = train(workdir, "framework=nnunet", "framework.dataset=1", f"memory.batch_size={per_process}",
                 "memory.num_workers=0", env=own_data_env(trained[1]))  # fmt: skip
    assert proc.returncode == 0, output(proc)
    [run_dir] = run_dirs(workdir)
    # nnU-Net's trainer writes its own attributes (rank 0's) to debug.json: batch_size is its batch per process.
    [debug] = run_dir.glob("nnunet/nnUNet_results/Dataset001_Blobs/*/fold_0/debug.json")
    assert json.loads(debug.read_text())["batch_size"] == str(per_process), debug.read_text()[:2000]


@nnunet
@pytest.mark.slow
def test_a_used_seg_layer_named_in_ignore_is_kept_in_sync(trained, workdir):
    # All seg layers named, with deep supervision off: the coarser three are unused, the last one is the output.
    proc = train(workdir, "framework=nnunet", "framework.dataset=1", "framework.deep_supervision=false", "ddp=ignore",
                 "ddp.ignore=[decoder.seg_layers]", env=own_data_env(trained[1]))  # fmt: skip
    assert proc.returncode == 0, output(proc)  # and run() compared every rank's parameter digests
    [run_dir] = run_dirs(workdir)
    assert "ignored=8" in (run_dir / "rank1.log").read_text()
    assert "left out of DDP got a gradient in training step 1, on 2 of 2 ranks (they are named in ddp.ignore)" in (
        proc.stdout
    )
    assert "decoder.seg_layers.3: decoder.seg_layers.3.weight, decoder.seg_layers.3.bias" in proc.stdout
