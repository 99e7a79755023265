"""What a run does about parameters without a gradient, decided and applied in one place for every adapter.

``decide(policy, observation)`` is pure: the preset, and for ``auto`` (and ``ignore`` without names) what the
run's own first steps showed (``adapters.observe``), give the choice, the parameters left out of DDP and the
lines to log. ``Engine`` applies it in a rank, to every DDP wrapper the framework builds (``track``), in place:
the framework keeps its wrapper, and the wrapper's reducer is rebuilt when the decision needs it
(``adapters.reducer``). Around each wrapper it also keeps what makes a run loud instead of wrong:

* strict stops after step 1's backward, naming the parameters, not at step 2's forward (a check queued at the
  end of that backward, after DDP's own), and at any later step before the forward runs;
* ``static_graph=True`` with gradient accumulation: torch records the graph in the reducer's first iteration
  and asserts (``expect_autograd_hooks_``) when that iteration is a micro-step under ``no_sync``; the reducer is
  then built without it until the first synchronised forward, and with it from there, which torch accepts;
* a parameter that was frozen when DDP built its reducer and is trainable now (a fine-tuning callback that
  unfreezes a backbone) would never be reduced: the reducer is rebuilt with it before that step, and the
  change is named;
* parameters left out of DDP are guarded (``adapters.guard``); the replicas are compared at the end.

Adapters reach it through ``WorkerContext``: ``track_ddp`` for each wrapper, ``first_step_done`` after the first
backward (kept for the garbage collector's freeze; the engine's own checks need no callback).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError
from .policy import Backend, DDPPolicy, UnusedParams


class ProbeDone(Exception):  # noqa: N818 - not an error: how `doctor` stops a rank after the observed steps
    """Raised in every rank once the observed steps are done, when only they were asked for (``doctor``)."""

    def __init__(self, result: Any):
        super().__init__("observation done")
        self.result = result


@dataclass(frozen=True)
class Decision:
    """What this run does with unused parameters, on top of the preset's own DDP arguments."""

    choice: UnusedParams = UnusedParams.strict  # strict | ignore | find: how the reducer is (re)built
    leave_out: tuple[str, ...] = ()  # reducer names to leave out of DDP (ignore)
    why: str = ""  # why they are left out (for the guard's message)
    advice: str = ""  # what to do if one of them does get a gradient
    log: tuple[str, ...] = ()  # lines for the rank's log


def needs_observation(policy: DDPPolicy) -> bool:
    """auto, and ignore without names, decide from the run's own first steps."""
    return policy.unused_params is UnusedParams.auto or (
        policy.unused_params is UnusedParams.ignore and not policy.ignore
    )


def decide(policy: DDPPolicy, observation: Any) -> Decision:
    """The decision for ``policy`` (auto, or ignore without names) given what the first steps showed. Pure."""
    steps = policy.probe_steps
    advice = (
        "To make the choice explicit: ddp=safe (find_unused_parameters=True: any pattern of use), or a larger "
        f"ddp.probe_steps (now {steps}) if the branch shows up within that many steps."
    )
    if policy.unused_params is UnusedParams.ignore:
        if observation.changed and not observation.reentrant:
            shown = ", ".join(observation.sometimes_unused[:6])
            raise ConfigError(
                f"ddp=ignore: in the first {observation.steps} training steps some parameters were unused only in "
                f"some steps or on some ranks ({shown}); the reducer would wait for them in the other steps.\n"
                "Fix: ddp=safe, ddp=auto (which picks find here), or name every parameter to leave out: "
                f"ddp.ignore=[{','.join(observation.never_used + observation.sometimes_unused)[:300]}]."
            )
        return Decision(UnusedParams.ignore, tuple(observation.leave_out()), advice=advice,
                        why=f"ddp=ignore saw them unused in all {observation.steps} of its observed steps")  # fmt: skip
    chosen, _ = observation.decision()
    summary = (observation.summary_line(),)
    if chosen is UnusedParams.find:
        return Decision(UnusedParams.find, log=(*summary, *observation.unused_lines()))
    if chosen is UnusedParams.strict:
        return Decision(UnusedParams.strict, log=summary)
    why = f"ddp=auto saw them unused in all {observation.steps} of its observed steps and chose ignore"
    if observation.changed:
        why = f"ddp=auto saw them unused in some of its {observation.steps} observed steps (reentrant checkpointing)"
    return Decision(UnusedParams.ignore, tuple(observation.leave_out()), log=summary, advice=advice, why=why)


