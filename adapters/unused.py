"""The unused-parameter engine of one rank: decide what DDP does with parameters that get no gradient, apply
it to the module, and watch the DDP wrapper the framework builds.

* ``decide(policy, probe, capabilities)`` is pure: from the policy, what the probe saw (or None) and what the
  framework allows, the DDP arguments to add and the parameters to leave out. A table test covers it.
* ``Engine`` does the rest in a rank: runs the probe when the decision needs one, puts the chosen parameters on
  DDP's ignore list, and for each DDP wrapper the framework builds logs the settings DDP really holds, counts
  its steps, guards the parameters left out, checks the replicas, and stops strict right after step 1.

Adapters reach it through ``WorkerContext``'s three hooks: ``resolve_unused_params``, ``track_ddp`` and
``first_step_done``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from .errors import ConfigError
from .policy import Backend, DDPPolicy, UnusedParams


class ProbeDone(Exception):  # noqa: N818 - not an error: how `doctor` stops a rank after the probe
    """Raised in every rank after the probe when only the probe was asked for (``python -m adapters doctor``)."""

    def __init__(self, result: Any):
        super().__init__("probe done")
        self.result = result


@dataclass(frozen=True)
class Capabilities:
    """What a framework lets the engine do."""

    # DDP wraps the very module the probe ran on, so DDP's ignore list (set on that module) applies. False where
    # the framework wraps a module of its own around it (fastNLP's driver): ignore then becomes static_graph.
    can_ignore: bool = True


@dataclass(frozen=True)
class Decision:
    """What this run does with unused parameters, on top of the preset's own DDP arguments."""

    # DDP arguments to add; None: nothing changes (strict stays as translated, no re-wrap needed).
    ddp_kwargs: dict[str, Any] | None = None
    # Parameters to leave out of DDP (reducer names), or, with ``patterns``, ddp.ignore's names and globs.
    leave_out: tuple[str, ...] = ()
    patterns: bool = False
    why: str = ""  # why they are left out (for the guard's message)
    advice: str = ""  # what to do if one of them does get a gradient
    log: tuple[str, ...] = ()  # lines for the rank's log


def needs_probe(policy: DDPPolicy) -> bool:
    """auto, and ignore without names, decide from a probe of the run's real model and batches."""
    return policy.unused_params is UnusedParams.auto or (
        policy.unused_params is UnusedParams.ignore and not policy.ignore
    )


def decide(policy: DDPPolicy, probe: Any, capabilities: Capabilities = Capabilities()) -> Decision:
    """The decision for ``policy`` given the probe's ``ProbeResult`` (None when no probe ran). Pure."""
    choice = policy.unused_params
    if choice not in (UnusedParams.auto, UnusedParams.ignore):
        return Decision()  # strict, find and static are fixed by translate
    steps = policy.probe_steps
    probe_advice = (
        f"To make the choice explicit: ddp=safe (find_unused_parameters=True: any pattern of use), "
        f"or a larger ddp.probe_steps (now {steps}) if the branch shows up within that many steps."
    )
    if choice is UnusedParams.ignore and policy.ignore:
        decision = Decision(
            {}, tuple(policy.ignore), patterns=True, why="they are named in ddp.ignore",
            advice="Fix: take them out of ddp.ignore, or use ddp=safe if they are used only in some steps.",
        )  # fmt: skip
    elif choice is UnusedParams.ignore:
        if probe.sometimes_unused:
            raise ConfigError(
                "ddp=ignore: the probe found parameters unused only in some steps or on some ranks ("
                + ", ".join(probe.sometimes_unused[:6]) + "); leaving them out of DDP would let ranks "
                "drift apart.\nFix: ddp=safe, or ddp=auto (which picks find here)."
            )  # fmt: skip
        decision = Decision({}, tuple(probe.never_used), why=f"ddp=ignore's probe saw them unused in all {steps} of "
                            "its steps", advice=probe_advice)  # fmt: skip
    else:
        chosen, _ = probe.decision()
        summary = (probe.summary_line(),)
        if chosen is UnusedParams.find:
            return Decision({"find_unused_parameters": True}, log=(*summary, *probe.unused_lines()))
        if chosen is UnusedParams.strict:
            return Decision(log=summary)
        why = f"ddp=auto's probe saw them unused in all {steps} of its steps and chose ignore"
        decision = Decision({}, tuple(probe.never_used), log=summary, advice=probe_advice, why=why)
    if not capabilities.can_ignore:
        count = (
            "the parameters named in ddp.ignore are"
            if decision.patterns
            else f"{len(decision.leave_out)} parameters are"
        )
        return Decision({"static_graph": True}, log=(*decision.log, f"{count} unused in every step; this framework "
                        "wraps its own module, so they are handled with static_graph=True"))  # fmt: skip
    return decision


