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
from typing import Any, Callable, ClassVar, Iterator, Mapping

from .policy import Backend, DDPPolicy, DebugLevel, MemoryPolicy, UnusedParams


class ProbeDone(Exception):  # noqa: N818 - not an error: how `doctor` stops a rank after the probe
    """Raised in every rank after the probe when only the probe was asked for (``python -m adapters doctor``)."""

    def __init__(self, result: Any):
        super().__init__("probe done")
        self.result = result


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

    Unset pass-through settings are left out so that each framework keeps its own default. For ``auto`` and
    ``ignore`` the unused-parameter part is decided in each run (``WorkerContext.resolve_unused_params``).
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
        return ("ddp=auto: a probe of ddp.probe_steps forward/backward steps on every rank decides in each run: "
                "strict (nothing added), ignore (DDP leaves the never-used parameters out, guarded in case a later "
                "step uses them) or find_unused_parameters=True; the choice and its reason are logged.",)  # fmt: skip
    if policy.unused_params is UnusedParams.ignore:
        source = f"ddp.ignore={list(policy.ignore)}" if policy.ignore else "the probe (parameters no rank uses)"
        return (f"ddp=ignore: DDP leaves out the parameters named by {source}. If one does get a gradient on "
                "some rank, it is averaged across ranks before the optimizer step (ddp.on_ignored_grad=sync) or the "
                "run stops (fail).",)  # fmt: skip
    return ()


