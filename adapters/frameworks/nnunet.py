"""framework=nnunet: nnU-Net v2's real trainer, with the policy handed to the DDP call it makes itself.

nnU-Net has no setting for DDP's unused-parameter handling; with deep supervision off, the decoder's lower
``seg_layers`` get no gradient and multi-GPU training stops. ``nnunet_trainer.with_policy`` supplies the
policy's arguments to nnU-Net's own ``DDP(...)`` call in any trainer (``framework.trainer``), under that
trainer's own name, so nnU-Net's predictor loads what was trained here.

Memory: ``framework.batch_size`` overrides the plan's batch size (nnU-Net's global batch, split
over the ranks), ``framework.num_workers`` the data-augmentation processes per rank (``nnUNet_n_proc_DA``)
and ``framework.pin_memory`` the augmenter's pinning. When those workers die, the run says so, with the
likely cause and these settings, instead of only "background workers are no longer alive".
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..base import Adapter, WorkerContext
from ..errors import ConfigError
from ..native import MemorySettings, Setting, Translation, call_args
from ..policy import Backend, DDPPolicy, MemoryPolicy, out_of_range
from ..world import World

SYNTHETIC = "Dataset001_Blobs"
# For nnUNet_extTrainer: trainers that take the policy from the environment, for nnUNetv2_train itself.
EXT_TRAINERS = Path(__file__).resolve().parent / "nnunet_ext"
FOLDER_VARS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


@dataclass
class NNUNetConfig:
    """The ``framework`` node for framework=nnunet."""

    name: str = "nnunet"
    # A preprocessed dataset (name like Dataset001_X, or its id) under $nnUNet_preprocessed. null: write a
    # synthetic 2D dataset into the run folder and plan and preprocess it with nnU-Net's own code.
    dataset: Optional[str] = None
    configuration: str = "2d"
    fold: int = 0
    plans: str = "nnUNetPlans"
    # The trainer: a class name nnU-Net finds itself (nnUNetTrainer, a variant such as
    # nnUNetTrainerNoDeepSupervision, or a class in the folders of nnUNet_extTrainer), or a dotted path to your
    # own subclass (my_pkg.trainers.MyTrainer). Checkpoints and the output folder carry this name.
    trainer: str = "nnUNetTrainer"
    # false: only the full-resolution output is trained; the lower seg_layers get no gradient. null: the
    # trainer's own (nnUNetTrainer: on).
    deep_supervision: Optional[bool] = None
    # The schedule. null: the trainer's own (nnUNetTrainer: 1000 epochs of 250 iterations, 50 validation
    # iterations); for the synthetic dataset 1 epoch of 3 iterations and 1 validation iteration.
    epochs: Optional[int] = None
    iterations_per_epoch: Optional[int] = None
    val_iterations_per_epoch: Optional[int] = None
    # Continue the training in the trainer's output folder from its checkpoint (final, else latest, else best),
    # as nnUNetv2_train --c does. Needs a dataset whose results are kept (nnUNet_results).
    continue_training: bool = False
    # The plan's batch size (global, split over the ranks). null: the plan's; 4 for the synthetic dataset.
    batch_size: Optional[int] = None
    # Data-augmentation processes per rank (nnUNet_n_proc_DA). null: nnU-Net's choice; 0 (in-process) for
    # the synthetic dataset.
    num_workers: Optional[int] = None
    # Pin augmented batches in page-locked memory (GPU only). null: nnU-Net's choice (on for cuda).
    pin_memory: Optional[bool] = None
    # The synthetic dataset: how many images, and their side in pixels.
    num_images: int = 12
    image_size: int = 64
    # Seed torch, numpy and Python's random in each rank (seed + rank: nnU-Net draws every rank's batches from the
    # whole dataset, so ranks must not share one stream) before the trainer is built, so that a run can be repeated.
    # null: unseeded, as nnU-Net runs by itself.
    seed: Optional[int] = None


class NNUNetAdapter(Adapter):
    name = "nnunet"
    schema = NNUNetConfig

    def _translate(self, kwargs: dict[str, Any], policy: DDPPolicy, backend: Backend) -> Translation:
        device_ids = "[self.local_rank]" if backend is Backend.nccl else "None"
        return Translation(
            settings={"trainer": "framework.trainer, ddp_kwargs added to its DDP(...) call", "ddp_kwargs": kwargs,
                      "device": "cuda:<rank>" if backend is Backend.nccl else "cpu"},  # fmt: skip
            snippet=f"DDP(self.network, device_ids={device_ids}{call_args(kwargs)})"
            "  # inside nnUNetTrainer.initialize()",
            notes=(
                "nnU-Net's initialize() calls DDP(self.network, device_ids=[self.local_rank]) with no way to pass "
                "arguments; a subclass of the trainer, under the trainer's own name, hands it a DDP constructor that "
                "adds them. nnU-Net's own code runs unchanged, and its predictor loads the checkpoints.",
                *(() if backend is Backend.nccl else (
                    "On CPU the trainer's device is set back to cpu after nnU-Net's __init__ (which assumes cuda "
                    "whenever a process group exists), without a GradScaler, and device_ids is dropped.",)),
            ),
        )  # fmt: skip

    def memory_settings(self, memory: MemoryPolicy, fw: NNUNetConfig, *, backend: Backend,
                        world_size: int) -> MemorySettings:  # fmt: skip
        out = []
        if memory.batch_size is not None:  # nnU-Net's plan holds the global batch, split over the ranks
            out.append(Setting("plans batch_size", memory.batch_size * world_size, note="global"))
        if memory.num_workers is not None:
            out.append(Setting("nnUNet_n_proc_DA", memory.num_workers))
        if memory.pin_memory is not None:
            out.append(Setting("augmenter pin_memory", memory.pin_memory))
        if memory.amp is not None:
            out.append(Setting("autocast", memory.amp, unchanged="nnU-Net uses autocast on cuda and none on CPU"))
        return MemorySettings(tuple(out))

    def explain_framework(self, framework_cfg: NNUNetConfig) -> list[str]:
        fw = framework_cfg
        synthetic = fw.dataset is None
        own = {name: "the trainer's own" for name in SCHEDULE}
        shown = {**own, **{name: str(value) for name, value in overrides(fw).items()}}
        return [
            f"trainer: {fw.trainer}, its DDP(...) call given the policy's arguments; checkpoints and the output folder "
            f"keep the name {fw.trainer.rsplit('.', 1)[-1]}  (framework.trainer)",
            f"enable_deep_supervision = {shown['enable_deep_supervision']}  (framework.deep_supervision)",
            f"num_epochs = {shown['num_epochs']}, num_iterations_per_epoch = {shown['num_iterations_per_epoch']}, "
            f"num_val_iterations_per_epoch = {shown['num_val_iterations_per_epoch']}",
            f"plans['configurations'][{fw.configuration!r}]['batch_size'] = "
            + (str(_batch_size(fw.batch_size, synthetic)) if _batch_size(fw.batch_size, synthetic) else "the plan's")
            + "  (framework.batch_size)",
            "nnUNet_n_proc_DA = "
            + (str(_workers(fw.num_workers, synthetic)) if _workers(fw.num_workers, synthetic) is not None
               else "nnU-Net's choice") + "  (framework.num_workers)",
            "data augmenter pin_memory = " + ("nnU-Net's choice (on with cuda)" if fw.pin_memory is None
                                               else str(fw.pin_memory)) + "  (framework.pin_memory)",
            "dataset: " + (f"synthetic {SYNTHETIC} written into the run folder" if synthetic else fw.dataset),
            *(["continue from the checkpoint in the output folder (framework.continue_training)"]
              if fw.continue_training else []),
        ]  # fmt: skip

    def validate(self, framework_cfg: NNUNetConfig) -> None:
        fw = framework_cfg
        for key in ("epochs", "iterations_per_epoch", "num_images", "image_size"):
            value = getattr(fw, key)
            if value is not None and value < 1:
                raise out_of_range(f"framework.{key}", value, "it must be at least 1 (or null: the trainer's own)",
                                   f"framework.{key}=1 or more")  # fmt: skip
        if fw.val_iterations_per_epoch is not None and fw.val_iterations_per_epoch < 0:
            raise out_of_range("framework.val_iterations_per_epoch", fw.val_iterations_per_epoch, "it must be 0 or "
                               "more (or null: the trainer's own)", "framework.val_iterations_per_epoch=1")  # fmt: skip
        if fw.batch_size is not None and fw.batch_size < 1:
            raise out_of_range("framework.batch_size", fw.batch_size, "it must be at least 1 (or null: the plan's)",
                               "framework.batch_size=4, or null")  # fmt: skip
        if fw.num_workers is not None and fw.num_workers < 0:
            raise out_of_range("framework.num_workers", fw.num_workers, "augmentation processes per rank must be 0 "
                               "(in-process) or more", "framework.num_workers=0")  # fmt: skip
        check_trainer(fw.trainer)
        if fw.dataset is not None:
            folder = find_dataset(str(fw.dataset))
            check_configuration(folder, fw.plans, fw.configuration)
        if fw.continue_training:
            check_continue(fw)
        elif fw.dataset is not None and World.detect().restart == 0:  # a torchrun restart finds its own run's
            check_output_folder(fw)

    def run(self, ctx: WorkerContext) -> dict[str, Any]:
        import torch.distributed as dist

        memory = ctx.memory_applied  # memory.* wins over the framework's own keys where set
        fw = dataclasses.replace(
            ctx.framework, num_workers=memory.get("nnUNet_n_proc_DA", ctx.framework.num_workers),
            pin_memory=memory.get("augmenter pin_memory", ctx.framework.pin_memory),
            batch_size=memory.get("plans batch_size", ctx.framework.batch_size),
        )  # fmt: skip
        synthetic = fw.dataset is None
        root = ctx.run_dir / "nnunet"
        if synthetic:
            os.environ.update({var: str(root / var) for var in FOLDER_VARS})
        else:
            os.environ.setdefault("nnUNet_results", str(root / "nnUNet_results"))
        import torch

        from .nnunet_trainer import find_trainer, with_policy

        Trainer = with_policy(find_trainer(fw.trainer))  # noqa: N806 - a class

        if synthetic:
            if ctx.is_main:
                ctx.log.info("writing a synthetic dataset and planning/preprocessing it with nnU-Net (about a minute)")
                write_synthetic_dataset(root / "nnUNet_raw" / SYNTHETIC, fw.num_images, fw.image_size)
                plan_and_preprocess(1, fw.configuration)
            dist.barrier()
            folder = root / "nnUNet_preprocessed" / SYNTHETIC
        else:
            folder = find_dataset(str(fw.dataset))
        workers = _workers(fw.num_workers, synthetic)
        if workers is not None:  # read by nnU-Net when it builds the loaders (and by its planner: set it after)
            os.environ["nnUNet_n_proc_DA"] = str(workers)
        plans = check_configuration(folder, fw.plans, fw.configuration)
        dataset_json = json.loads((folder / "dataset.json").read_text())
        batch_size = _batch_size(fw.batch_size, synthetic)
        if batch_size is not None:
            if batch_size < ctx.world_size:
                raise ConfigError(f"framework.batch_size={batch_size} is nnU-Net's global batch size: it must be at "
                                  f"least the number of processes ({ctx.world_size}).")  # fmt: skip
            plans["configurations"][fw.configuration]["batch_size"] = batch_size
        plans["continue_training"] = fw.continue_training  # nnU-Net's run_training adds this for its logger
        # nnU-Net rebuilds a trainer from __init__'s arguments by signature: the run's settings go in as class
        # attributes, and the trainer calls ctx's hooks as every adapter does.
        Trainer.ddp_kwargs = dict(ctx.native.settings["ddp_kwargs"])
        Trainer.overrides = overrides(fw, synthetic)
        Trainer.run_device = torch.device(ctx.device)
        Trainer.pin_memory = fw.pin_memory
        Trainer.ctx = ctx
        if fw.seed is not None:
            import random

            import numpy as np

            random.seed(fw.seed + ctx.rank)
            np.random.seed(fw.seed + ctx.rank)
            torch.manual_seed(fw.seed + ctx.rank)
        trainer = Trainer(plans, fw.configuration, fw.fold, dataset_json, device=torch.device(ctx.device))
        if ctx.is_main:
            ctx.log.info("nnU-Net trainer %s (%s), output folder %s", Trainer.__name__, Trainer.__module__,
                         trainer.output_folder)  # fmt: skip
        if fw.continue_training:
            from nnunetv2.run.run_training import maybe_load_checkpoint

            maybe_load_checkpoint(trainer, True, False)  # nnUNetv2_train --c: final, else latest, else best
            ctx.log.info("continuing from epoch %d (framework.continue_training)", trainer.current_epoch)
        trainer.run_training()
        losses = trainer.logger.local_logger.my_fantastic_logging.get("train_losses") or [float("nan")]
        return {"epochs": trainer.num_epochs, "train_loss": round(float(losses[-1]), 4),
                "output_folder": trainer.output_folder}  # fmt: skip


SCHEDULE = {  # trainer attribute -> framework key
    "enable_deep_supervision": "deep_supervision",
    "num_epochs": "epochs",
    "num_iterations_per_epoch": "iterations_per_epoch",
    "num_val_iterations_per_epoch": "val_iterations_per_epoch",
}
SYNTHETIC_SCHEDULE = {"num_epochs": 1, "num_iterations_per_epoch": 3, "num_val_iterations_per_epoch": 1}


def overrides(fw: NNUNetConfig, synthetic: bool | None = None) -> dict[str, Any]:
    """The trainer attributes this run sets; the others keep what the trainer's own __init__ gave them."""
    synthetic = fw.dataset is None if synthetic is None else synthetic
    out = dict(SYNTHETIC_SCHEDULE) if synthetic else {}
    out.update({attr: getattr(fw, key) for attr, key in SCHEDULE.items() if getattr(fw, key) is not None})
    return out


