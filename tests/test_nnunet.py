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
from conftest import ENV, TEAM_PRESET, TRAIN, assert_same_training, grandchildren, output, requires, run_dirs, train

nnunet = requires("nnunet")
SHORT = ["framework.epochs=1", "framework.iterations_per_epoch=3", "framework.val_iterations_per_epoch=1"]
TRAINERS = Path(__file__).parent / "nnunet_trainers"  # a team's own trainer class, as nnU-Net finds it
SEG_LAYERS = [
    "decoder.seg_layers.0 (ranks 0, 1): decoder.seg_layers.0.weight, decoder.seg_layers.0.bias",
    "decoder.seg_layers.1 (ranks 0, 1): decoder.seg_layers.1.weight, decoder.seg_layers.1.bias",
    "decoder.seg_layers.2 (ranks 0, 1): decoder.seg_layers.2.weight, decoder.seg_layers.2.bias",
]


class TestNNUNetAdapter(AdapterContract):
    name = "nnunet"

    def native(self, ddp_kwargs, backend):
        device = "cuda:<rank>" if backend is Backend.nccl else "cpu"
        return {
            "trainer": "framework.trainer, ddp_kwargs added to its DDP(...) call",
            "ddp_kwargs": ddp_kwargs,
            "device": device,
        }