def describe_ddp(model: Any) -> dict[str, Any]:
    """The unused-parameter and pass-through settings as DDP really holds them (proof they were applied)."""
    if not hasattr(model, "bucket_bytes_cap"):  # not a DistributedDataParallel (e.g. a per-submodule wrapper)
        return {"wrapper": type(model).__name__}
    return {
        "find_unused_parameters": model.find_unused_parameters,
        "static_graph": model.static_graph,
        buffer_sync_kwarg(): model.__dict__.get("forward_sync_buffers", getattr(model, "broadcast_buffers", None)),
        "bucket_cap_mb": round(model.bucket_bytes_cap / 1024**2, 3),
        "gradient_as_bucket_view": model.gradient_as_bucket_view,
        "ignored": len(getattr(model, "parameters_to_ignore", ())),
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
    memory: MemoryPolicy = field(default_factory=MemoryPolicy)
    # `python -m adapters doctor`: stop every rank with ProbeDone once the probe has run.
    probe_only: bool = False
    probe_result: Any = None
    # Parameters this run left out of DDP (reducer names), and why: the guard watches them.
    left_out: list[str] = field(default_factory=list)
    left_out_spellings: list[str] = field(default_factory=list)  # as added to the module's DDP ignore list
    left_out_why: str = ""
    left_out_advice: str = ""
    steps: Any = None  # guard.StepCounter on the current DDP wrapper
    guard: Any = None  # guard.IgnoredGradGuard, when parameters are left out
    _flag_group: Any = None
    _checking_first_step: bool = False
    _first_step_seen: bool = False
    _unused_bytes: list[int] = field(default_factory=list)
    _every_steps_hook: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device_ids(self) -> list[int] | None:
        """DDP's ``device_ids``: the local GPU, or None on CPU (a list there is an error)."""
        return [self.local_rank] if self.device.startswith("cuda") else None

    def resolve_unused_params(
        self, module: Any, batches: Iterator[Any], step: Callable[[Any], None], *, can_ignore: bool = True
    ) -> dict[str, Any] | None:
        """For auto, ignore and doctor: probe ``module`` (unwrapped) and prepare it for DDP.

        Call it on every rank before DDP wraps ``module``, or before re-wrapping it. Returns the DDP keyword
        arguments to add, or None when nothing changes (strict stays as it is: no re-wrap needed).
        ``can_ignore=False`` where the framework wraps a different module than ``module``: ignore then
        becomes static_graph=True, which also suits parameters unused in every step.
        """
        from .diagnose import group_by_module
        from .probe import match_ignore, run_probe, set_ignored

        choice = self.policy.unused_params
        needs_probe = choice is UnusedParams.auto or (choice is UnusedParams.ignore and not self.policy.ignore)
        if not (needs_probe or self.probe_only or choice is UnusedParams.ignore):
            return None
        result = None
        own = getattr(module, "_ddp_params_and_buffers_to_ignore", ())  # the model's own list stays as it is
        if needs_probe or self.probe_only:
            result = run_probe(module, batches, step, self.policy.probe_steps, ignored=own)
            self.probe_result = result
            if self.probe_only:
                raise ProbeDone(result)
        steps = self.policy.probe_steps
        probe_advice = (
            f"To make the choice explicit: ddp=safe (find_unused_parameters=True: any pattern of use), "
            f"or a larger ddp.probe_steps (now {steps}) if the branch shows up within that many steps."
        )
        if choice is UnusedParams.ignore:
            if self.policy.ignore:
                names = match_ignore(module, list(self.policy.ignore))
                self.left_out_why = "they are named in ddp.ignore"
                self.left_out_advice = ("Fix: take them out of ddp.ignore, or use ddp=safe if they are used only in "
                                        "some steps.")  # fmt: skip
            else:
                if result.sometimes_unused:
                    from .errors import ConfigError

                    raise ConfigError(
                        "ddp=ignore: the probe found parameters unused only in some steps or on some ranks ("
                        + ", ".join(result.sometimes_unused[:6]) + "); leaving them out of DDP would let ranks "
                        "drift apart.\nFix: ddp=safe, or ddp=auto (which picks find here)."
                    )  # fmt: skip
                names = result.never_used
                self.left_out_why = f"ddp=ignore's probe saw them unused in all {steps} of its steps"
                self.left_out_advice = probe_advice
        else:
            decided, _ = result.decision()
            self.log.info(result.summary_line())
            if decided is UnusedParams.find:
                for line in result.unused_lines():
                    self.log.info(line)
                return {"find_unused_parameters": True}
            if decided is UnusedParams.strict:
                return None  # the setting already in place
            names = result.never_used
            self.left_out_why = f"ddp=auto's probe saw them unused in all {steps} of its steps and chose ignore"
            self.left_out_advice = probe_advice
        if not can_ignore:
            self.log.info("%d parameters are unused in every step; this framework wraps its own module, so they are "
                          "handled with static_graph=True", len(names))  # fmt: skip
            return {"static_graph": True}
        self.left_out_spellings = set_ignored(module, names)
        self.left_out = list(names)
        for module_name, leaves in group_by_module(names).items():
            self.log.info("DDP leaves out %s: %s", module_name, ", ".join(leaves))
        return {}

    def first_step_done(self) -> None:
        """Adapters call this once, after the first backward: strict stops now, not at step 2's forward."""
        if self._first_step_seen:
            return
        self._first_step_seen = True
        model = self.ddp_model
        if model is None or not hasattr(model, "reducer"):
            return
        if not model.find_unused_parameters and not model.static_graph:
            self._checking_first_step = True
            model._check_reducer_finalized()
            self._checking_first_step = False
        self._unused_bytes_sample()

    def _unused_bytes_sample(self) -> None:
        # DDP's logger records unused_parameter_size at the forward after a step: absent after step 1.
        model = self.ddp_model
        if model is not None and getattr(model, "find_unused_parameters", False):
            size = model._get_ddp_logging_data().get("unused_parameter_size")
            if size is not None:
                self._unused_bytes.append(size)

    def after_run(self) -> None:
        """Compare the replicas; with find, say so when DDP found nothing unused (strict would be faster)."""
        if self.policy.check_replicas and self.ddp_model is not None and self.world_size > 1:
            self.check_replicas("at the end of the run")
        self._unused_bytes_sample()
        if self._unused_bytes and all(b == 0 for b in self._unused_bytes) and self.is_main:
            self.log.warning(
                "find_unused_parameters=True found no unused parameters in the steps DDP sampled: "
                "ddp=strict would be faster, or ddp=auto to let the probe decide."
            )

    def track_ddp(self, model: Any) -> Any:
        """Remember the DDP-wrapped model so its errors can be explained with parameter names, log the
        settings DDP really holds, count its steps, and guard the parameters this run left out of it.

        Adapters call it again when they replace the wrapper; the hooks on the previous one are removed.
        """
        from .guard import IgnoredGradGuard, StepCounter

        start = self.steps.steps if self.steps is not None else 0
        for hooked in (self.guard, self.steps):
            if hooked is not None:
                hooked.remove()
        self.guard = None
        self.ddp_model = model
        self.log.info("DDP as built: %s", ", ".join(f"{k}={v}" for k, v in describe_ddp(model).items()))
        if not hasattr(model, "register_forward_pre_hook") or not hasattr(model, "require_backward_grad_sync"):
            self.steps = None
            return model
        self.steps = StepCounter(model, start)
        ignored = getattr(model, "parameters_to_ignore", ())
        if self.left_out and any(name in ignored for name in self.left_out):
            self.guard = IgnoredGradGuard(
                model, self.left_out, self.steps, on_grad=self.policy.on_ignored_grad, why=self.left_out_why,
                advice=self.left_out_advice, log=self.log, flag_group=self._cpu_group(),
            )  # fmt: skip
        if self.policy.check_replicas_every and self._every_steps_hook is None:
            self._every_steps_check()
        return model

    def set_step(self, step: int) -> None:
        """The training step a resumed run starts from (messages count steps from the run's start)."""
        if self.steps is not None:
            self.steps.steps = step

    def _cpu_group(self) -> Any:
        """A gloo group for the guard's per-step flags: on nccl runs they then never wait for the GPU."""
        if self.backend is not Backend.nccl:
            return None
        if self._flag_group is None:
            from datetime import timedelta

            import torch.distributed as dist

            # The same patience as the main group (ddp.timeout_s); gloo must reach the other nodes too
            # (GLOO_SOCKET_IFNAME names the interface where hostnames do not resolve to it).
            timeout = {"timeout": timedelta(seconds=self.policy.timeout_s)} if self.policy.timeout_s else {}
            self._flag_group = dist.new_group(backend="gloo", **timeout)
        return self._flag_group

    def check_replicas(self, when: str) -> None:
        """Every rank compares its parameters with rank 0's; raises ReplicasDiffer on every rank if they differ."""
        from .replicas import ReplicasDiffer, buffers_note, compare, failure_message

        report = compare(self.ddp_model.module, left_out_by_us=self.left_out_spellings,
                         group=getattr(self.ddp_model, "process_group", None))  # fmt: skip
        if not report.equal:
            raise ReplicasDiffer(failure_message(report, when), list(report.params_differ))
        if self.is_main:
            self.log.info("replicas equal %s: %d parameters and buffers compared across %d ranks", when,
                          report.compared - len(report.buffers_differ), self.world_size)  # fmt: skip
            if report.buffers_differ:
                self.log.info(buffers_note(report))
            if report.skipped:
                self.log.info("not compared: %d tensors the model's own code leaves out of DDP (%s)",
                              len(report.skipped), ", ".join(report.skipped[:4]))  # fmt: skip

    def _every_steps_check(self) -> None:
        """``ddp.check_replicas_every``: a check after every N-th optimizer step, whichever framework steps it."""
        from torch.optim.optimizer import register_optimizer_step_post_hook

        every = self.policy.check_replicas_every
        count = [0]
        steps_model: dict[int, bool] = {}  # optimizer -> whether it holds the model's parameters

        def after_step(optimizer: Any, *_: Any) -> None:
            # Only optimizers of the model count: one stepped on some ranks only must not start a collective.
            if self.ddp_model is None:
                return
            if id(optimizer) not in steps_model:
                mine = {id(p) for p in self.ddp_model.module.parameters()}
                steps_model[id(optimizer)] = any(id(p) in mine for g in optimizer.param_groups for p in g["params"])
            if not steps_model[id(optimizer)]:
                return
            count[0] += 1
            if count[0] % every == 0:
                self.check_replicas(f"after optimizer step {count[0]}")

        self._every_steps_hook = register_optimizer_step_post_hook(after_step)

    def failure_context(self) -> dict[str, Any]:
        """What a failure message needs to know about this run's choices: the step, and whether a probe decided."""
        out: dict[str, Any] = {}
        if self.steps is not None:
            # DDP reports parameters a step left unused at the next step's forward (counted already), except
            # the check right after step 1's backward.
            out["step"] = self.steps.steps if self._checking_first_step else max(self.steps.steps - 1, 1)
        decided_by_probe = self.probe_result is not None and (
            self.policy.unused_params is UnusedParams.auto
            or (self.policy.unused_params is UnusedParams.ignore and not self.policy.ignore)
        )
        if decided_by_probe:
            out["probe_steps"] = self.probe_result.steps
            out["probe_choice"] = (self.probe_result.decision()[0].name if self.policy.unused_params is
                                   UnusedParams.auto else "ignore")  # fmt: skip
        return out


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

    @abc.abstractmethod
    def memory_settings(self, memory: MemoryPolicy, framework_cfg: Any, *, backend: Backend,
                        world_size: int) -> dict[str, Any]:  # fmt: skip
        """The framework's own memory settings for ``memory``: only what it sets (None keeps the framework's).

        Pure, like ``translate``: ``explain`` prints it and ``run`` applies it.
        """

    def explain_framework(self, framework_cfg: Any) -> list[str]:
        """Lines for ``explain``: what the adapter changes in the framework besides the DDP policy."""
        return []

    def framework_inits_process_group(self, backend: Backend) -> bool:
        """True where the framework insists on creating the process group itself (default: we create it)."""
        return False

    def validate(self, framework_cfg: Any) -> None:  # noqa: B027 - optional hook, not abstract
        """Checks of the ``framework`` node beyond its schema, run before launch (default: none)."""
