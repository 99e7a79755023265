"""The adapter contract: every framework module exports ``ADAPTER``, an instance of a subclass of ``Adapter``.

An adapter has two parts:

* ``translate(policy, backend=...)``: a pure function from the DDP policy to the framework's own
  settings (``NativeSettings``). It imports no framework, so ``python -m adapters explain`` can print it
  anywhere, and a table test can check every preset.
* ``run(ctx)``: runs in every worker process after the process group exists; applies those settings to
  the real framework and trains. It hands the DDP-wrapped model to ``ctx.track_ddp`` as soon as it
  exists, so that DDP's errors can be turned into parameter names.
"""

from __future__ import annotations

import abc
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping

from .policy import Backend, DDPPolicy, DebugLevel, UnusedParams


@dataclass(frozen=True)
class NativeSettings:
    """What a policy means for one framework, in that framework's own terms."""

    framework: str
    # The settings the adapter applies, keyed as the framework names them.
    settings: Mapping[str, Any]
    # Environment variables set in every rank before the process group is created.
    env: Mapping[str, str] = field(default_factory=dict)
    # Why-lines for the user (e.g. a debug level lowered for gloo).
    notes: tuple[str, ...] = ()
    # How a user would write the same settings by hand in that framework.
    snippet: str = ""


def ddp_kwargs(policy: DDPPolicy) -> dict[str, Any]:
    """DistributedDataParallel keyword arguments for a policy: only what the policy sets.

    Unset pass-through settings are left out so that each framework keeps its own default.
    """
    kwargs: dict[str, Any] = {}
    if policy.unused_params is UnusedParams.find:
        kwargs["find_unused_parameters"] = True
    elif policy.unused_params is UnusedParams.static:
        kwargs["static_graph"] = True
    for key in ("broadcast_buffers", "bucket_cap_mb", "gradient_as_bucket_view"):
        value = getattr(policy, key)
        if value is not None:
            kwargs[key] = value
    kwargs.update(policy.kwargs)
    return kwargs


def debug_env(policy: DDPPolicy, backend: Backend) -> tuple[dict[str, str], tuple[str, ...]]:
    """``TORCH_DISTRIBUTED_DEBUG`` for a policy on a backend, and a note when it had to be lowered."""
    if policy.debug is DebugLevel.off:
        return {}, ()
    if policy.debug is DebugLevel.detail and backend is not Backend.nccl:
        return {"TORCH_DISTRIBUTED_DEBUG": "INFO"}, (
            "ddp.debug=detail: TORCH_DISTRIBUTED_DEBUG=DETAIL crashes inside DDP's constructor on gloo "
            "(segfault, torch 2.13/2.14 CPU), so gloo runs use INFO, which still names the parameters "
            "that got no gradient. DETAIL is used on nccl.",
        )
    return {"TORCH_DISTRIBUTED_DEBUG": policy.debug.name.upper()}, ()


def describe_ddp(model: Any) -> dict[str, Any]:
    """The unused-parameter and pass-through settings as DDP really holds them (proof they were applied)."""
    if not hasattr(model, "bucket_bytes_cap"):  # not a DistributedDataParallel (e.g. a per-submodule wrapper)
        return {"wrapper": type(model).__name__}
    return {
        "find_unused_parameters": model.find_unused_parameters,
        "static_graph": model.static_graph,
        "broadcast_buffers": model.broadcast_buffers,
        "bucket_cap_mb": round(model.bucket_bytes_cap / 1024**2, 3),
        "gradient_as_bucket_view": model.gradient_as_bucket_view,
    }


@dataclass
class WorkerContext:
    """What a worker process knows when ``Adapter.run`` is called. The process group already exists."""

    rank: int
    local_rank: int
    world_size: int
    backend: Backend
    device: str  # "cpu" or "cuda:<local_rank>"
    run_dir: Path
    # The resolved config as plain containers: {"framework": ..., "ddp": ..., "launcher": ...}.
    cfg: Mapping[str, Any]
    policy: DDPPolicy
    native: NativeSettings
    log: logging.Logger
    ddp_model: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device_ids(self) -> list[int] | None:
        """DDP's ``device_ids``: the local GPU, or None on CPU (a list there is an error)."""
        return [self.local_rank] if self.device.startswith("cuda") else None

    def track_ddp(self, model: Any) -> Any:
        """Remember the DDP-wrapped model so its errors can be explained with parameter names, and log
        the settings DDP really holds."""
        self.ddp_model = model
        self.log.info("DDP as built: %s", ", ".join(f"{k}={v}" for k, v in describe_ddp(model).items()))
        return model


class Adapter(abc.ABC):
    """One framework. Subclasses set ``name`` and ``schema`` and implement the two methods."""

    #: The registry key, the conf/framework/<name>.yaml file and the docs page name.
    name: ClassVar[str]
    #: The dataclass that types the ``framework`` node for this framework.
    schema: ClassVar[type]

    @abc.abstractmethod
    def translate(self, policy: DDPPolicy, *, backend: Backend) -> NativeSettings:
        """The framework's own settings for ``policy``. Pure: no framework import, no side effects."""

    @abc.abstractmethod
    def run(self, ctx: WorkerContext) -> dict[str, Any]:
        """Train in this worker with ``ctx.native`` applied. Returns a small summary (rank 0's is shown)."""

    def explain_framework(self, framework_cfg: Any) -> list[str]:
        """Lines for ``explain``: what the adapter changes in the framework besides the DDP policy."""
        return []

    def framework_inits_process_group(self, backend: Backend) -> bool:
        """True where the framework insists on creating the process group itself (default: we create it)."""
        return False

    def validate(self, framework_cfg: Any) -> None:  # noqa: B027 - optional hook, not abstract
        """Checks of the ``framework`` node beyond its schema, run before launch (default: none)."""
