"""framework=mmdet: MMDetection 3.x, trained by mmengine's Runner, with the policy in ``model_wrapper_cfg``.

Where mmengine really looks (``Runner.wrap_model``, mmengine 0.10): ``cfg.model_wrapper_cfg`` when it
exists; only when it is None, the top-level ``cfg.find_unused_parameters``. ``model.train_cfg`` (where common
advice puts it) is handed to the detector's heads and never read by the runner. This adapter always writes
``model_wrapper_cfg``, keeps the type a user's config already had there, and says in one line when the
config holds a setting that mmengine would ignore.

Without a ``model_wrapper_cfg`` mmengine wraps with ``broadcast_buffers=False``; with one, DDP's own
default (True) applies. The translation writes ``broadcast_buffers=False`` unless the policy sets it, so
choosing a preset does not change that default behind the user's back.
"""

from __future__ import annotations

import importlib.util
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

from ..base import Adapter, WorkerContext
from ..errors import ConfigError, MissingDependency
from ..native import MemorySettings, NativeSettings, Setting, Translation, buffer_sync_kwarg, ddp_kwargs
from ..policy import Backend, DDPPolicy, MemoryPolicy, out_of_range

DEMO_CONFIG = "mmdet::retinanet/retinanet_r18_fpn_1x_coco.py"
WRAPPER = "MMDistributedDataParallel"
AMP = "AmpOptimWrapper"


@dataclass
class MMDetConfig:
    """The ``framework`` node for framework=mmdet."""

    name: str = "mmdet"
    # An mmdet 3.x config: a file path, or mmdet::<path> for one that ships with mmdet.
    config: str = DEMO_CONFIG
    # Replace the config's dataset with a small synthetic COCO-format one written into the run folder
    # (one class, boxes on noise), drop pretrained weights and set every num_classes to 1.
    # null: yes for the built-in config, no for your own (your data paths are used).
    synthetic_data: Optional[bool] = None
    # Train this many iterations (IterBasedTrainLoop, no validation, constant learning rate), replacing the
    # config's train_cfg. null: 4 on the synthetic data (a quick demo), the config's own schedule on your data (and
    # whatever framework.cfg_options sets in train_cfg).
    max_iters: Optional[int] = None
    # mmengine's work_dir; null: <run folder>/work_dir. One that holds an earlier training's checkpoints is
    # refused unless resume continues it.
    work_dir: Optional[str] = None
    # mmengine's own resume: "auto" continues from the latest checkpoint in framework.work_dir; a checkpoint
    # file continues from that one (model, optimizer, scheduler and iteration). null: start afresh.
    resume: Optional[str] = None
    # mmengine's load_from: start from these weights (a checkpoint file), with a fresh optimizer and iteration 0.
    load_from: Optional[str] = None
    # mmengine-style overrides merged into the config last, e.g. {"model.bbox_head.num_classes": 3}
    # (+framework.cfg_options.optim_wrapper.optimizer.lr=0.001 works too).
    cfg_options: Dict[str, Any] = field(default_factory=dict)
    # train_dataloader.batch_size and num_workers per process; null keeps the config's.
    batch_size: Optional[int] = 2
    num_workers: Optional[int] = 0
    # The synthetic dataset: how many images, and their side in pixels.
    num_images: int = 24
    image_size: int = 128
    seed: int = 0


