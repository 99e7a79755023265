"""Which fixes a failure message offers: decided in one place, from what the run observed and from each setting's
preconditions, so that no message offers a setting the observations rule out, or the one that just failed.

Each setting holds only under conditions a run can contradict:

* ``ddp=strict``: every parameter DDP reduces gets a gradient in every step, on every rank.
* ``ddp=static`` (``static_graph=True``): the same parameters are unused in every step and on every rank (the
  graph DDP records in the first step stays), and, with Lightning's manual optimization, one backward per step.
* ``ddp=safe`` (``find_unused_parameters=True``): any pattern of use, except reentrant activation checkpointing
  (``torch.utils.checkpoint`` with ``use_reentrant=True``), whose parameters DDP's search cannot see: they are
  marked ready twice.
* ``ddp=ignore`` with the names: any pattern, at a cost: DDP leaves them out, and the guard averages their
  gradients whenever a rank uses them.
* ``ddp=auto``: decides from the first ``ddp.probe_steps`` steps; right when those steps show the pattern.

``Facts`` is what one failure tells: the step, the ranks, whether the unused set changed, accumulation,
reentrant checkpointing, manual optimization, what ``ddp=auto`` chose, parameters whose ``requires_grad``
changed after DDP built its reducer. ``fixes(facts)`` returns the overrides that hold under them, each with
the reason it works, in the order to try them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

CODE = "in your code: "  # a fix that is not a command-line override
_MAX_NAMES = 12  # more than this in a ddp.ignore=[...] override is unreadable: name the modules instead


@dataclass
class Facts:
    kind: str  # unused_parameters | graph_changed | ready_twice | ignored_got_grad
    preset: str  # ddp.unused_params of the run: strict | find | static | ignore | auto
    probe_steps: int = 2  # ddp.probe_steps
    step: int = 0  # the training step that failed (0: not known)
    unused: list[str] = field(default_factory=list)  # the parameters that got no gradient, every rank's
    ranks_differ: bool = False  # the ranks reported different unused sets
    changed: bool | None = None  # the unused set changed between steps (None: not known)
    accumulation: bool = False  # gradient accumulation (micro-steps under no_sync)
    reentrant: bool = False  # reentrant activation checkpointing seen
    manual_optimization: bool = False  # Lightning's manual optimization
    chosen: str = ""  # what ddp=auto (or ddp=ignore's observation) chose, when it decided
    observed_steps: int = 0  # how many steps that observation saw
    frozen_since_build: list[str] = field(default_factory=list)  # trainable when DDP was built, frozen now


@dataclass(frozen=True)
class Fix:
    override: str  # what to write on the command line (or in code, when it is not an override)
    why: str  # why it works here

    def line(self, width: int) -> str:
        if len(self.override) > width:  # a long override on a line of its own, its reason under it
            return f"  {self.override}\n  {' ' * width}  {self.why}"
        return f"  {self.override.ljust(width)}  {self.why}"


def _ignore_override(names: list[str]) -> str:
    if len(names) > _MAX_NAMES:  # a module name covers its parameters
        names = list(dict.fromkeys(n.rpartition(".")[0] or n for n in names))
    return f"ddp=ignore 'ddp.ignore=[{','.join(names)}]'"


def fixes(f: Facts) -> list[Fix]:
    """The settings that work under ``f``, best first. Never the one that just failed, never one ``f`` rules out."""
    out: list[Fix] = []
    changed = bool(f.changed) or f.ranks_differ
    later = f.step > 1  # a failure after step 1 under strict: earlier steps used these parameters
    if f.kind == "unused_parameters" and later:  # the first step used these parameters, or it would have stopped
        changed = True
    if f.kind == "graph_changed":
        changed = True
    failed = {"strict": "strict", "find": "safe", "static": "static", "ignore": "ignore", "auto": "auto"}[f.preset]
    if f.preset == "auto" and f.chosen:
        failed_setting = {"strict": "strict", "find": "safe", "ignore": "ignore"}.get(f.chosen, "")
    else:
        failed_setting = failed

    # ddp=auto: only where its observed steps would show what this failure showed.
    if failed != "auto" and f.kind in ("unused_parameters", "graph_changed", "ready_twice"):
        if f.step and f.step > f.probe_steps:
            out.append(Fix(f"ddp=auto ddp.probe_steps={f.step}", f"decides from the first {f.step} training "
                           f"steps, which include step {f.step}, where it showed (now {f.probe_steps})."))  # fmt: skip
        else:
            out.append(Fix("ddp=auto", "decides from the run's own first steps which setting holds, and applies it "
                           "(the default)."))  # fmt: skip
    elif failed == "auto" and f.step and f.step > max(f.observed_steps, f.probe_steps):
        out.append(Fix(f"ddp.probe_steps={f.step}", f"ddp=auto then observes {f.step} steps, up to step {f.step} "
                       f"where this showed (it observed {f.observed_steps or f.probe_steps})."))  # fmt: skip

    # ddp=static: the same parameters unused in every step, on every rank. One failing step cannot show that the
    # set stays the same; only observed steps can (ddp=auto's, ddp=ignore's, the doctor's).
    static_ok = (f.changed is False and not changed and not f.manual_optimization and failed_setting != "static"
                 and f.kind in ("unused_parameters", "ready_twice") and not f.frozen_since_build)  # fmt: skip
    if static_ok:
        out.append(Fix("ddp=static", "static_graph=True: holds when the same parameters are unused in every step "
                       f"and on every rank, as they were in the {f.observed_steps} observed steps."))  # fmt: skip

    # ddp=safe: any pattern, but not with reentrant checkpointing.
    if failed_setting != "safe" and not f.reentrant and f.kind in ("unused_parameters", "graph_changed",
                                                                   "ignored_got_grad"):  # fmt: skip
        out.append(Fix("ddp=safe", "find_unused_parameters=True: holds whatever changes between steps or ranks; "
                       "searches the autograd graph after every forward."))  # fmt: skip

    # ddp=ignore with the names: any pattern of use of those parameters, the guard keeping them in sync. Not with
    # manual optimization: each optimizer's backward leaves the other's parameters unused, all of them in turn.
    if f.unused and f.kind in ("unused_parameters", "graph_changed") and not f.manual_optimization:
        out.append(Fix(_ignore_override(f.unused), "DDP leaves these out; whenever a rank does use one, its "
                       "gradient is averaged across ranks before anything reads it (the guard)."))  # fmt: skip

    if f.kind == "ready_twice" or (f.reentrant and f.kind == "unused_parameters"):
        out.append(Fix(CODE + "use_reentrant=False", "in torch.utils.checkpoint(...): non-reentrant activation "
                       "checkpointing works with every setting, ddp=safe included."))  # fmt: skip
    if f.kind == "ignored_got_grad":
        out.append(Fix("ddp.on_ignored_grad=sync", "the guard averages those gradients across ranks, as DDP would "
                       "have, and the run goes on (the default)."))  # fmt: skip
        if f.chosen:
            out.append(Fix(f"ddp.probe_steps={max(f.step, f.probe_steps + 1)}", "a longer observation, if the "
                           "parameters are used within that many steps."))  # fmt: skip
    return out


def render(f: Facts, *, heading: str = "Fix it on the command line:") -> str:
    """The fixes as lines, or a sentence saying that none of the settings applies."""
    found = fixes(f)
    if not found:
        return ("None of ddp=strict, static, safe or ignore holds for what this run did: see the cause above "
                "(make the loss use the parameters, or freeze them with requires_grad=False before DDP wraps "
                "the model).")  # fmt: skip
    width = max([len(x.override) for x in found if len(x.override) <= 30] or [12])
    lines = [heading, *(x.line(width) for x in found)]
    if f.kind == "unused_parameters":
        lines.append("Or make the loss use them, or freeze them (requires_grad=False) before DDP wraps the model.")
    return "\n".join(lines)
