"""From your own training script: a team preset (or any overrides) to each framework's own settings.

``train.py`` is one way to run; teams also keep their own scripts. ``Policy(overrides, framework=...)`` composes
exactly what ``train.py`` would (``preset=...``, ``ddp=...``, ``hydra.searchpath=[...]`` for a team's folder,
with the same checks, shared sources treated as data) and gives the policy in the terms of each framework's
own object:

* torch: ``DistributedDataParallel(model, **policy.ddp_kwargs())``;
* fastNLP: ``Trainer(..., **policy.fastnlp_trainer_kwargs())``;
* MMDetection: ``policy.apply_to_mmengine(cfg)`` on an mmengine ``Config`` before ``Runner.from_cfg(cfg)``;
* nnU-Net: ``policy.nnunet_trainer(nnUNetTrainer)``, a subclass under the trainer's own name;
* Lightning: ``Trainer(strategy=policy.lightning_strategy(), ...)``, Lightning's own ``DDPStrategy`` that hands
  the wrapper it builds to the engine, and names the parameters when DDP stops;
* Accelerate: ``Accelerator(cpu=..., kwargs_handlers=[policy.accelerate_kwargs_handler()])``, then
  ``policy.check_accelerator(accelerator)`` refuses a run where Accelerate set up no DDP;
* the Transformers Trainer: ``TrainingArguments(..., **policy.training_arguments())``, then
  ``policy.attach_to_trainer(trainer)``.

Then, in every rank after ``init_process_group``, the engine does in the script what it does in ``train.py``:
``policy.track(ddp_model)`` (or ``policy.wrap(model)``, which builds the wrapper) on the wrapper before its first
forward applies the preset to it in place. ``ddp=auto`` decides from the script's own first steps, with nothing
run beside them and nothing taken from its data loader; strict stops after the first backward that leaves a
parameter unused, naming it; parameters left out of DDP are guarded. ``policy.finish()`` at the end compares every
rank's parameters and removes the engine's hooks. Nothing here imports a training framework until a framework's
own method is called.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

from .errors import ConfigError
from .native import NativeSettings
from .policy import Backend


class Policy:
    """The composed policy for one framework, and the engine that applies it in this process's rank."""

    def __init__(self, overrides: Sequence[str] = (), *, framework: str = "torch", backend: str | None = None):
        from . import registry
        from .config import compose, resolve_backend, validate

        overrides = [o for o in overrides if not o.startswith("framework=")]
        checked = validate(compose([f"framework={framework}", *overrides]), for_run=False)
        if checked.framework != framework:
            raise ConfigError(
                f"the overrides choose framework={checked.framework}, not framework={framework}: a preset for another "
                f"framework.\nFix: Policy(..., framework='{checked.framework}')."
            )
        self.checked = checked
        self.framework = framework
        self.policy = checked.policy
        if backend is None:
            self.backend = resolve_backend(checked.launcher.backend, checked.launcher.nproc)
        else:
            self.backend = Backend[backend]
        self.native: NativeSettings = registry.load_adapter(framework).translate(self.policy, backend=self.backend)
        self._engine: Any = None

    # --- the translation, per framework (pure) ----------------------------------------------------------

    def ddp_kwargs(self) -> dict[str, Any]:
        """DistributedDataParallel keyword arguments the preset fixes (auto and ignore add theirs in prepare)."""
        from .native import ddp_kwargs

        return ddp_kwargs(self.policy)

    def fastnlp_trainer_kwargs(self) -> dict[str, Any]:
        """``fastNLP.Trainer(...)`` keyword arguments: ``torch_kwargs={'ddp_kwargs': ...}``."""
        self._expect("fastnlp")
        return {"torch_kwargs": {"ddp_kwargs": self.ddp_kwargs()}}

    def apply_to_mmengine(self, cfg: Any) -> list[str]:
        """Write the policy into an mmengine ``Config`` (``model_wrapper_cfg``, launcher, dist backend), as
        ``train.py`` does. Returns one line for each setting in ``cfg`` that was replaced or that mmengine would
        ignore."""
        self._expect("mmdet")
        from .frameworks.mmdet import apply_policy, ignored_settings

        return ignored_settings(cfg, self.policy) + apply_policy(cfg, self.native, self.policy)

    def nnunet_trainer(self, trainer_class: type) -> type:
        """``trainer_class`` (nnUNetTrainer, a variant, or your own subclass) with the policy's DDP arguments,
        under its own name, so nnU-Net's predictor finds what it trains. The DDP wrapper nnU-Net builds goes to
        the engine, as in ``train.py``."""
        self._expect("nnunet")
        from .frameworks.nnunet import overrides
        from .frameworks.nnunet_trainer import with_policy

        cls = with_policy(trainer_class)
        cls.ddp_kwargs = dict(self.native.settings["ddp_kwargs"])
        cls.overrides = overrides(self.checked.framework_cfg, synthetic=False)  # framework.* keys that were set
        cls.pin_memory = self.checked.framework_cfg.pin_memory
        cls.ctx = self
        return cls

    def lightning_strategy(self, **kwargs: Any) -> Any:
        """``lightning.Trainer(strategy=...)``: Lightning's ``DDPStrategy`` (a subclass) with the preset's DDP
        keywords and ``process_group_backend``; ``kwargs`` go to ``DDPStrategy`` too (and win). The wrapper Lightning
        builds goes to the engine (auto decides from the fit's first steps); strict stops after the first backward
        that leaves a parameter unused; a DDP error names the parameters. Imports Lightning."""
        self._expect("lightning")
        from .frameworks.lightning_parts import PolicyDDPStrategy

        return PolicyDDPStrategy(hooks=self, **{**self.native.settings["strategy"]["init_args"], **kwargs})

    def accelerate_kwargs_handler(self, ddp_kwargs: dict[str, Any] | None = None) -> Any:
        """``accelerate.DistributedDataParallelKwargs`` for the preset (or for ``ddp_kwargs``, such as what
        ``prepare`` returned for auto). Imports Accelerate."""
        self._expect("accelerate", "transformers")
        from accelerate import DistributedDataParallelKwargs

        from .frameworks.hf_parts import handler_kwargs

        return DistributedDataParallelKwargs(**handler_kwargs(self.ddp_kwargs() if ddp_kwargs is None else ddp_kwargs))

    def check_accelerator(self, accelerator: Any) -> None:
        """Raise unless ``accelerator`` (or Accelerate's state) really runs DDP over every process of this job:
        torchrun with a plain ``Accelerator()`` on a machine without a GPU trains each rank alone."""
        import os

        import torch.distributed as dist

        from .frameworks.hf_parts import check_distributed

        names = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "SLURM_NTASKS")
        world = max([int(os.environ[n]) for n in names if os.environ.get(n, "").isdigit()] or [1])
        if dist.is_available() and dist.is_initialized():
            world = max(world, dist.get_world_size())
        state = getattr(accelerator, "state", accelerator)
        check_distributed(state, world, "Accelerate")

    def training_arguments(self, ddp_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
        """``TrainingArguments`` ddp_* fields for the preset (or ``ddp_kwargs``); ``ddp_find_unused_parameters`` is
        always written (left unset, the Trainer turns the search on for every model)."""
        self._expect("transformers")
        from .frameworks.hf_parts import training_arguments

        return training_arguments(self.ddp_kwargs() if ddp_kwargs is None else ddp_kwargs)

    # --- the engine, in a rank (after init_process_group) -------------------------------------------------

    @property
    def engine(self) -> Any:
        if self._engine is None:
            import torch.distributed as dist

            from .unused import Engine

            if not dist.is_initialized():
                raise RuntimeError("Policy.prepare/track need the process group: call init_process_group first.")
            self._engine = Engine(self.policy, dist.get_rank(), dist.get_world_size(), self.backend,
                                  logging.getLogger("adapters"))  # fmt: skip
        return self._engine

    def wrap(self, model: Any, **kwargs: Any) -> Any:
        """``DistributedDataParallel(model, device_ids=<this rank's GPU, or None on CPU>, **the preset's DDP arguments,
        **kwargs)``, handed to the engine (``track``)."""
        import torch
        from torch.nn.parallel import DistributedDataParallel

        device_ids = None
        if self.backend is Backend.nccl and torch.cuda.is_available():
            device_ids = [torch.cuda.current_device()]
        return self.track(DistributedDataParallel(model, device_ids=device_ids, **{**self.ddp_kwargs(), **kwargs}))

    def track(self, ddp_model: Any) -> Any:
        """Hand over the DDP wrapper before its first forward: the preset is applied to it in place (auto decides
        from the first steps), its errors name the parameters, what is left out of it is guarded."""
        return self.engine.track(ddp_model)

    track_ddp = track  # the name nnU-Net's trainer and Lightning's strategy call

    def training_facts(self, *, accumulation: bool = False, manual_optimization: bool = False) -> None:
        """Gradient accumulation, manual optimization: facts the failure messages' advice takes into account."""
        self.engine.accumulation = accumulation
        self.engine.manual_optimization = manual_optimization

    def first_step_done(self) -> None:
        """Kept for scripts that call it after the first backward: the engine's checks need no callback."""

    def attach_to_trainer(self, trainer: Any) -> None:
        """The Transformers ``Trainer``: its DDP wrapper, built inside ``train()``, goes to the engine when training
        begins. Imports transformers."""
        from transformers import TrainerCallback

        policy = self

        class TrackWrapper(TrainerCallback):
            def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                policy.track(trainer.model_wrapped)

        trainer.add_callback(TrackWrapper())

    def finish(self) -> None:
        """At the end, on every rank: compare the replicas (raises on every rank if they differ), say whether
        find_unused_parameters found anything, and take the engine's hooks off the wrapper.

        Then a moment without the GIL: gloo's worker threads still hold the last collectives' work (and its
        tensors) for a moment after the work completes; a tensor they free once the script's own references are
        gone needs the GIL, and during the interpreter's shutdown taking it aborts the process ("terminate called
        without an active exception") after a run that finished well. Call ``dist.destroy_process_group()``
        after this, as torch asks."""
        if self._engine is None:
            return
        import gc
        import time

        try:
            self._engine.after_run()
        finally:
            self._engine.release()
            gc.collect()
            time.sleep(0.05)

    def check_replicas(self, when: str = "at the end of the run") -> None:
        """Every rank compares its parameters with rank 0's; raises on every rank if they differ."""
        self.engine.check_replicas(when)

    def _expect(self, *frameworks: str) -> None:
        if self.framework not in frameworks:
            raise ConfigError(f"this Policy is for framework={self.framework}; create it with "
                              f"framework='{frameworks[0]}'.")  # fmt: skip