def test_explain_shows_what_changes_in_the_trainer():
    code = ("import sys; from adapters.cli import explain; "
            "print(explain(['framework=nnunet', 'ddp=static', 'framework.deep_supervision=false', "
            "'framework.num_workers=2', 'framework.pin_memory=false'])); print('nnunetv2' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "DDP(self.network, device_ids=None, static_graph=True)  # inside nnUNetTrainer.initialize()" in out
    assert "enable_deep_supervision = False" in out and "trainer: nnUNetTrainer," in out
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
    assert list(results.glob("nnUNetTrainer__nnUNetPlans__2d/fold_0/checkpoint_final.pth")), "nnU-Net's own name"
    for rank in (0, 1):
        assert "DDP as built: find_unused_parameters=True" in (run_dir / f"rank{rank}.log").read_text()


@nnunet
@pytest.mark.slow
def test_strict_names_the_decoder_seg_layers(trained, workdir):
    env = own_data_env(trained[1])
    proc = train(workdir, "framework=nnunet", "framework.dataset=Dataset001_Blobs", "ddp=strict",
                 "framework.deep_supervision=false", *SHORT, env=env)  # fmt: skip
    assert proc.returncode == 1, output(proc)
    assert "DDP stopped on ranks 0, 1: 6 parameters got no gradient" in proc.stderr
    for line in SEG_LAYERS:
        assert line in proc.stderr
    assert "  ddp=auto  " in proc.stderr and "  ddp=safe  " in proc.stderr


@nnunet
@pytest.mark.slow
def test_static_trains_a_team_s_own_trainer_on_your_dataset_by_id(trained, workdir):
    # The team's trainer turns deep supervision off and sets its own short schedule in __init__: both kept.
    env = {**own_data_env(trained[1]), "PYTHONPATH": f"{TRAINERS}:{ENV['PYTHONPATH']}"}
    proc = train(workdir, "framework=nnunet", "framework.dataset=1", "ddp=static",
                 "framework.trainer=my_trainers.nnUNetTrainerTeamShort", env=env)  # fmt: skip
    assert proc.returncode == 0, output(proc)
    [run_dir] = run_dirs(workdir)
    assert "DDP as built: find_unused_parameters=False, static_graph=True" in (run_dir / "rank0.log").read_text()
    assert not (run_dir / "nnunet" / "nnUNet_preprocessed").exists(), "their dataset was used"
    [folder] = run_dir.glob("nnunet/nnUNet_results/Dataset001_Blobs/nnUNetTrainerTeamShort__nnUNetPlans__2d/fold_0")
    debug = json.loads((folder / "debug.json").read_text())  # the trainer's own attributes, as nnU-Net writes them
    assert (debug["num_iterations_per_epoch"], debug["enable_deep_supervision"]) == ("2", "False")
    import torch

    assert torch.load(folder / "checkpoint_final.pth", weights_only=False)["trainer_name"] == "nnUNetTrainerTeamShort"
    # nnU-Net's own predictor finds the team's trainer by that name (nnUNet_extTrainer) and predicts a case.
    predicted = predict_cli(run_dir / "nnunet" / "nnUNet_results", first_image(trained[1]), workdir,
                            "nnUNetTrainerTeamShort", {"nnUNet_extTrainer": str(TRAINERS)})  # fmt: skip
    assert predicted.returncode == 0, predicted.stdout[-3000:] + predicted.stderr[-3000:]
    assert (workdir / "predicted" / "blob_000.png").is_file()


def predict_cli(results: Path, image: Path, workdir: Path, trainer: str, env: dict) -> subprocess.CompletedProcess:
    """nnU-Net's own command line, nnUNetv2_predict, on one image, from a results folder (nnUNet_results)."""
    inputs = workdir / "to_predict"
    inputs.mkdir(exist_ok=True)
    (inputs / image.name).write_bytes(image.read_bytes())
    cmd = [str(Path(sys.executable).parent / "nnUNetv2_predict"), "-i", str(inputs), "-o", str(workdir / "predicted"),
           "-d", "1", "-c", "2d", "-f", "0", "-tr", trainer, "-device", "cpu", "--disable_tta", "-npp", "1",
           "-nps", "1", "--disable_progress_bar"]  # fmt: skip
    return subprocess.run(cmd, cwd=workdir, env={**ENV, "nnUNet_results": str(results), **env}, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def first_image(trained_run: Path) -> Path:
    return next((trained_run / "nnunet" / "nnUNet_raw").glob("*/imagesTr/blob_000_0000.png"))


@nnunet
@pytest.mark.slow
def test_dead_augmentation_workers_are_explained(trained, workdir):
    # A real death: the test SIGKILLs the ranks' data-augmentation processes, as the OOM killer would.
    env = {**ENV, **own_data_env(trained[1])}
    cmd = [sys.executable, str(TRAIN), "framework=nnunet", "framework.dataset=Dataset001_Blobs", "ddp=safe",
           "framework.num_workers=1", "framework.epochs=1", "framework.iterations_per_epoch=500"]  # fmt: skip
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
         "framework.deep_supervision=false", *SHORT],
        cwd=workdir, env={**ENV, **own_data_env(trained[1])}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Unused in every step on every rank (6; while unused their gradients stay None" in proc.stdout
    for line in SEG_LAYERS:
        assert line in proc.stdout
    assert "Recommended: ddp=ignore" in proc.stdout


@nnunet
@pytest.mark.slow
def test_auto_is_the_run_of_the_setting_it_chose(trained, workdir):
    # seeded, and augmenting in-process (nnU-Net's augmentation processes draw from streams of their own)
    model = ["framework=nnunet", "framework.dataset=1", "framework.deep_supervision=false", "framework.seed=0",
             "framework.num_workers=0", *SHORT]  # fmt: skip
    seg = "ddp.ignore=[decoder.seg_layers.0,decoder.seg_layers.1,decoder.seg_layers.2]"
    auto, _ = assert_same_training(workdir, [*model, "ddp=auto"], [*model, "ddp=ignore", seg],
                                   env=own_data_env(trained[1]))  # fmt: skip
    assert "ddp=auto chose ignore: the same 6 parameters got no gradient" in auto


@nnunet
@pytest.mark.slow
def test_auto_applies_to_an_nnunet_variant_whose_model_nnunet_then_predicts(trained, workdir):
    # nnU-Net's own variant without deep supervision: the first steps see the coarser seg layers unused.
    proc = train(workdir, "framework=nnunet", "framework.dataset=1", "framework.trainer=nnUNetTrainerNoDeepSupervision",
                 *TEAM_PRESET, "framework.epochs=1", "framework.iterations_per_epoch=4",  # 3 decide, 1 more applies it
                 "framework.val_iterations_per_epoch=1", env=own_data_env(trained[1]))  # fmt: skip
    assert proc.returncode == 0, output(proc)
    # The team's preset (ddp=auto, probe_steps=3, bucket_cap_mb=50), the same file every framework's tests run.
    assert "ddp=auto chose ignore: the same 6 parameters got no gradient in every observed step" in proc.stdout
    assert "(observed: the first 3 training step(s)" in proc.stdout
    [run_dir] = run_dirs(workdir)
    assert "bucket_cap_mb=50.0, gradient_as_bucket_view=False, ignored=6" in (run_dir / "rank1.log").read_text()
    results = run_dir / "nnunet" / "nnUNet_results" / "Dataset001_Blobs"
    folder = results / "nnUNetTrainerNoDeepSupervision__nnUNetPlans__2d"
    # nnU-Net's predictor, unchanged, from the training output folder: it finds the trainer by the checkpoint's name.
    code = (
        "import sys, torch, numpy as np; from PIL import Image; "
        "from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor; "
        "p = nnUNetPredictor(device=torch.device('cpu'), use_mirroring=False, perform_everything_on_device=False); "
        "p.initialize_from_trained_model_folder(sys.argv[1], use_folds=(0,), checkpoint_name='checkpoint_final.pth'); "
        "p.predict_from_files_sequential([[sys.argv[2]]], [sys.argv[3]]); "
        "print(p.trainer_name, np.asarray(Image.open(sys.argv[3] + '.png')).shape)"
    )  # fmt: skip
    args = [sys.executable, "-c", code, str(folder), str(first_image(trained[1])), str(workdir / "case")]
    predicted = subprocess.run(args, cwd=workdir, env={**ENV, "nnUNet_results": str(results.parent)},
                               capture_output=True, text=True, timeout=300)  # fmt: skip
    assert predicted.returncode == 0, predicted.stdout[-3000:] + predicted.stderr[-3000:]
    assert predicted.stdout.strip().splitlines()[-1] == "nnUNetTrainerNoDeepSupervision (64, 64)"


@nnunet
@pytest.mark.slow
def test_continue_training_resumes_nnunet_s_own_checkpoint_and_a_new_run_never_overwrites_it(trained, workdir):
    results = workdir / "results"  # nnU-Net's results folder, kept across runs as a user's is
    env = {**own_data_env(trained[1]), "nnUNet_results": str(results)}
    first = train(workdir, "framework=nnunet", "framework.dataset=1", "ddp=safe", *SHORT, env=env)
    assert first.returncode == 0, output(first)
    again = train(workdir, "framework=nnunet", "framework.dataset=1", "ddp=safe", *SHORT, env=env)
    assert again.returncode == 2, output(again)
    assert "already holds a training (checkpoint_final.pth, checkpoint_best.pth)" in again.stderr
    assert "framework.continue_training=true" in again.stderr
    more = train(workdir, "framework=nnunet", "framework.dataset=1", "ddp=safe", "framework.continue_training=true",
                 "framework.epochs=2", "framework.iterations_per_epoch=3", "framework.val_iterations_per_epoch=1",
                 env=env)  # fmt: skip
    assert more.returncode == 0, output(more)
    assert "continuing from epoch 1 (framework.continue_training)" in more.stdout
    import torch

    final = results / "Dataset001_Blobs" / "nnUNetTrainer__nnUNetPlans__2d" / "fold_0" / "checkpoint_final.pth"
    assert torch.load(final, weights_only=False)["current_epoch"] == 2


@pytest.mark.parametrize("overrides,words", [
    (["framework.trainer=nnUNetTrainerNope"], ["framework.trainer=nnUNetTrainerNope: no such trainer class",
                                               "nnUNet_extTrainer"]),
    (["framework.continue_training=true"], ["the synthetic dataset is written into each new run folder"]),
])  # fmt: skip
def test_a_missing_trainer_or_nothing_to_continue_is_refused(workdir, overrides, words):
    proc = train(workdir, "framework=nnunet", *overrides)
    if "nnunetv2" in proc.stderr and "not installed" in proc.stderr:
        pytest.skip("nnunetv2 not installed: the install hint is tested in test_bad_input")
    assert proc.returncode == 2, output(proc)
    for w in words:
        assert w in proc.stderr
    assert run_dirs(workdir) == []


@nnunet
@pytest.mark.slow
def test_memory_batch_size_becomes_the_plan_s_global_batch(trained, workdir):
    plans = trained[1] / "nnunet" / "nnUNet_preprocessed" / "Dataset001_Blobs" / "nnUNetPlans.json"
    planned = json.loads(plans.read_text())["configurations"]["2d"]["batch_size"]
    per_process = 3 if planned != 6 else 2  # a global batch the plan does not have
    proc = train(workdir, "framework=nnunet", "framework.dataset=1", f"memory.batch_size={per_process}",
                 "memory.num_workers=0", *SHORT, env=own_data_env(trained[1]))  # fmt: skip
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
                 "ddp.ignore=[decoder.seg_layers]", *SHORT, env=own_data_env(trained[1]))  # fmt: skip
    assert proc.returncode == 0, output(proc)  # and run() compared every rank's parameter digests
    [run_dir] = run_dirs(workdir)
    assert "ignored=8" in (run_dir / "rank1.log").read_text()
    assert "left out of DDP got a gradient in training step 1, on 2 of 2 ranks (they are named in ddp.ignore)" in (
        proc.stdout
    )
    assert "decoder.seg_layers.3: decoder.seg_layers.3.weight, decoder.seg_layers.3.bias" in proc.stdout


@nnunet
def test_from_your_own_script_any_trainer_gets_the_policy_under_its_own_name():
    from nnunetv2.training.nnUNetTrainer.variants.network_architecture.nnUNetTrainerNoDeepSupervision import (
        nnUNetTrainerNoDeepSupervision,
    )

    from adapters.api import Policy

    trainer = Policy(["ddp=static"], framework="nnunet", backend="gloo").nnunet_trainer(nnUNetTrainerNoDeepSupervision)
    assert trainer.__name__ == "nnUNetTrainerNoDeepSupervision", "the name nnU-Net's predictor looks up"
    assert issubclass(trainer, nnUNetTrainerNoDeepSupervision) and trainer.ddp_kwargs == {"static_graph": True}


@nnunet
@pytest.mark.slow
def test_nnunets_own_train_command_takes_the_policy_from_the_environment(trained, workdir):
    # nnUNetv2_train finds the trainer through nnUNet_extTrainer and the policy through ADAPTERS_NNUNET. On CPU it
    # trains one process (its multi-process mode is NCCL only); the DDP call itself is the one train.py runs.
    folder_of_trainers = subprocess.run([sys.executable, "-m", "adapters", "nnunet-trainers"], capture_output=True,
                                        text=True, check=True).stdout.strip()  # fmt: skip
    results = workdir / "results"
    env = {**ENV, **own_data_env(trained[1]), "nnUNet_results": str(results), "nnUNet_extTrainer": folder_of_trainers,
           "nnUNet_n_proc_DA": "0", "ADAPTERS_NNUNET": "ddp=static framework.epochs=1 framework.iterations_per_epoch=2 "
           "framework.val_iterations_per_epoch=1"}  # fmt: skip
    cmd = [str(Path(sys.executable).parent / "nnUNetv2_train"), "1", "2d", "0", "-tr", "nnUNetTrainerPolicy",
           "-device", "cpu"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    folder = results / "Dataset001_Blobs" / "nnUNetTrainer__nnUNetPlans__2d" / "fold_0"  # the base trainer's name
    debug = json.loads((folder / "debug.json").read_text())
    assert (debug["ddp_kwargs"], debug["num_iterations_per_epoch"]) == ("{'static_graph': True}", "2")
    import torch

    assert torch.load(folder / "checkpoint_final.pth", weights_only=False)["trainer_name"] == "nnUNetTrainer"


@nnunet
@pytest.mark.slow
def test_the_shipped_no_deep_supervision_preset_trains(trained, workdir):
    proc = train(workdir, "preset=nnunet-no-deep-supervision", "framework.dataset=1", *SHORT,
                 env=own_data_env(trained[1]))  # fmt: skip
    assert proc.returncode == 0, output(proc)
    [run_dir] = run_dirs(workdir)
    assert "ignored=6" in (run_dir / "rank1.log").read_text(), "ddp=ignore's first steps left the 6 seg layers out"