class MMDetAdapter(Adapter):
    name = "mmdet"
    schema = MMDetConfig

    def _translate(self, kwargs: dict[str, Any], policy: DDPPolicy, backend: Backend) -> Translation:
        kwargs.setdefault(buffer_sync_kwarg(), False)  # mmengine's default when it builds the wrapper itself
        wrapper: dict[str, Any] = {"type": WRAPPER, **kwargs}
        notes = [
            "model_wrapper_cfg is what mmengine's Runner reads; model.train_cfg.find_unused_parameters is not "
            "read at all, and a top-level find_unused_parameters only when model_wrapper_cfg is None.",
        ]
        if backend is not Backend.nccl:
            wrapper["device_ids"] = None  # mmengine would pass [LOCAL_RANK], which DDP refuses for a CPU model
            notes.append("On CPU device_ids=None and env_cfg.dist_cfg.backend='gloo'; on GPU mmengine fills in "
                         "device_ids=[LOCAL_RANK] and uses nccl.")  # fmt: skip
        args = ", ".join(f"{k}={v!r}" for k, v in wrapper.items())
        return Translation(
            settings={"model_wrapper_cfg": wrapper, "env_cfg.dist_cfg.backend": backend.name, "launcher": "pytorch"},
            snippet=f"model_wrapper_cfg = dict({args})",
            notes=tuple(notes),
        )

    def memory_settings(self, memory: MemoryPolicy, fw: MMDetConfig, *, backend: Backend,
                        world_size: int) -> MemorySettings:  # fmt: skip
        out = [Setting(f"train_dataloader.{key}", getattr(memory, key))
               for key in ("batch_size", "num_workers", "pin_memory") if getattr(memory, key) is not None]  # fmt: skip
        if memory.amp:
            out.append(Setting("optim_wrapper.type", AMP, unchanged="" if backend is Backend.nccl
                               else "mmengine's AmpOptimWrapper needs a GPU"))  # fmt: skip
        return MemorySettings(tuple(out))

    def validate(self, framework_cfg: MMDetConfig) -> None:
        if importlib.util.find_spec("mmcv._ext") is None:
            raise MissingDependency(
                "mmcv is installed without its compiled ops (mmcv._ext), which mmdet needs (mmcv-lite, or a "
                "build without MMCV_WITH_OPS).\nFix: MMCV_WITH_OPS=1 FORCE_CUDA=0 pip install --no-build-isolation "
                "--force-reinstall 'mmcv>=2.0.0rc4,<2.2.0'  (builds from source: about 20 minutes on 2 cores)"
            )
        path = config_path(framework_cfg.config)
        cfg = _load(path, framework_cfg.config)
        if "model" not in cfg or not cfg.get("model"):
            raise ConfigError(f"framework.config={framework_cfg.config}: {path} defines no `model`; an mmdet "
                              "config needs model = dict(type=..., ...).")  # fmt: skip
        for key in ("max_iters", "batch_size", "num_images", "image_size"):
            value = getattr(framework_cfg, key)
            if value is not None and value < 1:
                raise out_of_range(f"framework.{key}", value, "it must be at least 1 (or null: the config's own)",
                                   f"framework.{key}=1 or more")  # fmt: skip
        check_resume(framework_cfg)
        check_cfg_options(framework_cfg)
        if framework_cfg.num_workers is not None and framework_cfg.num_workers < 0:
            raise out_of_range("framework.num_workers", framework_cfg.num_workers, "DataLoader workers per rank must "
                               "be 0 (load in the training process) or more", "framework.num_workers=0")  # fmt: skip

    def run(self, ctx: WorkerContext) -> dict[str, Any]:
        import torch.distributed as dist
        from mmengine.runner import Runner

        fw = ctx.framework
        cfg = _load(config_path(fw.config), fw.config)
        synthetic = fw.synthetic_data if fw.synthetic_data is not None else fw.config == DEMO_CONFIG
        if synthetic:
            data_root = ctx.run_dir / "data"
            if ctx.is_main:
                write_synthetic_coco(data_root, fw.num_images, fw.image_size, fw.seed)
            dist.barrier()  # the other ranks read what rank 0 wrote
            use_synthetic_data(cfg, data_root, fw.image_size)
        iters = schedule_iters(fw, synthetic)
        if iters is not None:
            if not synthetic and ctx.is_main:
                ctx.log.info("framework.max_iters=%d replaces the config's train_cfg (%s); framework.max_iters=null "
                             "keeps it", iters, dict(cfg.get("train_cfg") or {}))  # fmt: skip
            short_schedule(cfg, iters)
        loader = cfg.train_dataloader
        if fw.batch_size is not None:
            loader.batch_size = fw.batch_size
        if fw.num_workers is not None:
            loader.num_workers = fw.num_workers
        memory = ctx.memory_applied
        for key in ("batch_size", "num_workers", "pin_memory"):
            value = memory.get(f"train_dataloader.{key}")
            if value is not None:
                loader[key] = value
        if memory.get("optim_wrapper.type") == AMP:
            cfg.optim_wrapper.type = AMP
        loader.persistent_workers = loader.get("num_workers", 0) > 0 and loader.get("persistent_workers", False)
        if fw.cfg_options:  # before the policy: the DDP switches are the policy's (validate refuses them here)
            cfg.merge_from_dict(dict(fw.cfg_options))
        for line in ignored_settings(cfg, ctx.policy) + apply_policy(cfg, ctx.native, ctx.policy):
            ctx.log.warning(line)
        cfg.work_dir = fw.work_dir or str(ctx.run_dir / "work_dir")
        cfg.randomness = dict(seed=fw.seed)
        if fw.resume is not None:  # mmengine's own resume: load_from names the checkpoint, or None finds the latest
            cfg.resume, cfg.load_from = True, None if fw.resume == "auto" else str(Path(fw.resume).expanduser())
        elif fw.load_from is not None:
            cfg.resume, cfg.load_from = False, str(Path(fw.load_from).expanduser())

        accumulate = int((cfg.get("optim_wrapper") or {}).get("accumulative_counts", 1) or 1)
        ctx.training_facts(accumulation=accumulate > 1)
        runner = Runner.from_cfg(cfg)
        ctx.track_ddp(runner.model)  # mmengine wrapped it in Runner.__init__; the engine works on that wrapper
        inner = runner.model.module
        ctx.log.info("model_wrapper_cfg applied: %s", dict(cfg.model_wrapper_cfg))
        ctx.log.info("runner.model: %s, find_unused_parameters=%s", type(runner.model).__name__,
                     getattr(runner.model, "find_unused_parameters", "n/a"))  # fmt: skip
        loader = runner.train_loop.dataloader  # the torch DataLoader mmengine built from train_dataloader
        # mmdet's configs batch through a batch sampler (AspectRatioBatchSampler): DataLoader.batch_size is None.
        batch = loader.batch_size
        if batch is None:
            batch = getattr(loader.batch_sampler, "batch_size", None)
        ctx.log.info("train dataloader as built: batch_size=%s, num_workers=%s, pin_memory=%s (per process)",
                     batch, loader.num_workers, loader.pin_memory)  # fmt: skip
        runner.register_hook(_first_step_hook(ctx), priority="VERY_LOW")
        with _checkpoint_globals(fw):
            runner.train()  # mmengine loads load_from (or resumes) here, before the first iteration
        summary: dict[str, Any] = {"iters": runner.iter, "work_dir": cfg.work_dir}
        if ctx.is_main:  # the weights alone, for mmdet's init_detector: see save_weights
            summary["weights"] = str(save_weights(inner, runner, Path(cfg.work_dir) / "model.pth"))
        loss = runner.message_hub.get_scalar("train/loss")
        if loss is not None:
            summary["loss"] = round(float(loss.current()), 4)
        return summary