def check_trainer(spec: str) -> None:
    """The trainer exists: a dotted path must import; a bare name must be a class nnU-Net can find (its package, or
    the folders of nnUNet_extTrainer). Read from the source files, without importing nnU-Net."""
    import importlib.util
    import re

    if "." in spec:
        from ..building import check_target

        check_target("framework.trainer", {"_target_": spec}, "nnUNetTrainer")
        return
    found = importlib.util.find_spec("nnunetv2")
    folders = [Path(list(found.submodule_search_locations)[0]) / "training" / "nnUNetTrainer"] if found else []
    folders += [Path(p) for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p.strip()]
    name = re.escape(spec)
    pattern = re.compile(rf"^(class {name}\b|{name} *=)", re.MULTILINE)  # a class, or a name bound to one
    for folder in folders:
        for path in folder.rglob("*.py") if folder.is_dir() else ():
            if pattern.search(path.read_text(errors="replace")):
                return
    raise ConfigError(
        f"framework.trainer={spec}: no such trainer class in nnU-Net ({folders[0] if folders else 'not installed'})"
        + (f" or in nnUNet_extTrainer ({os.environ['nnUNet_extTrainer']})" if os.environ.get("nnUNet_extTrainer")
           else "") + ".\nFix: the name of an nnU-Net trainer (nnUNetTrainer, nnUNetTrainerNoDeepSupervision, ...), "
        "the dotted path of your own subclass (my_pkg.trainers.MyTrainer), or its folder in nnUNet_extTrainer."
    )  # fmt: skip


