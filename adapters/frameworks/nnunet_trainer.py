"""nnU-Net's own trainers with the policy applied. Imported only inside a worker of framework=nnunet.

nnU-Net v2 offers no DDP setting: ``nnUNetTrainer.initialize`` calls ``DDP(self.network,
device_ids=[self.local_rank])`` through the module-level name ``DDP``. ``with_policy(trainer_class)`` returns a
subclass of any nnU-Net trainer (nnUNetTrainer, a variant such as nnUNetTrainerNoDeepSupervision, or a user's
own subclass) that runs nnU-Net's ``initialize`` unchanged while that name points, for the duration of the call
only, at a constructor that adds the policy's keyword arguments (and drops ``device_ids`` on CPU). No nnU-Net
code is copied and no installed file is edited.

The subclass carries the name of the class it extends: nnU-Net writes ``self.__class__.__name__`` into every
checkpoint (``trainer_name``) and into the output folder's name (``<trainer>__<plans>__<configuration>``), and
its predictor (``nnUNetv2_predict``, ``nnUNetPredictor.initialize_from_trained_model_folder``) looks the class up
by that name. A model trained here is therefore predicted with nnU-Net's own tools, unchanged.
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


class PolicyMixin:
    """The policy on top of any nnU-Net trainer. Settings are class attributes set by the adapter before the
    trainer is built: nnU-Net records ``__init__``'s arguments by signature to rebuild a trainer, so the mixin
    defines no ``__init__`` and the signature stays the trainer's own."""

    ddp_kwargs: dict[str, Any] = {}
    # What the run overrides, applied at the start of initialize(): {"enable_deep_supervision": False, ...};
    # a trainer attribute that is not named keeps the value the trainer's own __init__ gave it.
    overrides: dict[str, Any] = {}
    run_device: Any = None  # torch.device for this rank (cpu on gloo), or None to keep nnU-Net's choice
    pin_memory: bool | None = None  # the augmenter's pin_memory, or None for nnU-Net's choice
    ctx: Any = None  # the rank's WorkerContext (or a user's adapters.api.Policy): track_ddp, first_step_done

    def _ddp(self, module: torch.nn.Module, device_ids: list[int] | None = None, **kwargs: Any) -> Any:
        from torch.nn.parallel import DistributedDataParallel

        if self.device.type != "cuda":
            device_ids = None  # a device list is an error for a CPU module
        model = DistributedDataParallel(module, device_ids=device_ids, **{**kwargs, **self.ddp_kwargs})
        return self.ctx.track_ddp(model)

    def initialize(self) -> None:
        if self.run_device is not None and self.run_device.type != "cuda":
            # nnU-Net assumes cuda whenever a process group exists; on CPU there is neither cuda nor a scaler.
            self.device = self.run_device
            self.grad_scaler = None
        for name, value in self.overrides.items():
            setattr(self, name, value)
        with replaced(trainer_module, "DDP", self._ddp):
            super().initialize()

    def train_step(self, batch: dict) -> dict:
        result = super().train_step(batch)
        self.ctx.first_step_done()
        return result

    def get_dataloaders(self):
        if self.pin_memory is None:
            return super().get_dataloaders()
        original = trainer_module.NonDetMultiThreadedAugmenter

        def augmenter(*args: Any, **kwargs: Any) -> Any:
            kwargs["pin_memory"] = self.pin_memory
            return original(*args, **kwargs)

        with replaced(trainer_module, "NonDetMultiThreadedAugmenter", augmenter):
            return super().get_dataloaders()


def with_policy(trainer_class: type) -> type:
    """``trainer_class`` with the policy applied, under its own name and module (see the module's docstring)."""
    if not (isinstance(trainer_class, type) and issubclass(trainer_class, nnUNetTrainer)):
        raise TypeError(f"{trainer_class!r} is not a subclass of nnU-Net's nnUNetTrainer")
    namespace = {"__module__": trainer_class.__module__, "__qualname__": trainer_class.__qualname__,
                 "__doc__": trainer_class.__doc__}  # fmt: skip
    return type(trainer_class.__name__, (PolicyMixin, trainer_class), namespace)


def find_trainer(spec: str) -> type:
    """The trainer class ``spec`` names: a class name nnU-Net finds itself (in its package, then in the folders of
    ``nnUNet_extTrainer``), or a dotted path to a user's own subclass (``my_pkg.trainers.MyTrainer``)."""
    if "." in spec:
        from ..building import locate

        return locate(spec)
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    return recursive_find_trainer_class_by_name(spec)
