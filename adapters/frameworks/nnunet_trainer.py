"""nnU-Net's own trainer with the policy applied. Imported only inside a worker of framework=nnunet.

nnU-Net v2 offers no DDP setting: ``nnUNetTrainer.initialize`` calls ``DDP(self.network,
device_ids=[self.local_rank])`` through the module-level name ``DDP``. The subclass below runs nnU-Net's
``initialize`` unchanged while that name points, for the duration of the call only, at a constructor that
adds the policy's keyword arguments (and drops ``device_ids`` on CPU). The data-augmentation constructor is
handed in the same way when ``pin_memory`` is overridden. No nnU-Net code is copied and no installed file is
edited.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as trainer_module
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


@contextlib.contextmanager
def replaced(module: Any, name: str, value: Any) -> Iterator[None]:
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


class nnUNetTrainerDDPPolicy(nnUNetTrainer):
    """nnUNetTrainer whose DDP wrapper takes the policy's arguments.

    Settings are class attributes set by the adapter before the trainer is built: nnU-Net records
    ``__init__``'s arguments by signature to rebuild a trainer, so the signature stays nnUNetTrainer's.
    """

    ddp_kwargs: dict[str, Any] = {}
    settings: Any = None  # the run's framework node (NNUNetConfig): deep supervision, schedule, pin_memory
    ctx: Any = None  # the rank's WorkerContext: its hooks track_ddp, resolve_unused_params, first_step_done

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # fmt: skip
        super().__init__(plans, configuration, fold, dataset_json, device)
        if device.type != "cuda":
            # nnU-Net assumes cuda whenever a process group exists; on CPU there is neither cuda nor a scaler.
            self.device = device
            self.grad_scaler = None
        settings = self.settings
        self.enable_deep_supervision = settings.deep_supervision
        self.num_epochs = settings.epochs
        self.num_iterations_per_epoch = settings.iterations_per_epoch
        self.num_val_iterations_per_epoch = settings.val_iterations_per_epoch

    def _ddp(self, module: torch.nn.Module, device_ids: list[int] | None = None, **kwargs: Any) -> Any:
        from torch.nn.parallel import DistributedDataParallel

        if self.device.type != "cuda":
            device_ids = None  # a device list is an error for a CPU module
        model = DistributedDataParallel(module, device_ids=device_ids, **{**kwargs, **self.ddp_kwargs})
        return self.ctx.track_ddp(model)

    def initialize(self) -> None:
        with replaced(trainer_module, "DDP", self._ddp):
            super().initialize()

    def on_train_start(self) -> None:
        super().on_train_start()
        if not self.is_ddp:
            return
        inner = self.network.module

        def probe_step(batch: dict) -> None:  # nnU-Net's train_step without autocast, scaler and optimizer
            data = batch["data"].to(self.device, non_blocking=True)
            target = batch["target"]
            target = [t.to(self.device) for t in target] if isinstance(target, list) else target.to(self.device)
            self.loss(inner(data), target).backward()

        decided = self.ctx.resolve_unused_params(inner, iter(self.dataloader_train), probe_step)
        if decided is not None:
            # nnU-Net wrapped the network in initialize(), before there were batches to probe. The optimizer
            # holds the same parameters, so only the wrapper is replaced.
            self.ddp_kwargs = {**self.ddp_kwargs, **decided}
            self.network = None
            self.network = self._ddp(inner, device_ids=[self.local_rank])

    def train_step(self, batch: dict) -> dict:
        result = super().train_step(batch)
        self.ctx.first_step_done()
        return result

    def get_dataloaders(self):
        pin_memory = self.settings.pin_memory
        if pin_memory is None:
            return super().get_dataloaders()
        original = trainer_module.NonDetMultiThreadedAugmenter

        def augmenter(*args: Any, **kwargs: Any) -> Any:
            kwargs["pin_memory"] = pin_memory
            return original(*args, **kwargs)

        with replaced(trainer_module, "NonDetMultiThreadedAugmenter", augmenter):
            return super().get_dataloaders()
