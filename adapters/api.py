"""From your own training script: a team preset (or any overrides) to each framework's own settings.

``train.py`` is one way to run; teams also keep their own scripts. ``Policy(overrides, framework=...)`` composes
exactly what ``train.py`` would (``preset=...``, ``ddp=...``, ``hydra.searchpath=[...]`` for a team's folder,
with the same checks, shared sources treated as data) and gives the policy in the terms of each framework's
own object:

* torch: ``DistributedDataParallel(model, **policy.ddp_kwargs())``;
* fastNLP: ``Trainer(..., **policy.fastnlp_trainer_kwargs())``;
* MMDetection: ``policy.apply_to_mmengine(cfg)`` on an mmengine ``Config`` before ``Runner.from_cfg(cfg)``;
* nnU-Net: ``policy.nnunet_trainer(nnUNetTrainer)``, a subclass under the trainer's own name;
* Lightning: ``Trainer(strategy=policy.lightning_strategy(), ...)``, Lightning's own ``DDPStrategy`` that also
  runs the probe right before Lightning wraps the module, and names the parameters when DDP stops;
* Accelerate: ``Accelerator(cpu=..., kwargs_handlers=[policy.accelerate_kwargs_handler()])``, then
  ``policy.check_accelerator(accelerator)`` refuses a run where Accelerate set up no DDP;
* the Transformers Trainer: ``TrainingArguments(..., **policy.training_arguments())``.

For ``ddp=auto`` and ``ddp=ignore`` the decision needs the run's model and batches: after
``init_process_group``, ``policy.prepare(module, batches, step)`` runs the probe on every rank (as ``train.py``
does) and returns the DDP arguments it decided; ``policy.track(ddp_model)`` then adds the guard for parameters
left out, and ``policy.check_replicas()`` compares every rank's parameters at the end. Nothing here imports a
training framework until a framework's own method is called.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterator, Sequence

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
        under its own name, so nnU-Net's predictor finds what it trains. For auto and ignore the probe runs
        before the first epoch, as in ``train.py``."""
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
        keywords and ``process_group_backend``; ``kwargs`` go to ``DDPStrategy`` too (and win). For auto and
        ignore the probe runs on the real LightningModule and its training batches right before Lightning wraps
        it; strict stops after the first backward; a DDP error names the parameters. Imports Lightning."""
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

    def prepare(self, module: Any, batches: Iterator[Any], step: Callable[[Any], None], *,
                can_ignore: bool = True) -> dict[str, Any]:  # fmt: skip
        """On every rank, before DDP wraps ``module``: the DDP arguments to use, the preset's and what auto or
        ignore decided from a probe of ``step`` (one forward and backward, no optimizer step) on ``batches``."""
        return {**self.ddp_kwargs(), **(self.resolve_unused_params(module, batches, step, can_ignore=can_ignore)
                                        or {})}  # fmt: skip

    def resolve_unused_params(self, module: Any, batches: Iterator[Any], step: Callable[[Any], None], *,
                              can_ignore: bool = True) -> dict[str, Any] | None:  # fmt: skip
        return self.engine.resolve(module, batches, step, can_ignore=can_ignore)

    def track(self, ddp_model: Any) -> Any:
        """Hand over the DDP wrapper: parameters this policy left out of it are guarded, its settings logged."""
        return self.engine.track(ddp_model)

    track_ddp = track  # the name nnU-Net's trainer calls

    def first_step_done(self) -> None:
        """After the first backward: strict stops at step 1 (nothing to do before a DDP wrapper was tracked)."""
        if self._engine is not None:
            self._engine.first_step_done()

    def check_replicas(self, when: str = "at the end of the run") -> None:
        """Every rank compares its parameters with rank 0's; raises on every rank if they differ."""
        self.engine.check_replicas(when)

    def _expect(self, *frameworks: str) -> None:
        if self.framework not in frameworks:
            raise ConfigError(f"this Policy is for framework={self.framework}; create it with "
                              f"framework='{frameworks[0]}'.")  # fmt: skip