def output_folder(fw: NNUNetConfig, dataset: str) -> Path | None:
    """Where nnU-Net keeps this trainer's results: <nnUNet_results>/<dataset>/<trainer>__<plans>__<config>/fold_N."""
    results = os.environ.get("nnUNet_results")
    if not results:
        return None
    trainer = fw.trainer.rsplit(".", 1)[-1]
    return Path(results) / dataset / f"{trainer}__{fw.plans}__{fw.configuration}" / f"fold_{fw.fold}"


CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")


def check_output_folder(fw: NNUNetConfig) -> None:
    """A new training never writes over another's checkpoints in nnU-Net's output folder (nnU-Net would)."""
    folder = output_folder(fw, find_dataset(str(fw.dataset)).name)
    held = [n for n in CHECKPOINTS if folder is not None and (folder / n).is_file()]
    if held:
        raise ConfigError(
            f"framework.trainer={fw.trainer} fold {fw.fold}: nnU-Net's output folder {folder} already holds a "
            f"training ({', '.join(held)}); a new one would write over it.\nFix: framework.continue_training=true "
            "to continue it, another framework.fold or framework.trainer, or move that folder away first."
        )


def check_continue(fw: NNUNetConfig) -> None:
    """continue_training needs a checkpoint to continue from; nnU-Net itself would start afresh with a warning."""
    if fw.dataset is None:
        raise ConfigError(
            "framework.continue_training=true: the synthetic dataset is written into each new run folder, so there "
            "is no earlier training of it to continue.\nFix: framework.dataset=<a preprocessed dataset> with "
            "nnUNet_results set (where nnU-Net keeps results), or drop framework.continue_training."
        )
    folder = output_folder(fw, find_dataset(str(fw.dataset)).name)
    names = CHECKPOINTS
    if folder is None or not any((folder / n).is_file() for n in names):
        where = f"in {folder}" if folder else "anywhere: nnUNet_results is not set"
        raise ConfigError(
            f"framework.continue_training=true: there is no checkpoint to continue from {where} (looked for "
            f"{', '.join(names)}).\nFix: check framework.trainer, framework.plans, framework.configuration, "
            "framework.fold and nnUNet_results against the training to continue, or drop "
            "framework.continue_training to start afresh."
        )