# --- config handling (mmengine imported inside) -----------------------------------------------------


def config_path(spec: str) -> Path:
    """``mmdet::x/y.py`` -> the file inside the installed mmdet; anything else is a path."""
    if spec.startswith("mmdet::"):
        found = importlib.util.find_spec("mmdet")
        if found is None or not found.submodule_search_locations:
            raise MissingDependency("framework.config uses mmdet::, but mmdet is not installed. "
                                    "Fix: pip install -e '.[mmdet]'")  # fmt: skip
        path = Path(list(found.submodule_search_locations)[0]) / ".mim" / "configs" / spec[len("mmdet::") :]
    else:
        path = Path(spec).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"framework.config={spec}: no such file ({path}). Expected an mmdet 3.x config file: a path, or "
            f"mmdet::<folder>/<name>.py for one that ships with mmdet (e.g. {DEMO_CONFIG})."
        )
    return path.resolve()


def _load(path: Path, spec: str) -> Any:
    from mmengine.config import Config

    try:
        return Config.fromfile(str(path))
    except Exception as exc:  # a user's config can fail in any way; say which file
        raise ConfigError(f"framework.config={spec}: mmengine could not load {path}: {exc}") from None


def apply_policy(cfg: Any, native: NativeSettings, policy: DDPPolicy) -> list[str]:
    """Merge the policy into ``cfg.model_wrapper_cfg``; returns a warning line for each value it replaced.

    The user's wrapper type and other arguments are kept; what the policy sets wins; the unused-parameter
    switches are the policy's alone.
    """
    wrapper = dict(native.settings["model_wrapper_cfg"])
    existing = dict(cfg.get("model_wrapper_cfg") or {})
    lines = []
    for key in ("find_unused_parameters", "static_graph"):
        if key in existing and bool(existing[key]) != bool(wrapper.get(key, False)):
            lines.append(
                f"the config's model_wrapper_cfg.{key}={existing[key]} is replaced: "
                f"ddp.unused_params={policy.unused_params.name} means {key}={wrapper.get(key, False)}."
            )
        existing.pop(key, None)
    sync = buffer_sync_kwarg()
    if sync != "broadcast_buffers" and "broadcast_buffers" in existing:  # the name torch deprecated: pass it on
        existing.setdefault(sync, existing.pop("broadcast_buffers"))  # under the new one, never both
    owned = set(ddp_kwargs(policy)) | ({"device_ids"} & set(wrapper))
    merged = {**wrapper, **existing}
    merged.update({key: wrapper[key] for key in owned})
    cfg.model_wrapper_cfg = merged
    cfg.launcher = native.settings["launcher"]
    cfg.setdefault("env_cfg", {}).setdefault("dist_cfg", {})["backend"] = native.settings["env_cfg.dist_cfg.backend"]
    return lines