@dataclass
class Engine:
    """The engine in one rank. The process group exists; the framework builds the DDP wrapper."""

    policy: DDPPolicy
    rank: int
    world_size: int
    backend: Backend
    log: logging.Logger
    probe_only: bool = False  # `python -m adapters doctor`: stop with ProbeDone once the observed steps are done
    ddp_model: Any = None
    observation: Any = None  # adapters.observe.Observation, once the first steps decided
    decision: Decision | None = None
    # Parameters this run left out of DDP (reducer names), and the spellings added to the module's ignore list.
    left_out: list[str] = field(default_factory=list)
    left_out_spellings: list[str] = field(default_factory=list)
    order: list[str] = field(default_factory=list)  # the reducer's parameters as built, in its order
    # Facts the adapter knows (for the advice): gradient accumulation is configured, manual optimization.
    accumulation: bool = False
    manual_optimization: bool = False
    steps: Any = None  # guard.StepCounter on the current DDP wrapper
    guard: Any = None  # guard.IgnoredGradGuard, when parameters are left out
    observer: Any = None  # observe.FirstSteps while the first steps are observed
    reentrant: bool = False
    _flag_group: Any = None
    _pending: bool = False  # the decision is to be applied before the next training forward
    _static_after_micro_steps: bool = False  # static_graph=True is restored at the first synchronised forward
    _checking: bool = False  # the reducer's finalisation is being checked (after step 1's backward)
    _first_check_armed: Any = None
    _trainable: list[Any] = field(default_factory=list)  # parameters the reducer holds (requires_grad at build)
    _frozen: list[tuple[str, Any]] = field(default_factory=list)  # not in the reducer: frozen at build
    _forwards_since_build: int = 0
    _synced_since_build: int = 0
    _find_saw_unused: bool = False
    _find_samples: int = 0
    _every_steps_hook: Any = None

    # --- each DDP wrapper the framework builds -------------------------------------------------------

    def track(self, model: Any) -> Any:
        """Take over a DDP wrapper the framework built (again when it builds another): apply the policy to it in
        place, watch its steps, guard what is left out of it."""
        from .guard import StepCounter

        start = self.steps.steps if self.steps is not None else 0
        self._unhook()
        self.ddp_model = model
        if not hasattr(model, "reducer") or not hasattr(model, "require_backward_grad_sync"):
            self.log.info("DDP as built: %s (not a DistributedDataParallel: the policy does not apply)",
                          type(model).__name__)  # fmt: skip
            self.steps = None
            return model
        self.steps = StepCounter(model, start, before=self._before_forward)
        if self.policy.unused_params is UnusedParams.ignore and self.policy.ignore and self.decision is None:
            self.decision = self._named_ignore(model.module)
        if self.decision is None and needs_observation(self.policy) and self.observation is None:
            self._observe(model)
        else:
            self._configure(model)
        if self.policy.check_replicas_every and self._every_steps_hook is None:
            self._every_steps_check()
        return model

    def _named_ignore(self, module: Any) -> Decision:
        from .ignorelist import match_ignore

        names = match_ignore(module, list(self.policy.ignore))  # a name that matches nothing stops here
        return Decision(UnusedParams.ignore, tuple(names), why="they are named in ddp.ignore",
                        advice="Fix: take them out of ddp.ignore, or use ddp=safe if they are used only in some "
                        "steps.")  # fmt: skip

    def _observe(self, model: Any) -> None:
        from .observe import FirstSteps

        if model.find_unused_parameters or model.static_graph:  # built by code that set its own
            from .reducer import cannot_rebuild, rebuild

            why = cannot_rebuild(model)
            if why:
                self.log.warning("ddp=%s: DDP was built with find_unused_parameters=%s, static_graph=%s and its "
                                 "reducer cannot be rebuilt (%s): that setting stays", self.policy.unused_params.name,
                                 model.find_unused_parameters, model.static_graph, why)  # fmt: skip
                self._configure(model)
                return

            self.log.warning("ddp=%s: DDP was built with find_unused_parameters=%s, static_graph=%s; the first "
                             "steps decide instead", self.policy.unused_params.name, model.find_unused_parameters,
                             model.static_graph)  # fmt: skip
            rebuild(model, find=False, static=False)
        self._record(model)
        self.observer = FirstSteps(model, self.policy.probe_steps, self._observed, self.log)
        self.log.info("DDP as built: %s; ddp=%s decides from the first %d training step(s)", self._describe(model),
                      self.policy.unused_params.name, self.policy.probe_steps)  # fmt: skip

    def _observed(self, observation: Any) -> None:
        """On every rank, at the end of the last observed backward: decide; apply before the next forward."""
        self.observer = None
        self.observation = observation
        self.reentrant = self.reentrant or observation.reentrant
        if self.probe_only:
            raise ProbeDone(observation)
        self.decision = decide(self.policy, observation)
        for line in self.decision.log:
            self.log.info(line)
        self._pending = True

    def _configure(self, model: Any) -> None:
        """Bring ``model``'s reducer to the decision (or the preset), then record, log and guard it."""
        from .reducer import rebuild

        decision = self.decision
        if decision is not None:
            want_find = decision.choice is UnusedParams.find
            spellings: list[str] = []
            if decision.leave_out:
                from .ignorelist import ignore_spellings

                spellings = ignore_spellings(model.module, list(decision.leave_out))
            missing = [s for s in spellings if s not in model.parameters_to_ignore]
            if missing or bool(model.find_unused_parameters) != want_find or model.static_graph:
                rebuild(model, ignore=missing, find=want_find, static=False)
            own = set(getattr(model.module, "_ddp_params_and_buffers_to_ignore", ())) - set(spellings)
            self.left_out = list(decision.leave_out)
            self.left_out_spellings = [s for s in spellings if s not in own]
            for module_name, leaves in _grouped(self.left_out).items():
                self.log.info("DDP leaves out %s: %s", module_name, ", ".join(leaves))
        self._record(model)
        self.log.info("DDP as built: %s", self._describe(model))
        self._guard(model)
        if not model.find_unused_parameters and not model.static_graph:
            self._arm_first_step_check(model)

    def _record(self, model: Any) -> None:
        """What the reducer holds now, for exact names later, whatever ``requires_grad`` becomes."""
        from .reducer import reducer_names

        self.order = reducer_names(model)
        ignored = model.parameters_to_ignore
        self._trainable, self._frozen = [], []
        for module_name, mod in model.module.named_modules():
            for param_name, param in mod.named_parameters(recurse=False):
                if f"{module_name}.{param_name}" in ignored:
                    continue
                (self._trainable.append(param) if param.requires_grad else
                 self._frozen.append((f"{module_name}.{param_name}".lstrip("."), param)))  # fmt: skip
        self._forwards_since_build = self._synced_since_build = 0

    def _describe(self, model: Any) -> str:
        return ", ".join(f"{k}={v}" for k, v in describe_ddp(model).items())

    def _guard(self, model: Any) -> None:
        from .guard import IgnoredGradGuard

        ignored = model.parameters_to_ignore
        if self.left_out and any(name in ignored for name in self.left_out):
            decision = self.decision or Decision()
            self.guard = IgnoredGradGuard(
                model, self.left_out, self.steps, on_grad=self.policy.on_ignored_grad, why=decision.why,
                advice=decision.advice, log=self.log, flag_group=self._cpu_group(),
                exchange="sink" if self.reentrant else None, fixes=self._guard_fixes,
            )  # fmt: skip

    def _guard_fixes(self, step: int) -> str:
        from .advice import Facts, render

        context = self.failure_context()
        return render(Facts(kind="ignored_got_grad", preset=context["preset"], probe_steps=self.policy.probe_steps,
                            step=step, chosen=context.get("chosen", ""), reentrant=context["reentrant"],
                            observed_steps=context.get("observed_steps", 0)))  # fmt: skip

    def _unhook(self) -> None:
        for hooked in (self.guard, self.steps, self.observer, self._first_check_armed):
            if hooked is not None:
                hooked.remove()
        self.guard = self.observer = self._first_check_armed = None

    # --- before every training forward of the wrapper (the step counter's pre-hook) --------------------

    def _before_forward(self, model: Any, syncing: bool) -> None:
        if self._pending:
            self._pending = False
            self._apply_decision(model)
        self._forwards_since_build += 1
        if self.policy.unused_params is UnusedParams.static and self._forwards_since_build == 1 and not syncing:
            self._hold_static(model)
        if not syncing:
            return
        if self._static_after_micro_steps:
            from .reducer import rebuild

            self._static_after_micro_steps = False
            rebuild(model, static=True)
            self.log.info("static_graph=True from this synchronised step on (the reducer records its graph now)")
        if self._frozen and any(p.requires_grad for _, p in self._frozen):
            self._unfrozen(model)
        if self.observer is None and not model.find_unused_parameters and not model.static_graph:
            self._check_finalized(model)
        elif model.find_unused_parameters and self._synced_since_build:
            self._sample_find(model)
        self._synced_since_build += 1

    def _apply_decision(self, model: Any) -> None:
        from .reducer import cannot_rebuild

        for hooked in (self.guard, self._first_check_armed):
            if hooked is not None:
                hooked.remove()
        self.guard = self._first_check_armed = None
        why = cannot_rebuild(model)
        if why and self.decision is not None and self.decision.choice is not UnusedParams.strict:
            from .observe import FirstSteps

            # Correct for any pattern of use, at the cost of the overlap of communication with backward.
            self.log.warning(
                "ddp=%s chose %s, but this wrapper's reducer cannot be rebuilt (%s): the engine goes on averaging "
                "every step's gradients itself, as DDP averages them, instead of DDP's buckets. Choose the setting "
                "when the wrapper is built to have DDP do it.", self.policy.unused_params.name,
                self.decision.choice.name, why,
            )  # fmt: skip
            self.observer = FirstSteps(model, 0, self._observed, self.log, forever=True)
            self.observer._before_forward(model)  # registered inside this forward's pre-hooks: its own runs later
            return
        self._configure(model)

    def _hold_static(self, model: Any) -> None:
        """The first forward is a micro-step under no_sync: torch's static graph would assert in the first
        synchronised backward. Built without it until then (torch records the graph at that step instead)."""
        from .reducer import rebuild

        if not model.static_graph:
            return
        rebuild(model, static=False)
        self._static_after_micro_steps = True
        self.log.info("static_graph=True with gradient accumulation: the reducer records its graph at the first "
                      "synchronised step, not at the first micro-step under no_sync (where torch asserts)")  # fmt: skip

    def _unfrozen(self, model: Any) -> None:
        """Parameters frozen when the reducer was built are trainable now: rebuild it with them, before this step."""
        import torch
        import torch.distributed as dist

        from .diagnose import group_by_module
        from .reducer import rebuild

        names = [n for n, p in self._frozen if p.requires_grad]
        # Every rank must rebuild at the same step: they agree on how many parameters became trainable.
        count = torch.tensor([len(names), -len(names)], dtype=torch.int64)
        if self.backend is Backend.nccl:
            count = count.cuda()
        dist.all_reduce(count, op=dist.ReduceOp.MAX, group=getattr(model, "process_group", None))
        if int(count[0]) != -int(count[1]):
            raise RuntimeError(
                "requires_grad changed after DDP built its reducer, differently on different ranks (this rank: "
                f"{len(names)} parameters became trainable): the ranks cannot agree on what DDP reduces.\nFix: "
                "change requires_grad at the same step on every rank."
            )
        step = self.steps.steps if self.steps is not None else 0
        lines = [f"{len(names)} parameter(s) were frozen (requires_grad=False) when DDP built its reducer and are "
                 f"trainable now, at training step {step}: requires_grad changed after the wrapper was built (a "
                 "fine-tuning callback that unfreezes them?). DDP would never have reduced their gradients and the "
                 "replicas would have drifted apart; its reducer is rebuilt with them, on every rank, before this "
                 "step:"]  # fmt: skip
        lines += [f"  {module}: {', '.join(leaves)}" for module, leaves in group_by_module(names).items()]
        if self.rank == 0:
            self.log.warning("\n".join(lines))
        for hooked in (self.guard, self._first_check_armed):
            if hooked is not None:
                hooked.remove()
        self.guard = self._first_check_armed = None
        rebuild(model)
        self._record(model)
        self.log.info("DDP as rebuilt: %s", self._describe(model))
        self._guard(model)
        if not model.find_unused_parameters and not model.static_graph:
            self._arm_first_step_check(model)

    # --- strict: stop at the step that left parameters unused, with their names ------------------------

    def _arm_first_step_check(self, model: Any) -> None:
        self._first_check_armed = _FirstStepCheck(model, self._check_finalized_after_step, self._saw_graph)

    def _saw_graph(self, reentrant: bool) -> None:
        self.reentrant = self.reentrant or reentrant

    def _check_finalized_after_step(self, model: Any) -> None:
        self._checking = True
        try:
            self._check_finalized(model)
        finally:
            self._checking = False

    def _check_finalized(self, model: Any) -> None:
        """Raise DDP's own error, with the parameters' names, if the last synchronised backward left any unused."""
        try:
            model._check_reducer_finalized()
        except RuntimeError as exc:
            from .diagnose import REDUCTION_MARKER, UnusedParametersError

            if REDUCTION_MARKER not in str(exc):
                raise
            raise UnusedParametersError.from_torch(exc, self) from None

    def _sample_find(self, model: Any) -> None:
        """With find_unused_parameters=True: did some rank leave a parameter unused in the last step? DDP's own
        record, read before the next forward overwrites it: after the step it holds, per parameter, how many
        ranks used it (DDP sums the ranks' maps to tell parameters no rank used)."""
        used = model.reducer._get_local_used_map()
        self._find_samples += 1
        if used.numel() and int(used.min()) < self.world_size:
            self._find_saw_unused = True

    # --- the end of the run --------------------------------------------------------------------------

    def first_step_done(self) -> None:
        """Kept for adapters and users' scripts: the engine's checks need no callback any more."""

    def after_run(self) -> None:
        """Compare the replicas; with find, say so when no rank left a parameter unused in any step (strict would be
        faster)."""
        model = self.ddp_model
        if self.observer is not None and self.rank == 0:
            self.log.info("ddp=%s: the run ended within the %d steps that decide; every step was averaged as DDP "
                          "averages, so nothing was left to decide", self.policy.unused_params.name,
                          self.policy.probe_steps)  # fmt: skip
        if self.policy.check_replicas and model is not None and self.world_size > 1:
            self.check_replicas("at the end of the run")
        if model is None or not getattr(model, "find_unused_parameters", False) or not hasattr(model, "reducer"):
            return
        if self._synced_since_build:
            self._sample_find(model)
        import torch
        import torch.distributed as dist

        saw = torch.tensor([int(self._find_saw_unused), int(self._find_samples == 0)], dtype=torch.int32)
        if self.backend is Backend.nccl:
            saw = saw.cuda()
        dist.all_reduce(saw, op=dist.ReduceOp.MAX, group=getattr(model, "process_group", None))
        if not bool(saw.any()) and self.rank == 0:
            self.log.warning(
                "find_unused_parameters=True: no rank left a parameter unused in any step of this run, so DDP's "
                "search after every forward found nothing: ddp=strict would be faster (or ddp=auto, which decides "
                "from the first steps)."
            )

    def release(self) -> None:
        """Take every hook of the engine off the wrapper and the optimizers, and let go of the wrapper."""
        self._unhook()
        if self.steps is not None:
            self.steps.remove()
            self.steps = None
        if self._every_steps_hook is not None:
            self._every_steps_hook.remove()
            self._every_steps_hook = None
        self.ddp_model = None

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
            raise ReplicasDiffer(failure_message(report, when, self.frozen_since_build()), list(report.params_differ))
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

    # --- what a failure message needs ------------------------------------------------------------------

    def frozen_since_build(self) -> list[str]:
        """Parameters the reducer holds that are frozen now: requires_grad changed after DDP was built."""
        if not self._trainable or self.ddp_model is None:
            return []
        by_id = {id(p): n for n, p in self.ddp_model.module.named_parameters()}
        return [by_id.get(id(p), "?") for p in self._trainable if not p.requires_grad]

    def failure_context(self) -> dict[str, Any]:
        """What a failure message needs to know about this run: the step, what the first steps decided, facts."""
        out: dict[str, Any] = {"preset": self.policy.unused_params.name, "probe_steps": self.policy.probe_steps,
                               "order": list(self.order), "frozen_since_build": self.frozen_since_build(),
                               "manual_optimization": self.manual_optimization}  # fmt: skip
        if self.steps is not None:
            # DDP reports parameters a step left unused before the next step's forward (counted already), or
            # right after the backward of the step that left them.
            out["step"] = self.steps.steps if self._checking else max(self.steps.steps - 1, 1)
            out["accumulation"] = self.accumulation or self.steps.forwards > self.steps.steps
        out["accumulation"] = out.get("accumulation", False) or self.accumulation
        observation = self.observation
        if observation is not None:
            out["observed_steps"] = observation.steps
            out["chosen"] = self.decision.choice.name if self.decision is not None else ""
            out["changed"] = observation.changed
            out["accumulation"] = out["accumulation"] or observation.accumulation
        out["reentrant"] = self.reentrant or bool(observation is not None and observation.reentrant)
        return out


