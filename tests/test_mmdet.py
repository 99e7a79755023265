"""framework=mmdet: real MMDetection detectors under mmengine's Runner, 2 processes, gloo on CPU."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from adapters.native import buffer_sync_kwarg
from adapters.policy import Backend

from adapter_contract import AdapterContract
from conftest import TEAM_PRESET, assert_same_training, output, requires, run_dirs, train

mmdet = requires("mmdet")
# A config that ships with mmdet and really has parameters outside the loss: MobileNetV2's last 1x1 conv
# (backbone.conv2) is built but out_indices=(2, 4, 6) never uses its output. The config papers over it
# with a top-level find_unused_parameters = True.
YOLO = "mmdet::yolo/yolov3_mobilenetv2_8xb24-ms-416-300e_coco.py"
SMALL = ["framework=mmdet", "framework.max_iters=2", "framework.num_images=8", "framework.image_size=96"]


class TestMMDetAdapter(AdapterContract):
    name = "mmdet"

    def native(self, ddp_kwargs, backend):
        wrapper = {"type": "MMDistributedDataParallel", buffer_sync_kwarg(): False, **ddp_kwargs}
        if backend is not Backend.nccl:
            wrapper["device_ids"] = None
        return {"model_wrapper_cfg": wrapper, "env_cfg.dist_cfg.backend": backend.name, "launcher": "pytorch"}


def test_explain_prints_the_config_fragment():
    from adapters.cli import explain

    text = explain(["framework=mmdet", "ddp=safe"])
    assert ("model_wrapper_cfg = dict(type='MMDistributedDataParallel', find_unused_parameters=True, "
            f"{buffer_sync_kwarg()}=False, device_ids=None)") in text  # fmt: skip


@mmdet
@pytest.mark.slow
@pytest.mark.parametrize("preset,found", [("safe", "True"), ("strict", "False")])
def test_retinanet_demo_trains(workdir, preset, found):
    proc = train(workdir, "framework=mmdet", f"ddp={preset}", timeout=400)
    assert proc.returncode == 0, output(proc)
    assert len(re.findall(r"Iter\(train\) \[4/4\]", proc.stdout)) == 1, "mmengine's progress, from rank 0 only"
    [run_dir] = run_dirs(workdir)
    for rank in (0, 1):
        log = (run_dir / f"rank{rank}.log").read_text()
        assert f"'find_unused_parameters': {found}" in log or preset == "strict"
        assert f"runner.model: MMDistributedDataParallel, find_unused_parameters={found}" in log
    assert (run_dir / "data" / "annotations.json").is_file() and (run_dir / "work_dir").is_dir()


@mmdet
@pytest.mark.slow
def test_auto_is_the_run_of_the_setting_it_chose_with_mixed_aspect_ratios_and_validation(workdir):
    # mmdet's AspectRatioBatchSampler keeps its buckets on the sampler: anything that iterated the run's loader
    # beside the run would leave a batch behind, and with one portrait image the ranks would end an epoch with
    # different batch counts. Two epochs, validation after each, on a COCO folder of the user's own.
    from my_pkg.mixed_aspect import write

    config = write(workdir / "coco")
    model = ["framework=mmdet", f"framework.config={config}", "framework.synthetic_data=false",
             "framework.batch_size=null", "framework.num_workers=null"]  # fmt: skip
    auto, strict = assert_same_training(workdir, [*model, "ddp=auto"], [*model, "ddp=strict"], timeout=600)
    assert "ddp=auto chose strict" in auto
    for text in (auto, strict):
        assert re.search(r"Epoch\(val\) \[2\]", text), "two epochs, each validated"
    iterations = [re.findall(r"Epoch\(train\) +\[(\d)\]\[ *(\d+)/(\d+)\]", text) for text in (auto, strict)]
    assert iterations[0] == iterations[1], "the same batches, epoch by epoch"


@mmdet
@pytest.mark.slow
def test_cfg_options_may_not_set_what_the_policy_decides(workdir):
    cases = (("+framework.cfg_options.model_wrapper_cfg.find_unused_parameters=true",
              "framework.cfg_options.model_wrapper_cfg.find_unused_parameters: the DDP policy decides"),
             ("+framework.cfg_options.train_cfg.max_epochs=3",
              "framework.cfg_options sets train_cfg.max_epochs, and framework.max_iters=2 replaces"))  # fmt: skip
    for option, words in cases:
        proc = train(workdir, *SMALL, "ddp=strict", option)
        assert proc.returncode == 2, output(proc)
        assert words in proc.stderr and "Fix:" in proc.stderr and "Traceback" not in proc.stderr
    assert run_dirs(workdir) == []


@mmdet
@pytest.mark.slow
def test_real_config_with_unused_parameters_stops_with_names(workdir):
    proc = train(workdir, *SMALL, f"framework.config={YOLO}", "framework.synthetic_data=true", "ddp=strict",
                 timeout=400)  # fmt: skip
    assert proc.returncode == 1, output(proc)
    err = proc.stderr
    assert "DDP stopped on ranks 0, 1: 3 parameters got no gradient" in err, err
    assert "backbone.conv2.conv (ranks 0, 1): backbone.conv2.conv.weight" in err
    assert "backbone.conv2.bn (ranks 0, 1): backbone.conv2.bn.weight, backbone.conv2.bn.bias" in err
    assert "  ddp=auto  " in err and "  ddp=safe  " in err
    # The config's own top-level switch is named as ignored, in one line.
    assert "top-level find_unused_parameters=True is ignored" in proc.stdout + err


@mmdet
@pytest.mark.slow
@pytest.mark.parametrize("preset", ["static"])  # safe: the demo test
def test_real_config_trains_with_the_fix(workdir, preset):
    proc = train(workdir, *SMALL, f"framework.config={YOLO}", "framework.synthetic_data=true", f"ddp={preset}",
                 timeout=400)  # fmt: skip
    assert proc.returncode == 0, output(proc)
    assert "Iter(train) [2/2]" in proc.stdout


@mmdet
@pytest.mark.slow
def test_own_config_keeps_its_data_and_wrapper_and_names_settings_mmengine_ignores(workdir):
    from adapters.frameworks.mmdet import write_synthetic_coco

    write_synthetic_coco(workdir / "mydata", num_images=8, size=96, seed=1)
    config = workdir / "my_retinanet.py"
    config.write_text(f"""