def ignored_settings(cfg: Any, policy: DDPPolicy) -> list[str]:
    """One warning line for each place in the config that sets find_unused_parameters where it has no effect."""
    wanted = policy.unused_params.name == "find"
    lines = []
    top = cfg.get("find_unused_parameters")
    if top is not None:
        lines.append(
            f"the config's top-level find_unused_parameters={top} is ignored: mmengine reads it only when "
            f"model_wrapper_cfg is None, and ddp.unused_params={policy.unused_params.name} sets "
            f"model_wrapper_cfg (find_unused_parameters={wanted})." + (" They disagree." if bool(top) != wanted else "")
        )
    train_cfg = (cfg.get("model") or {}).get("train_cfg") or {}
    if "find_unused_parameters" in train_cfg:
        lines.append(
            f"the config's model.train_cfg.find_unused_parameters={train_cfg['find_unused_parameters']} is never "
            "read by mmengine's runner (it goes to the detector's heads); remove it: ddp.unused_params decides."
        )
    return lines


def _walk(node: Any, fn) -> None:
    if isinstance(node, dict):
        fn(node)
        for value in node.values():
            _walk(value, fn)
    elif isinstance(node, (list, tuple)):
        for value in node:
            _walk(value, fn)


def use_synthetic_data(cfg: Any, data_root: Path, image_size: int) -> None:
    """Point the training data at the synthetic dataset; one class; no pretrained weights; no validation."""

    def one_class_no_pretrained(node: dict) -> None:
        if "num_classes" in node:
            node["num_classes"] = 1
        init = node.get("init_cfg")
        if isinstance(init, dict) and init.get("type") == "Pretrained":
            node["init_cfg"] = None

    _walk(cfg.model, one_class_no_pretrained)
    cfg.load_from = None
    pipeline = [
        dict(type="LoadImageFromFile"),
        dict(type="LoadAnnotations", with_bbox=True),
        dict(type="Resize", scale=(image_size, image_size), keep_ratio=True),
        dict(type="RandomFlip", prob=0.5),
        dict(type="PackDetInputs"),
    ]
    data = dict(type="CocoDataset", data_root=str(data_root), ann_file="annotations.json",
                data_prefix=dict(img="images/"), metainfo=dict(classes=("box",)))  # fmt: skip
    cfg.train_dataloader.dataset = dict(**data, filter_cfg=dict(filter_empty_gt=True, min_size=4), pipeline=pipeline)
    # The test settings stay, on the synthetic data: mmengine builds them only for runner.test(), and the config it
    # writes into work_dir then works with mmdet's inference API (init_detector reads the test pipeline).
    test_pipeline = [
        dict(type="LoadImageFromFile"),
        dict(type="Resize", scale=(image_size, image_size), keep_ratio=True),
        dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor")),
    ]
    cfg.test_dataloader = dict(batch_size=1, num_workers=0, persistent_workers=False, drop_last=False,
                               sampler=dict(type="DefaultSampler", shuffle=False),
                               dataset=dict(**data, test_mode=True, pipeline=test_pipeline))  # fmt: skip
    cfg.test_cfg = dict(type="TestLoop")
    cfg.test_evaluator = dict(type="CocoMetric", ann_file=str(data_root / "annotations.json"), metric="bbox")
    _no_validation(cfg)