class _FirstStepCheck:
    """After the first synchronised backward of a freshly built strict reducer, at the end of that backward (after
    DDP's own end of backward): has the reducer finished? If not, DDP's error with the names, at step 1."""

    def __init__(self, model: Any, check: Any, saw_graph: Any):
        import weakref

        self._model = weakref.ref(model)
        self._check = check
        self._saw_graph = saw_graph  # told whether the step's graph holds reentrant checkpointing
        self._done = False
        self._queued = False
        self._handle = model.register_forward_hook(self._after_forward)

    def _after_forward(self, model: Any, _args: Any, output: Any) -> Any:
        import torch

        if self._done or not torch.is_grad_enabled() or not model.require_backward_grad_sync:
            return None
        from . import backward

        self.remove()
        output, tensors = backward.attach(output, self._reached)
        if tensors:
            self._saw_graph(backward.uses_reentrant_checkpointing(tensors))
        return output if tensors else None

    def _reached(self) -> None:
        from . import backward

        if not self._queued:
            self._queued = True
            backward.after_ddp(self._run)

    def _run(self) -> None:
        model = self._model()
        if model is not None:
            self._check(model)

    def remove(self) -> None:
        self._done = True
        self._handle.remove()


def _grouped(names: list[str]) -> dict[str, list[str]]:
    from .diagnose import group_by_module

    return group_by_module(names)


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