_base_ = 'mmdet::retinanet/retinanet_r18_fpn_1x_coco.py'
model = dict(
    backbone=dict(init_cfg=None),
    bbox_head=dict(num_classes=1),
    train_cfg=dict(find_unused_parameters=True),  # common advice: never read by the runner
)
model_wrapper_cfg = dict(type='MMDistributedDataParallel', broadcast_buffers=True)
train_dataloader = dict(dataset=dict(
    data_root={str(workdir / "mydata")!r}, ann_file='annotations.json', data_prefix=dict(img='images/'),
    metainfo=dict(classes=('box',)),
    pipeline=[dict(type='LoadImageFromFile'), dict(type='LoadAnnotations', with_bbox=True),
              dict(type='Resize', scale=(96, 96), keep_ratio=True), dict(type='PackDetInputs')]))
""")
    proc = train(workdir, "framework=mmdet", f"framework.config={config}", "framework.max_iters=2", "ddp=safe",
                 timeout=400)  # fmt: skip
    assert proc.returncode == 0, output(proc)
    [run_dir] = run_dirs(workdir)
    log = (run_dir / "rank0.log").read_text()
    assert "model.train_cfg.find_unused_parameters=True is never read by mmengine's runner" in log
    # The config's broadcast_buffers=True reaches DDP, under the name the installed torch has for it.
    assert f"'{buffer_sync_kwarg()}': True" in log and "'find_unused_parameters': True" in log
    assert "'broadcast_buffers'" not in log or buffer_sync_kwarg() == "broadcast_buffers"
    assert not (run_dir / "data").exists(), "their own data paths are used"


@mmdet
@pytest.mark.parametrize("content,words", [
    (None, "no such file"),
    ("x = 1\n", "defines no `model`"),
])  # fmt: skip
def test_bad_config_is_refused_before_launch(workdir, content, words):
    path = workdir / "bad.py"
    if content is not None:
        path.write_text(content)
    proc = train(workdir, "framework=mmdet", f"framework.config={path}")
    assert proc.returncode == 2, output(proc)
    assert f"framework.config={path}" in proc.stderr and words in proc.stderr
    assert run_dirs(workdir) == []


def test_explain_imports_neither_mmdet_nor_mmengine():
    import subprocess

    code = ("import sys; from adapters.cli import explain; explain(['framework=mmdet', 'ddp=static']); "
            "print([m for m in ('mmdet', 'mmengine', 'mmcv') if m in sys.modules])")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@mmdet
@pytest.mark.slow
def test_auto_leaves_out_the_unused_backbone_conv(workdir):
    # The team's preset (ddp=auto, probe_steps=3, bucket_cap_mb=50), the same file every framework's tests run.
    four = [o for o in SMALL if not o.startswith("framework.max_iters")] + ["framework.max_iters=4"]  # 3 decide
    proc = train(workdir, *four, f"framework.config={YOLO}", "framework.synthetic_data=true", *TEAM_PRESET,
                 timeout=400)  # fmt: skip
    assert proc.returncode == 0, output(proc)
    assert "ddp=auto chose ignore: the same 3 parameters got no gradient in every observed step" in proc.stdout
    assert "(observed: the first 3 training step(s)" in proc.stdout
    assert "DDP leaves out backbone.conv2.bn: backbone.conv2.bn.weight, backbone.conv2.bn.bias" in proc.stdout
    [run_dir] = run_dirs(workdir)
    for rank in (0, 1):
        log = (run_dir / f"rank{rank}.log").read_text()
        assert "find_unused_parameters=False, static_graph=False" in log
        assert "bucket_cap_mb=50.0, gradient_as_bucket_view=False, ignored=3" in log


@mmdet
@pytest.mark.slow
def test_memory_lowmem_reaches_train_dataloader(workdir):
    # framework.batch_size (2) differs: memory.batch_size=1 must win, in the DataLoader mmengine built.
    proc = train(workdir, *SMALL, "memory=lowmem", "memory.batch_size=1", timeout=400)
    assert proc.returncode == 0, output(proc)
    [run_dir] = run_dirs(workdir)
    for rank in (0, 1):  # read from runner.train_loop.dataloader in each rank
        log = (run_dir / f"rank{rank}.log").read_text()
        assert "train dataloader as built: batch_size=1, num_workers=0, pin_memory=False (per process)" in log


@mmdet
@pytest.mark.slow
@pytest.mark.parametrize("config,step,ranks", [("retinanet_late_aux.py", 3, "2 of 2"),
                                               ("retinanet_random_aux.py", 3, "1 of 2")])  # fmt: skip
def test_a_users_head_that_the_first_steps_missed_is_kept_in_sync(workdir, config, step, ranks):
    # my_pkg's own detector (custom_imports): an auxiliary head, its output weight tied to a second module,
    # unused in the 2 observed steps and used later: from iteration 3 on, or at random (seeded per rank).
    config = Path(__file__).parent / "my_pkg" / config
    proc = train(workdir, *SMALL, "framework.max_iters=4", f"framework.config={config}",
                 "framework.synthetic_data=true", timeout=400)  # fmt: skip
    assert proc.returncode == 0, output(proc)  # and run() compared every rank's parameter digests
    assert "ddp=auto chose ignore: the same 5 parameters got no gradient" in proc.stdout
    [run_dir] = run_dirs(workdir)
    assert "ignored=6" in (run_dir / "rank1.log").read_text(), "the tied weight is left out under both names"
    assert f"4 parameter(s) left out of DDP got a gradient in training step {step}, on {ranks} ranks" in proc.stdout
    assert "aux_head.0: aux_head.0.weight, aux_head.0.bias" in proc.stdout
    assert re.search(r"Iter\(train\) \[\d/4\].*loss_aux", proc.stdout), "mmengine logged the head's loss"


@mmdet
@pytest.mark.slow
def test_a_used_head_named_in_ignore_is_kept_in_sync(workdir):
    proc = train(workdir, *SMALL, "ddp=ignore", "ddp.ignore=[bbox_head.retina_cls]", timeout=400)
    assert proc.returncode == 0, output(proc)
    assert "left out of DDP got a gradient in training step 1, on 2 of 2 ranks (they are named in ddp.ignore)" in (
        proc.stdout
    )
    assert "bbox_head.retina_cls: bbox_head.retina_cls.weight, bbox_head.retina_cls.bias" in proc.stdout


@mmdet
@pytest.mark.slow
def test_resume_load_from_and_mmdet_s_inference_api_on_the_trained_checkpoint(workdir):
    import subprocess

    work_dir = workdir / "wd"  # kept across runs, as a user's own work_dir is
    first = train(workdir, *SMALL, "ddp=safe", f"framework.work_dir={work_dir}", timeout=400)
    assert first.returncode == 0, output(first)
    assert (work_dir / "iter_2.pth").is_file()
    # A new training into the same work_dir would write over it: refused, with the resume line to use.
    again = train(workdir, *SMALL, "ddp=safe", f"framework.work_dir={work_dir}")
    assert again.returncode == 2 and "already holds a training (iter_2.pth, model.pth)" in again.stderr, output(again)
    assert "framework.resume=auto" in again.stderr
    # mmengine's own resume: model, optimizer and iteration from iter_2.pth, on every rank.
    resumed = train(workdir, *SMALL, "ddp=safe", f"framework.work_dir={work_dir}", "framework.resume=auto",
                    "framework.max_iters=4", timeout=400)  # fmt: skip
    assert resumed.returncode == 0, output(resumed)
    assert "resumed epoch: 0, iter: 2" in resumed.stdout
    assert len(re.findall(r"Iter\(train\) \[[34]/4\]", resumed.stdout)) == 2, "iterations 3 and 4 only"
    # load_from: weights only, a new training (iteration 1 of 1) in a folder of its own.
    loaded = train(workdir, *SMALL, "ddp=safe", f"framework.load_from={work_dir / 'iter_4.pth'}",
                   "framework.max_iters=1", timeout=400)  # fmt: skip
    assert loaded.returncode == 0, output(loaded)
    assert f"Load checkpoint from {work_dir / 'iter_4.pth'}" in loaded.stdout
    assert "Iter(train) [1/1]" in loaded.stdout and "resumed" not in loaded.stdout
    # mmdet's inference API, unchanged, on the config mmengine wrote into work_dir and the weights of the resumed run.
    image = next(run_dirs(workdir)[0].glob("data/images/*.png"))
    code = (
        "import sys; from mmdet.apis import init_detector, inference_detector; "
        "model = init_detector(sys.argv[1], sys.argv[2], device='cpu'); "
        "result = inference_detector(model, sys.argv[3]); "
        "print(type(result).__name__, tuple(result.pred_instances.bboxes.shape)[1:], result.img_shape)"
    )
    args = [str(work_dir / "retinanet_r18_fpn_1x_coco.py"), str(work_dir / "model.pth"), str(image)]
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=workdir, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "DetDataSample (4,) (96, 96)"


@mmdet
@pytest.mark.parametrize("overrides,words", [
    (["framework.resume=/no/such.pth"], "framework.resume=/no/such.pth: no such checkpoint file"),
    (["framework.resume=auto"], "framework.work_dir is not set"),
    (["framework.resume=auto", "framework.load_from=/x.pth"], "resume continues a training"),
])  # fmt: skip
def test_nothing_to_resume_is_refused_before_launch(workdir, overrides, words):
    proc = train(workdir, "framework=mmdet", *overrides)
    assert proc.returncode == 2, output(proc)
    assert words in proc.stderr
    assert run_dirs(workdir) == []


@mmdet
def test_from_your_own_script_a_preset_is_applied_to_an_mmengine_config():
    from mmengine.config import Config

    from adapters.api import Policy
    from adapters.frameworks.mmdet import config_path

    cfg = Config.fromfile(str(config_path(YOLO)))  # its top-level find_unused_parameters = True is ignored
    lines = Policy(["ddp=static"], framework="mmdet", backend="gloo").apply_to_mmengine(cfg)
    assert cfg.model_wrapper_cfg == {"type": "MMDistributedDataParallel", buffer_sync_kwarg(): False,
                                     "static_graph": True, "device_ids": None}  # fmt: skip
    assert cfg.launcher == "pytorch" and cfg.env_cfg.dist_cfg.backend == "gloo"
    assert any("top-level find_unused_parameters=True is ignored" in line for line in lines)


@mmdet
@pytest.mark.slow
def test_doctor_names_the_unused_backbone_conv_of_a_real_config(workdir):
    import subprocess

    from conftest import ENV

    cmd = [
        sys.executable,
        "-m",
        "adapters",
        "doctor",
        *SMALL,
        f"framework.config={YOLO}",
        "framework.synthetic_data=true",
    ]
    proc = subprocess.run(cmd, cwd=workdir, env=ENV, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, output(proc)
    assert "Unused in every step on every rank (3; while unused their gradients stay None" in proc.stdout
    assert "backbone.conv2.bn (ranks 0, 1): backbone.conv2.bn.weight, backbone.conv2.bn.bias" in proc.stdout
    assert "Recommended: ddp=ignore" in proc.stdout


@mmdet
@pytest.mark.slow
def test_the_shipped_detection_smoke_preset_trains(workdir):
    proc = train(workdir, "preset=detection-cpu-smoke", timeout=400)
    assert proc.returncode == 0, output(proc)
    assert "Iter(train) [2/2]" in proc.stdout
    [run_dir] = run_dirs(workdir)
    assert "ddp=auto chose" in (run_dir / "rank0.log").read_text()