def _no_validation(cfg: Any) -> None:
    """No validation during training (the test settings stay: they run only in runner.test())."""
    for key in ("val_dataloader", "val_cfg", "val_evaluator"):
        cfg[key] = None


def save_weights(model: Any, runner: Any, path: Path) -> Path:
    """The trained weights and the dataset's class names, as mmdet's ``init_detector`` reads them.

    mmengine's own ``iter_N.pth`` also holds its message hub (numpy values, a HistoryBuffer), which torch >= 2.6
    refuses to load by default (``weights_only=True``): ``init_detector`` then fails on it. This file holds only
    tensors and plain values, so it loads with torch's safe default."""
    import torch

    meta = {"dataset_meta": dict(runner.train_dataloader.dataset.metainfo)}
    torch.save({"meta": meta, "state_dict": model.state_dict()}, path)
    return path


def _checkpoint_globals(fw: MMDetConfig) -> Any:
    """mmengine 0.10 loads checkpoints with ``torch.load``'s default, which torch 2.6 made ``weights_only=True``; an
    mmengine checkpoint also holds its message hub's history (numpy values, HistoryBuffer) and so fails to load.
    For the checkpoint named on the command line (a shared source may not name one), those few types are allowed,
    nothing else: the load stays a weights-only load."""
    import contextlib

    if fw.resume is None and fw.load_from is None:
        return contextlib.nullcontext()
    import numpy as np
    import torch
    from mmengine.logging.history_buffer import HistoryBuffer

    multiarray = (np._core if hasattr(np, "_core") else np.core).multiarray  # numpy 2, numpy 1
    dtypes = {type(np.dtype(t)) for t in ("float32", "float64", "int64")}
    allowed = [HistoryBuffer, multiarray.scalar, multiarray._reconstruct, np.ndarray, np.dtype, getattr, *dtypes]
    return torch.serialization.safe_globals(allowed)


def check_resume(fw: MMDetConfig) -> None:
    """resume and load_from name something that exists; a work_dir with an earlier training is continued, never
    written over."""
    if fw.resume is not None and fw.load_from is not None:
        raise ConfigError(
            f"framework.resume={fw.resume} and framework.load_from={fw.load_from}: resume continues a training (its "
            "own weights, optimizer and iteration), load_from starts a new one from weights.\nFix: keep one of them."
        )
    for key in ("resume", "load_from"):
        value = getattr(fw, key)
        if value is not None and value != "auto" and not Path(value).expanduser().is_file():
            raise ConfigError(f"framework.{key}={value}: no such checkpoint file.\nFix: the path of a .pth file "
                              "mmengine wrote (work_dir/iter_N.pth, epoch_N.pth)"
                              + (", or framework.resume=auto with framework.work_dir=<that training's work_dir>."
                                 if key == "resume" else "."))  # fmt: skip
    work_dir = Path(fw.work_dir).expanduser() if fw.work_dir else None
    held = sorted(work_dir.glob("*.pth")) if work_dir and work_dir.is_dir() else []
    if fw.resume == "auto" and not held:
        where = (
            f"{work_dir} holds no checkpoint" if work_dir else "framework.work_dir is not set (each run has its own)"
        )
        raise ConfigError(f"framework.resume=auto continues from the latest checkpoint in framework.work_dir, but "
                          f"{where}.\nFix: framework.work_dir=<the work_dir of the training to continue>.")  # fmt: skip
    from ..world import World

    if held and fw.resume is None and World.detect().restart == 0:  # a torchrun restart finds its own run's
        raise ConfigError(
            f"framework.work_dir={fw.work_dir} already holds a training ({', '.join(p.name for p in held[:3])}); a new "
            "one would write its checkpoints over it.\nFix: framework.resume=auto to continue it, or another "
            "framework.work_dir (or leave it out: each run gets its own)."
        )


# model_wrapper_cfg keys the DDP policy owns (ddp=..., ddp.*), and the top-level switch mmengine ignores once
# model_wrapper_cfg is set (which this adapter always sets).
_POLICY_KEYS = ("find_unused_parameters", "static_graph", "broadcast_buffers", "forward_sync_buffers", "bucket_cap_mb",
                "gradient_as_bucket_view", "device_ids")  # fmt: skip


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b": v}`` for a nested dict of cfg_options (keys may already be dotted)."""
    out: dict[str, Any] = {}
    for key, value in dict(node).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) or hasattr(value, "items"):
            out.update(_flat(value, name + "."))
        else:
            out[name] = value
    return out


