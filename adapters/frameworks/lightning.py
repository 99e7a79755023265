"""framework=lightning: PyTorch Lightning 2.6's real ``Trainer``, with the policy in its ``DDPStrategy``.

Lightning takes DDP settings through its strategy: every keyword of ``DDPStrategy(...)`` it does not know goes to
``DistributedDataParallel`` unchanged; the strategy strings ``ddp_find_unused_parameters_true/_false`` set
only that one. Since 2.0 its default is ``find_unused_parameters=False``, so a module with parameters that get
no gradient stops with DDP's error, which Lightning then rewrites into a hint that names no parameter.

The ranks are started by our launcher (or torchrun) with the process group already created; Lightning gets a
cluster environment that says so and starts no process itself (no re-run of the script per rank, which under
Hydra's ``-m`` re-runs the whole sweep in every rank). The strategy (``lightning_parts.PolicyDDPStrategy``)
applies auto and ignore right before Lightning wraps the module, stops strict at step 1 with the parameters
named, and keeps DDP's own message when Lightning would replace it.

Users with their own Lightning script take the strategy from ``adapters.api.Policy(...).lightning_strategy()``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

from ..base import Adapter, WorkerContext
from ..building import check_target, names_in_source, refuse_objects
from ..errors import ConfigError, close_matches
from ..native import MemorySettings, Setting, Translation
from ..policy import Backend, DDPPolicy, MemoryPolicy, UnusedParams, out_of_range

DEMO_MODEL = "adapters.frameworks.lightning_parts.DemoSegmenter"
DEMO_DATA = "adapters.frameworks.lightning_parts.DemoData"
STRATEGY = "lightning.pytorch.strategies.DDPStrategy"
# Trainer arguments the run itself decides: where they come from instead.
OWNED = {
    "strategy": "the DDP policy (ddp=..., ddp.*) decides the strategy",
    "accelerator": "launcher.backend decides it (gloo: cpu, nccl: gpu)",
    "devices": "launcher.nproc decides the processes, one device each",
    "num_nodes": "the launcher decides it (torchrun's --nnodes)",
    "plugins": "the run supplies the cluster environment of the ranks it started",
    "default_root_dir": "every run writes to its own run folder",
    "max_steps": "use framework.max_steps",
    "precision": "use memory.amp (bf16-mixed on CPU, 16-mixed on GPU)",
    "log_every_n_steps": "use framework.log_every",
    "logger": "the run logs to <run folder>/lightning_logs (CSV); build the Trainer in your own script for another",
    "callbacks": "the run adds its own; build the Trainer in your own script for more",
}


@dataclass
class LightningConfig:
    """The ``framework`` node for framework=lightning."""

    name: str = "lightning"
    # Optimizer steps (Trainer(max_steps=...)); epochs follow from the data. null: no step limit, for a schedule by
    # epochs (+framework.trainer.max_epochs=N); setting both is refused (Lightning stops at whichever comes first).
    max_steps: Optional[int] = 20
    # Samples per process per step, handed to the DataModule when its constructor takes ``batch_size``.
    batch_size: int = 16
    # Handed to the module's constructor when it takes ``lr`` and the model node does not set it.
    lr: float = 0.05
    seed: int = 0
    # Rank 0 logs step, loss and throughput every this many steps (also Lightning's log_every_n_steps).
    log_every: int = 5
    # Handed to the module's constructor when it takes ``deep_supervision`` and the model node does not set it.
    # False leaves the demo's coarser heads out of the loss: parameters that get no gradient.
    deep_supervision: bool = True
    # The LightningModule: ``_target_`` plus its constructor arguments.
    model: Dict[str, Any] = field(default_factory=lambda: {"_target_": DEMO_MODEL})
    # The LightningDataModule: ``_target_`` plus its constructor arguments; null: the module's own
    # ``train_dataloader``.
    data: Optional[Dict[str, Any]] = field(default_factory=lambda: {"_target_": DEMO_DATA})
    # More ``lightning.Trainer(...)`` keywords, plain values (max_epochs, gradient_clip_val, accumulate_grad_batches,
    # enable_checkpointing, ...). The strategy, devices and run folder are the run's own.
    trainer: Dict[str, Any] = field(default_factory=dict)
    # Continue from a checkpoint Lightning wrote (Trainer.fit(ckpt_path=...)): weights, optimizer, step, loops.
    ckpt_path: Optional[str] = None


class LightningAdapter(Adapter):
    name = "lightning"
    schema = LightningConfig

    def _translate(self, kwargs: dict[str, Any], policy: DDPPolicy, backend: Backend) -> Translation:
        accelerator = "gpu" if backend is Backend.nccl else "cpu"
        init_args = {**kwargs, "process_group_backend": backend.name}
        args = ", ".join(f"{k}={v!r}" for k, v in init_args.items())
        yaml_args = "".join(f"\n      {k}: {_yaml(v)}" for k, v in init_args.items())
        snippet = (
            f"Trainer(accelerator={accelerator!r}, devices=<processes per node>, strategy=DDPStrategy({args}))\n"
            "# or in a Trainer config file (LightningCLI):\n"
            f"trainer:\n  accelerator: {accelerator}\n  strategy:\n    class_path: {STRATEGY}\n"
            f"    init_args:{yaml_args}"
        )
        notes = ["Lightning's own default (strategy='ddp', since 2.0) is find_unused_parameters=False; "
                 "strategy='ddp_find_unused_parameters_true' is ddp=safe, paid in every step."]  # fmt: skip
        if policy.unused_params is UnusedParams.static:
            notes.append("static_graph=True with manual optimization syncs gradients only from Lightning 2.6.0 on.")
        notes.append("train.py starts the ranks itself and hands Lightning a cluster environment saying so: "
                     "Lightning starts no process (no re-run of the script per rank, nor of a Hydra -m "
                     "sweep).")  # fmt: skip
        settings = {"accelerator": accelerator, "strategy": {"class_path": STRATEGY, "init_args": init_args}}
        return Translation(settings, snippet, tuple(notes))

    def memory_settings(self, memory: MemoryPolicy, fw: LightningConfig, *, backend: Backend,
                        world_size: int) -> MemorySettings:  # fmt: skip
        if fw.data is None:  # the module's own train_dataloader
            own = "framework.data is null: the module's own train_dataloader decides"
            wanted = [
                ("DataModule.batch_size", memory.batch_size),
                ("DataModule.num_workers", memory.num_workers),
                ("DataModule.pin_memory", memory.pin_memory),
            ]
            out = [Setting(name, value, unchanged=own) for name, value in wanted if value is not None]
        else:
            out = [Setting("DataModule.batch_size", memory.batch_size or fw.batch_size, note="per process")]
            if memory.num_workers is not None:
                out.append(Setting("DataModule.num_workers", memory.num_workers))
            if memory.pin_memory is not None:
                out.append(Setting("DataModule.pin_memory", memory.pin_memory))
        if memory.amp is not None:
            precision = ("16-mixed" if backend is Backend.nccl else "bf16-mixed") if memory.amp else "32-true"
            out.append(Setting("Trainer.precision", precision))
        return MemorySettings(tuple(out))

    def explain_framework(self, fw: LightningConfig) -> list[str]:
        lines = [f"Trainer(max_steps={fw.max_steps}, log_every_n_steps={fw.log_every}, default_root_dir=<run folder>"
                 f"{''.join(f', {k}={v!r}' for k, v in fw.trainer.items())})"]  # fmt: skip
        if fw.ckpt_path:
            lines.append(f"Trainer.fit(ckpt_path={fw.ckpt_path!r}): continues Lightning's own checkpoint")
        return lines

    def validate(self, fw: LightningConfig) -> None:
        if fw.max_steps is not None and any(k in fw.trainer for k in ("max_epochs", "min_epochs", "max_time")):
            key = next(k for k in ("max_epochs", "min_epochs", "max_time") if k in fw.trainer)
            raise ConfigError(
                f"framework.trainer.{key}={fw.trainer[key]} and framework.max_steps={fw.max_steps}: Lightning stops at "
                f"whichever limit comes first, so framework.max_steps could cut the schedule short without a word.\n"
                f"Fix: framework.max_steps=null to train by {key}, or drop framework.trainer.{key}."
            )
        for key in ("max_steps", "batch_size", "log_every"):
            if getattr(fw, key) is not None and getattr(fw, key) < 1:
                raise out_of_range(f"framework.{key}", getattr(fw, key), "it must be at least 1",
                                   f"framework.{key}=1 or more")  # fmt: skip
        if not fw.lr > 0:
            raise out_of_range("framework.lr", fw.lr, "the learning rate must be above 0", "framework.lr=0.05")
        for key in fw.trainer:
            if key in OWNED:
                raise ConfigError(f"framework.trainer.{key}: {OWNED[key]}.\nFix: remove it (~framework.trainer.{key}).")
        refuse_objects("framework.trainer", dict(fw.trainer), "remove it, or build the Trainer in your own script "
                       "with adapters.api.Policy(...).lightning_strategy().")  # fmt: skip
        known = names_in_source("lightning", "pytorch/trainer/trainer.py", "Trainer", "__init__")
        unknown = [k for k in fw.trainer if known and k not in known]
        if unknown:
            near = close_matches(unknown[0], known)
            hint = f" Did you mean {', '.join(near)}?" if near else ""
            raise ConfigError(
                f"framework.trainer.{unknown[0]}: lightning.Trainer takes no argument '{unknown[0]}'.{hint}\n"
                f"Fix: remove it (~framework.trainer.{unknown[0]}) or spell one of Trainer's own arguments."
            )
        if fw.model.get("_target_") != DEMO_MODEL:  # the built-in ones exist (and would import Lightning here)
            check_target("framework.model", dict(fw.model), DEMO_MODEL)
        if fw.data is not None and fw.data.get("_target_") != DEMO_DATA:
            check_target("framework.data", dict(fw.data), DEMO_DATA)
        if fw.ckpt_path is not None and not Path(fw.ckpt_path).expanduser().is_file():
            raise ConfigError(
                f"framework.ckpt_path={fw.ckpt_path}: no such file.\nFix: a .ckpt Lightning wrote, such as "
                "'framework.ckpt_path=\"<run folder>/lightning_logs/version_0/checkpoints/epoch=0-step=20.ckpt\"' "
                "(quoted: the name holds '='), or leave it out."
            )

    def run(self, ctx: WorkerContext) -> dict[str, Any]:
        import lightning.pytorch as pl
        import torch
        from lightning.pytorch.loggers import CSVLogger

        from ..building import build
        from .hf_parts import processes_per_node
        from .lightning_parts import PolicyDDPStrategy, ProgressLog, RankEnvironment

        _quiet_lightning()
        fw = ctx.framework
        memory = ctx.memory_applied
        torch.manual_seed(fw.seed)
        module = build("framework.model", fw.model, deep_supervision=fw.deep_supervision, lr=fw.lr)
        data = None
        if fw.data is not None:
            offered = {"batch_size": memory["DataModule.batch_size"], "seed": fw.seed}
            for key in ("num_workers", "pin_memory"):
                if memory.get(f"DataModule.{key}") is not None:
                    offered[key] = memory[f"DataModule.{key}"]
            data = build("framework.data", fw.data, **offered)
        per_node = processes_per_node(ctx.world_size)
        environment = RankEnvironment(ctx.rank, ctx.local_rank, ctx.world_size, per_node)
        settings = ctx.native.settings
        strategy = PolicyDDPStrategy(hooks=ctx, cluster_environment=environment, **settings["strategy"]["init_args"])
        extra = dict(fw.trainer)
        if memory.get("Trainer.precision") is not None:
            extra["precision"] = memory["Trainer.precision"]
        extra.setdefault("enable_model_summary", ctx.is_main)
        trainer = pl.Trainer(
            accelerator=settings["accelerator"], devices=per_node, num_nodes=ctx.world_size // per_node,
            strategy=strategy, max_steps=-1 if fw.max_steps is None else fw.max_steps,
            default_root_dir=str(ctx.run_dir),
            logger=CSVLogger(str(ctx.run_dir), name="lightning_logs"), log_every_n_steps=fw.log_every,
            callbacks=[ProgressLog(ctx.log, fw.log_every, fw.max_steps)], **extra,
        )  # fmt: skip
        if fw.ckpt_path is not None:
            ctx.log.info("continuing Lightning's checkpoint %s (framework.ckpt_path)", fw.ckpt_path)
        trainer.fit(module, datamodule=data, ckpt_path=None if fw.ckpt_path is None else
                    str(Path(fw.ckpt_path).expanduser()))  # fmt: skip
        return {"steps": trainer.global_step, "epochs": trainer.current_epoch}


def _quiet_lightning() -> None:
    """Lightning's messages through the rank's own logging (rank 0's console, every rank's log file) instead of a
    second console handler of its own; tqdm's lock a thread lock (its default, a multiprocessing lock, is never
    released by a rank that ends with os._exit: a "leaked semaphore" warning at the end of every run)."""
    import logging
    import warnings

    from .hf_parts import thread_lock_for_tqdm

    thread_lock_for_tqdm()
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    # lightning 2.6 on torch 2.13: a deprecation inside Lightning's own code, once per rank, nothing to act on.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


def _yaml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


ADAPTER = LightningAdapter()