def _batch_size(value: int | None, synthetic: bool) -> int | None:
    return value if value is not None else (4 if synthetic else None)


def _workers(value: int | None, synthetic: bool) -> int | None:
    return value if value is not None else (0 if synthetic else None)


# --- datasets ---------------------------------------------------------------------------------------


def find_dataset(spec: str) -> Path:
    """The preprocessed folder of ``spec`` (``Dataset001_X`` or ``1``) under $nnUNet_preprocessed."""
    base = os.environ.get("nnUNet_preprocessed")
    how = ("Fix: set nnUNet_raw, nnUNet_preprocessed and nnUNet_results, then preprocess the dataset: "
           "nnUNetv2_plan_and_preprocess -d <id> -c <configuration>; or leave framework.dataset=null for the "
           "synthetic dataset.")  # fmt: skip
    if not base:
        raise ConfigError(f"framework.dataset={spec}: the environment variable nnUNet_preprocessed is not set, so "
                          f"there is nowhere to look.\n{how}")  # fmt: skip
    base_path = Path(base)
    candidates = sorted(p for p in base_path.glob("Dataset*_*") if p.is_dir()) if base_path.is_dir() else []
    if spec.isdigit():
        matches = [p for p in candidates if p.name.startswith(f"Dataset{int(spec):03d}_")]
    else:
        matches = [p for p in candidates if p.name == spec]
    if not matches:
        have = ", ".join(p.name for p in candidates) or "none"
        raise ConfigError(f"framework.dataset={spec}: no such preprocessed dataset in {base_path} "
                          f"(datasets there: {have}).\n{how}")  # fmt: skip
    return matches[0]