def check_cfg_options(fw: MMDetConfig) -> None:
    """cfg_options may not set what the DDP policy decides, and may not set a schedule framework.max_iters replaces."""
    options = _flat(fw.cfg_options)
    for key in options:
        leaf = key.rsplit(".", 1)[-1]
        if key.startswith("model_wrapper_cfg.") and leaf in _POLICY_KEYS:
            raise ConfigError(
                f"framework.cfg_options.{key}: the DDP policy decides model_wrapper_cfg.{leaf} (ddp=..., ddp.*); set "
                f"here it would silently win over the preset.\nFix: remove it (~framework.cfg_options.{key}) and "
                "choose the preset: ddp=safe for find_unused_parameters=True, ddp=static for static_graph=True, "
                "ddp.bucket_cap_mb or ddp.broadcast_buffers for the others."
            )
        if key == "find_unused_parameters":
            raise ConfigError(
                "framework.cfg_options.find_unused_parameters: mmengine reads the top-level switch only when "
                "model_wrapper_cfg is None, and the DDP policy always sets model_wrapper_cfg: it would be ignored.\n"
                "Fix: remove it and choose the preset (ddp=safe for find_unused_parameters=True)."
            )
    schedule = sorted(k for k in options if k.startswith("train_cfg."))
    if schedule and fw.max_iters is not None:
        raise ConfigError(
            f"framework.cfg_options sets {', '.join(schedule)}, and framework.max_iters={fw.max_iters} replaces the "
            "config's train_cfg with an IterBasedTrainLoop of its own: framework.max_iters would win.\nFix: "
            "framework.max_iters=null to train by the config's schedule with your train_cfg, or drop the train_cfg "
            "options."
        )


def schedule_iters(fw: MMDetConfig, synthetic: bool) -> int | None:
    """The iterations of the run's short schedule, or None to keep the config's train_cfg (and cfg_options')."""
    if fw.max_iters is not None:
        return fw.max_iters
    touched = any(k.startswith("train_cfg.") for k in _flat(fw.cfg_options))
    return 4 if synthetic and not touched else None


def short_schedule(cfg: Any, max_iters: int) -> None:
    """A fixed number of iterations with a constant learning rate, logging every iteration."""
    cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=max_iters, val_interval=max_iters + 1)
    cfg.param_scheduler = []
    _no_validation(cfg)
    hooks = cfg.setdefault("default_hooks", {})
    hooks["logger"] = dict(type="LoggerHook", interval=1)
    hooks["checkpoint"] = dict(type="CheckpointHook", interval=max_iters, by_epoch=False)
    cfg.log_processor = dict(type="LogProcessor", window_size=1, by_epoch=False)


def write_synthetic_coco(root: Path, num_images: int, size: int, seed: int) -> None:
    """``root/images/*.png`` with one to three filled boxes on noise, and ``root/annotations.json`` (COCO)."""
    import mmcv
    import numpy as np

    rng = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        img = np.random.default_rng(seed + i).integers(0, 60, (size, size, 3), dtype=np.uint8)
        for _ in range(rng.randint(1, 3)):
            w, h = rng.randint(size // 6, size // 2), rng.randint(size // 6, size // 2)
            x, y = rng.randint(0, size - w - 1), rng.randint(0, size - h - 1)
            img[y : y + h, x : x + w] = [rng.randint(150, 255) for _ in range(3)]
            annotations.append(dict(id=len(annotations) + 1, image_id=i + 1, category_id=1, bbox=[x, y, w, h],
                                    area=w * h, iscrowd=0))  # fmt: skip
        name = f"{i:04d}.png"
        mmcv.imwrite(img, str(root / "images" / name))
        images.append(dict(id=i + 1, file_name=name, width=size, height=size))
    coco = dict(images=images, annotations=annotations, categories=[dict(id=1, name="box")])
    (root / "annotations.json").write_text(json.dumps(coco))


def _first_step_hook(ctx: WorkerContext) -> Any:
    """An mmengine hook that calls ``ctx.first_step_done()`` after the first iteration (mmengine imported here)."""
    from mmengine.hooks import Hook

    class FirstStep(Hook):
        def after_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None, outputs: Any = None) -> None:
            ctx.first_step_done()

    return FirstStep()


ADAPTER = MMDetAdapter()
