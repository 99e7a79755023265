"""The adapter contract: every framework module exports ``ADAPTER``, an instance of a subclass of ``Adapter``.

An adapter has two parts:

* ``translate(policy, backend=...)``: a pure function from the DDP policy to the framework's own
  settings (``NativeSettings``). The shared part (DDP's keyword arguments, the debug environment, the
  why-lines) is done here once; each adapter adds only its own (``_translate``). It imports no framework, so
  ``python -m adapters explain`` can print it anywhere, and a table test can check every preset.
* ``run(ctx)``: runs in every worker process after the process group exists; applies those settings to
  the real framework and trains. It calls two hooks of ``ctx``: ``track_ddp`` with each DDP wrapper the
  framework builds, before its first forward (the engine applies the policy to it, in place), and
  ``first_step_done`` after the first backward (from the framework's own callback).
"""

from __future__ import annotations

import abc
import gc
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .native import MemorySettings, NativeSettings, Translation, ddp_kwargs, debug_env, policy_notes
from .policy import Backend, DDPPolicy, MemoryPolicy
from .unused import Engine


@dataclass
class WorkerContext:
    """What a worker process knows when ``Adapter.run`` is called. The process group already exists."""

    rank: int
    local_rank: int
    world_size: int
    backend: Backend
    device: str  # "cpu" or "cuda:<local_rank>"
    run_dir: Path
    framework: Any  # the checked ``framework`` node: an instance of the adapter's schema
    policy: DDPPolicy
    native: NativeSettings
    log: logging.Logger
    memory: MemoryPolicy = field(default_factory=MemoryPolicy)
    # The memory settings the adapter applies (Adapter.memory_settings for this run).
    memory_applied: MemorySettings = field(default_factory=MemorySettings)
    resume: str | None = None  # resume=<run folder>
    probe_only: bool = False  # `python -m adapters doctor`: every rank stops once the probe has run
    engine: Engine = field(init=False)
    _frozen: bool = field(init=False, default=False)  # the garbage collector's freeze after the first step

    def __post_init__(self) -> None:
        self.engine = Engine(self.policy, self.rank, self.world_size, self.backend, self.log, self.probe_only)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device_ids(self) -> list[int] | None:
        """DDP's ``device_ids``: the local GPU, or None on CPU (a list there is an error)."""
        return [self.local_rank] if self.device.startswith("cuda") else None

    @property
    def ddp_model(self) -> Any:
        return self.engine.ddp_model

    @ddp_model.setter
    def ddp_model(self, model: Any) -> None:
        self.engine.ddp_model = model

    def training_facts(self, *, accumulation: bool = False, manual_optimization: bool = False) -> None:
        """What the adapter knows about this run's training that DDP's wrapper cannot show before it fails: gradient
        accumulation, manual optimization. The failure messages' advice takes them into account."""
        self.engine.accumulation = accumulation
        self.engine.manual_optimization = manual_optimization

    def track_ddp(self, model: Any) -> Any:
        """Hand over each DDP wrapper the framework builds (again when it replaces one), before its first forward:
        the policy is applied to it in place (auto decides from its first steps), its errors become parameter
        names, its settings are logged as built, its steps counted, what was left out guarded."""
        return self.engine.track(model)

    def first_step_done(self) -> None:
        """After the first backward, from the framework's own callback.

        Once, what lives (imports, the composed config, the framework's trainer, the model and its final
        DDP wrapper) is kept out of the cyclic garbage collector's full passes. Their cost grows with the
        objects alive and falls on whichever training step triggers one; a rank started here holds more objects
        than the framework's own launch (Hydra, the config), and Lightning's small steps ran 7-14% slower for
        it. Garbage is collected first; this rank's process trains once and exits, and no wrapper is replaced
        after the first step. Not done for ``adapters.api.Policy`` in a user's own script, which may train again.
        """
        if not self._frozen:
            self._frozen = True
            gc.collect()
            gc.freeze()

    def set_step(self, step: int) -> None:
        """The training step a resumed run starts from (messages count steps from the run's start)."""
        self.engine.set_step(step)


class Adapter(abc.ABC):
    """One framework. Subclasses set ``name`` and ``schema`` and implement the two methods."""

    #: The registry key, the conf/framework/<name>.yaml file and the docs page name.
    name: ClassVar[str]
    #: The dataclass that types the ``framework`` node for this framework.
    schema: ClassVar[type]

    def translate(self, policy: DDPPolicy, *, backend: Backend) -> NativeSettings:
        """The framework's own settings for ``policy``. Pure: no framework import, no side effects."""
        env, debug_notes = debug_env(policy, backend)
        own = self._translate(ddp_kwargs(policy), policy, backend)
        return NativeSettings(self.name, own.settings, env, (*own.notes, *policy_notes(policy), *debug_notes),
                              own.snippet)  # fmt: skip

    @abc.abstractmethod
    def _translate(self, kwargs: dict[str, Any], policy: DDPPolicy, backend: Backend) -> Translation:
        """This framework's part: where DDP's keyword arguments ``kwargs`` go, and how a user would write it."""

    @abc.abstractmethod
    def run(self, ctx: WorkerContext) -> dict[str, Any]:
        """Train in this worker with ``ctx.native`` and ``ctx.memory_applied`` applied. Returns a small summary
        (rank 0's is shown)."""

    @abc.abstractmethod
    def memory_settings(self, memory: MemoryPolicy, framework_cfg: Any, *, backend: Backend,
                        world_size: int) -> MemorySettings:  # fmt: skip
        """The framework's own memory settings for ``memory`` and the checked ``framework`` node: only what it
        sets. Pure, like ``translate``: ``explain`` shows it and ``run`` applies it (``ctx.memory_applied``).
        """

    def explain_framework(self, framework_cfg: Any) -> list[str]:
        """Lines for ``explain``: what the adapter changes in the framework besides the DDP policy."""
        return []

    def framework_inits_process_group(self, backend: Backend) -> bool:
        """True where the framework insists on creating the process group itself (default: we create it)."""
        return False

    def check_policy(self, policy: DDPPolicy) -> None:  # noqa: B027 - optional hook, not abstract
        """Refuse, before launch and in ``explain``, a policy this framework has no setting for (default: every
        policy fits). Pure, like ``translate``."""

    def validate(self, framework_cfg: Any) -> None:  # noqa: B027 - optional hook, not abstract
        """Checks of the checked ``framework`` node beyond its schema, run before launch (default: none)."""