@dataclass
class Engine:
    """The engine in one rank. The process group exists; the framework builds the DDP wrapper."""

    policy: DDPPolicy
    rank: int
    world_size: int
    backend: Backend
    log: logging.Logger
    probe_only: bool = False  # `python -m adapters doctor`: stop with ProbeDone once the probe has run
    ddp_model: Any = None
    probe_result: Any = None
    # Parameters this run left out of DDP (reducer names), and why: the guard watches them.
    left_out: list[str] = field(default_factory=list)
    left_out_spellings: list[str] = field(default_factory=list)  # as added to the module's DDP ignore list
    decision: Decision = field(default_factory=Decision)
    steps: Any = None  # guard.StepCounter on the current DDP wrapper
    guard: Any = None  # guard.IgnoredGradGuard, when parameters are left out
    _flag_group: Any = None
    _checking_first_step: bool = False
    _first_step_seen: bool = False
    _unused_bytes: list[int] = field(default_factory=list)
    _every_steps_hook: Any = None

    def resolve(self, module: Any, batches: Iterator[Any], step: Callable[[Any], None], *,
                can_ignore: bool = True) -> dict[str, Any] | None:  # fmt: skip
        """Probe ``module`` (unwrapped) when needed, decide, and prepare the module for DDP; see
        ``WorkerContext.resolve_unused_params``."""
        from .diagnose import group_by_module
        from .probe import match_ignore, run_probe, set_ignored

        if not (needs_probe(self.policy) or self.probe_only or self.policy.unused_params is UnusedParams.ignore):
            return None
        if self.policy.unused_params is UnusedParams.ignore and self.policy.ignore:
            named = match_ignore(module, list(self.policy.ignore))  # a name that matches nothing stops here
        if needs_probe(self.policy) or self.probe_only:
            own = getattr(module, "_ddp_params_and_buffers_to_ignore", ())  # the model's own list stays as it is
            self.probe_result = run_probe(module, batches, step, self.policy.probe_steps, ignored=own)
            if self.probe_only:
                raise ProbeDone(self.probe_result)
        decision = decide(self.policy, self.probe_result, Capabilities(can_ignore=can_ignore))
        self.decision = decision
        for line in decision.log:
            self.log.info(line)
        if not decision.leave_out:
            return decision.ddp_kwargs
        names = named if decision.patterns else list(decision.leave_out)
        self.left_out_spellings = set_ignored(module, names)
        self.left_out = names
        for module_name, leaves in group_by_module(names).items():
            self.log.info("DDP leaves out %s: %s", module_name, ", ".join(leaves))
        return decision.ddp_kwargs

    def track(self, model: Any) -> Any:
        """Remember the DDP wrapper, log what it holds, count its steps, guard what this run left out of it."""
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
                model, self.left_out, self.steps, on_grad=self.policy.on_ignored_grad, why=self.decision.why,
                advice=self.decision.advice, log=self.log, flag_group=self._cpu_group(),
            )  # fmt: skip
        if self.policy.check_replicas_every and self._every_steps_hook is None:
            self._every_steps_check()
        return model

    def first_step_done(self) -> None:
        """After the first backward: strict stops now, not at step 2's forward."""
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
        if self._unused_bytes and all(b == 0 for b in self._unused_bytes) and self.rank == 0:
            self.log.warning(
                "find_unused_parameters=True found no unused parameters in the steps DDP sampled: "
                "ddp=strict would be faster, or ddp=auto to let the probe decide."
            )

    def set_step(self, step: int) -> None:
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
        if self.rank == 0:
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
        if self.probe_result is not None and needs_probe(self.policy):
            out["probe_steps"] = self.probe_result.steps
            out["probe_choice"] = (self.probe_result.decision()[0].name if self.policy.unused_params is
                                   UnusedParams.auto else "ignore")  # fmt: skip
        return out


def describe_ddp(model: Any) -> dict[str, Any]:
    """The unused-parameter and pass-through settings as DDP really holds them (proof they were applied)."""
    from .native import buffer_sync_kwarg

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
