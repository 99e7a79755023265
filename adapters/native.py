"""A policy in a framework's own terms: the pieces every adapter's translation shares, and its result types.

Everything here is pure and imports no framework (not even torch), so ``explain`` prints it anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

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


@dataclass(frozen=True)
class Translation:
    """A framework's own part of a translation; ``Adapter.translate`` adds the shared part."""

    settings: Mapping[str, Any]
    snippet: str
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Setting:
    """One framework setting that ``memory.*`` decides."""

    name: str  # as the framework names it
    value: Any = None  # the value applied
    unchanged: str = ""  # set: the request is not applied, and this says why (the framework's own value stays)
    note: str = ""  # how to read the value, e.g. "global" for a batch size split over the ranks

    def shown(self) -> Any:
        return f"unchanged: {self.unchanged}" if self.unchanged else self.value

    @property
    def label(self) -> str:
        return f"{self.name} ({self.note})" if self.note else self.name


@dataclass(frozen=True)
class MemorySettings:
    """The memory settings an adapter applies: data that ``run`` applies and ``explain`` shows."""

    items: tuple[Setting, ...] = ()

    def get(self, name: str, default: Any = None) -> Any:
        """The value applied to ``name``, or ``default`` where the framework's own stays."""
        for item in self.items:
            if item.name == name and not item.unchanged:
                return item.value
        return default

    def __getitem__(self, name: str) -> Any:
        for item in self.items:
            if item.name == name and not item.unchanged:
                return item.value
        raise KeyError(name)

    def shown(self) -> dict[str, Any]:
        """``{label: value}``, as explain and the run's log show them."""
        return {item.label: item.shown() for item in self.items}

    def line(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.shown().items())


def ddp_kwargs(policy: DDPPolicy) -> dict[str, Any]:
    """DistributedDataParallel keyword arguments for a policy: only what the policy sets.

    Unset pass-through settings are left out so that each framework keeps its own default. For ``auto`` and
    ``ignore`` the unused-parameter part is decided in each run (``unused.decide``) and applied to the wrapper.
    """
    kwargs: dict[str, Any] = {}
    if policy.unused_params is UnusedParams.find:
        kwargs["find_unused_parameters"] = True
    elif policy.unused_params is UnusedParams.static:
        kwargs["static_graph"] = True
    for key in ("broadcast_buffers", "bucket_cap_mb", "gradient_as_bucket_view"):
        value = getattr(policy, key)
        if value is not None:
            kwargs[buffer_sync_kwarg() if key == "broadcast_buffers" else key] = value
    kwargs.update(policy.kwargs)
    return kwargs


def call_args(kwargs: Mapping[str, Any]) -> str:
    """``, key=value`` for each argument, as written in a call after its first argument."""
    return "".join(f", {k}={v!r}" for k, v in kwargs.items())


def buffer_sync_kwarg() -> str:
    """DDP's name for syncing buffers from rank 0 at each forward in the installed torch: torch 2.13 deprecated
    ``broadcast_buffers`` (a FutureWarning in every run) for ``forward_sync_buffers``. Read from the installed
    version, without importing torch. (Unlike ``broadcast_buffers=False``, ``forward_sync_buffers=False``
    still makes the replicas' buffers equal once, when DDP is built.)"""
    import re
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = re.match(r"(\d+)\.(\d+)", version("torch"))
    except PackageNotFoundError:
        found = None
    if found and (int(found.group(1)), int(found.group(2))) >= (2, 13):
        return "forward_sync_buffers"
    return "broadcast_buffers"


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


def policy_notes(policy: DDPPolicy) -> tuple[str, ...]:
    """Why-lines every adapter shows for the run-time choices."""
    if policy.unused_params is UnusedParams.auto:
        return ("ddp=auto: the run's own first ddp.probe_steps training steps decide, on every rank (DDP's reducer "
                "stands aside in them and their gradients are averaged as DDP averages them): strict (nothing "
                "added), ignore (DDP leaves the never-used parameters out, guarded in case a later step uses them) "
                "or find_unused_parameters=True, applied to the framework's own wrapper; the choice and its reason "
                "are logged.",)  # fmt: skip
    if policy.unused_params is UnusedParams.ignore:
        source = (f"ddp.ignore={list(policy.ignore)}" if policy.ignore else
                  "the first ddp.probe_steps training steps (parameters no rank uses)")  # fmt: skip
        return (f"ddp=ignore: DDP leaves out the parameters named by {source}. If one does get a gradient on "
                "some rank, it is averaged across ranks before the optimizer step (ddp.on_ignored_grad=sync) or the "
                "run stops (fail).",)  # fmt: skip
    return ()