def check_configuration(folder: Path, plans_name: str, configuration: str) -> dict:
    plans_file = folder / f"{plans_name}.json"
    if not plans_file.is_file():
        raise ConfigError(f"framework.plans={plans_name}: {plans_file} does not exist; plan the dataset first "
                          "(nnUNetv2_plan_and_preprocess).")  # fmt: skip
    plans = json.loads(plans_file.read_text())
    available = list(plans.get("configurations", {}))
    if configuration not in available:
        raise ConfigError(f"framework.configuration={configuration}: the plans {plans_file} have no such "
                          f"configuration. They have: {', '.join(available)}.")  # fmt: skip
    data_identifier = plans["configurations"][configuration].get("data_identifier")
    if data_identifier and not (folder / data_identifier).is_dir():
        missing = folder / data_identifier
        raise ConfigError(f"framework.configuration={configuration} is planned but not preprocessed ({missing} is "
                          f"missing). Fix: nnUNetv2_preprocess -d {folder.name} -c {configuration}")  # fmt: skip
    return plans


def write_synthetic_dataset(folder: Path, num_images: int, size: int) -> None:
    """nnU-Net's raw format: PNG images with one bright blob each (imagesTr/, labelsTr/, dataset.json)."""
    import numpy as np
    from PIL import Image

    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    for i in range(num_images):
        cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
        r = rng.integers(size // 8, size // 4)
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.uint8)
        image = np.clip(mask * 160 + rng.normal(60, 25, (size, size)), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(folder / "imagesTr" / f"blob_{i:03d}_0000.png")
        Image.fromarray(mask).save(folder / "labelsTr" / f"blob_{i:03d}.png")
    dataset = {"channel_names": {"0": "gray"}, "labels": {"background": 0, "blob": 1},
               "numTraining": num_images, "file_ending": ".png"}  # fmt: skip
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))


def plan_and_preprocess(dataset_id: int, configuration: str) -> None:
    """nnU-Net's own fingerprinting, planning and preprocessing (nnUNetv2_plan_and_preprocess)."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
        preprocess,
    )

    extract_fingerprints([dataset_id], num_processes=1, check_dataset_integrity=True)
    plan_experiments([dataset_id])
    preprocess([dataset_id], configurations=(configuration,), num_processes=(1,))


ADAPTER = NNUNetAdapter()
