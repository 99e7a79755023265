"""Turn DDP's errors into parameter names and the override that fixes them.

DDP's "Expected to have finished reduction in the prior iteration" error ends with
``Parameter indices which did not receive grad for rank N: i j ...``. The indices are positions in the
list DDP's reducer was built from (``DistributedDataParallel._build_params_for_reducer``): modules in
``named_modules()`` order, each module's own trainable parameters, parameters DDP was told to ignore left
out, a parameter shared by several modules counted once. Rebuilding that list gives exact names for any
model, without ``TORCH_DISTRIBUTED_DEBUG``.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable

REDUCTION_MARKER = "Expected to have finished reduction in the prior iteration"
GRAPH_CHANGED_MARKER = "training graph has changed in this iteration"
READY_TWICE_MARKERS = ("marked as ready twice", "Expected to mark a variable ready only once")
WORKERS_DIED_MARKERS = ("background workers are no longer alive", "DataLoader worker (pid")
TIMEOUT_MARKERS = ("Timed out waiting", "timed out after", "Timeout waiting", "operation timed out")
# Raised by this project on every rank: ddp.on_ignored_grad=fail, and the replica check.
IGNORED_GRAD_MARKER = "left out of DDP got a gradient in training step"
REPLICAS_MARKER = "The replicas differ"
OOM_MARKERS = ("CUDA out of memory", "OutOfMemoryError", "out of memory")
# A rank whose peer died sees one of these: a consequence of the failure, not its cause.
PEER_LOST_MARKERS = (
    "Connection closed by peer", "Connection reset by peer", "remote worker crashing", "Broken pipe",
    "NCCL communicator was aborted", "remote process exited or there was a network error",
)  # fmt: skip
_INDICES = re.compile(r"Parameter indices which did not receive grad for rank (\d+):((?: \d+)+)")


@dataclass
class Diagnosis:
    """One rank's explanation of a failure, small enough to send between processes."""

    rank: int
    # unused_parameters | graph_changed | ready_twice | ignored_got_grad | replicas_differ | workers_died | oom |
    # timeout | peer_lost | frozen (no heartbeat: named by the launcher) | error
    kind: str
    summary: str  # one line
    original: str  # the exception as torch (or the framework) raised it
    unused: list[str] = field(default_factory=list)  # exact parameter names, DDP's order
    aliases: dict[str, list[str]] = field(default_factory=dict)  # tied parameters: other names
    traceback: str = ""
    # What the run knew, for the advice (adapters.advice.Facts): the training step, the preset, what ddp=auto's
    # observed first steps chose, accumulation, reentrant checkpointing, manual optimization, requires_grad changes.
    step: int = 0
    preset: str = ""
    probe_steps: int = 2
    chosen: str = ""
    observed_steps: int = 0
    changed: bool | None = None
    accumulation: bool = False
    reentrant: bool = False
    manual_optimization: bool = False
    frozen_since_build: list[str] = field(default_factory=list)


class UnusedParametersError(RuntimeError):
    """DDP's "Expected to have finished reduction" error, raised by the engine before DDP would raise it, with the
    parameters' names and the fixes that hold (a user's own script sees this text; ``train.py`` rebuilds its
    message from every rank's). ``torch_text`` is torch's own message."""

    def __init__(self, message: str, torch_text: str, names: list[str], step: int):
        super().__init__(message)
        self.torch_text = torch_text
        self.names = names
        self.step = step

    @classmethod
    def from_torch(cls, exc: BaseException, engine: Any) -> UnusedParametersError:
        from .advice import render

        text = str(exc)
        context = engine.failure_context()
        order = context.get("order") or []
        indices = unused_indices(text).get(engine.rank, [])
        names = [order[i] if i < len(order) else f"<parameter index {i}>" for i in indices]
        d = Diagnosis(engine.rank, "unused_parameters", f"{len(names)} parameters got no gradient", text, names)
        for key, value in context.items():
            if hasattr(d, key):
                setattr(d, key, value)
        lines = [text, "", f"Parameters that got no gradient on rank {engine.rank}, by module:"]
        lines += [f"  {module}: {', '.join(leaves)}" for module, leaves in group_by_module(names).items()]
        lines += _context_lines(d)
        lines.append(render(facts_of([d])))
        return cls("\n".join(lines), text, names, d.step)


def reducer_parameter_names(module: Any, ignored: Iterable[str] = ()) -> list[str]:
    """Names of the parameters DDP reduces, in the reducer's index order.

    Mirrors ``DistributedDataParallel._build_params_for_reducer`` (torch 2.x): keep it in step with it.
    """
    ignored = set(ignored)
    seen: set[int] = set()
    names: list[str] = []
    for module_name, mod in module.named_modules():
        for param_name, param in mod.named_parameters(recurse=False):
            # DDP spells the ignore key with a leading "." for the root module's own parameters.
            if not param.requires_grad or f"{module_name}.{param_name}" in ignored:
                continue
            if id(param) in seen:
                continue
            seen.add(id(param))
            names.append(f"{module_name}.{param_name}" if module_name else param_name)
    return names


def parameter_aliases(module: Any) -> dict[str, list[str]]:
    """For each tied parameter: its reducer name -> the other names it is reachable by."""
    by_id: dict[int, list[str]] = defaultdict(list)
    for name, param in module.named_parameters(remove_duplicate=False):
        by_id[id(param)].append(name)
    canonical = {}
    for module_name, mod in module.named_modules():
        for param_name, param in mod.named_parameters(recurse=False):
            canonical.setdefault(id(param), f"{module_name}.{param_name}" if module_name else param_name)
    return {
        canonical[pid]: [n for n in names if n != canonical[pid]]
        for pid, names in by_id.items()
        if len(names) > 1 and pid in canonical
    }


def unused_indices(text: str) -> dict[int, list[int]]:
    """``{rank: [index, ...]}`` parsed from DDP's error text."""
    return {int(rank): [int(i) for i in idx.split()] for rank, idx in _INDICES.findall(text)}


def diagnose(exc: BaseException, rank: int, ddp_model: Any = None, tb: str = "",
             order: list[str] | None = None) -> Diagnosis:  # fmt: skip
    """Explain ``exc`` raised on ``rank``. ``order`` (the reducer's parameter names as it was built) or else
    ``ddp_model`` (the DDP wrapper, read as it is now) turns indices into names."""
    text = getattr(exc, "torch_text", None) or str(exc)
    original = f"{'RuntimeError' if hasattr(exc, 'torch_text') else type(exc).__name__}: {text}"
    if IGNORED_GRAD_MARKER in text:
        return Diagnosis(rank, "ignored_got_grad", "parameters left out of DDP got a gradient", text,
                         list(getattr(exc, "names", [])), traceback=tb)  # fmt: skip
    if text.startswith(REPLICAS_MARKER):
        return Diagnosis(rank, "replicas_differ", "the replicas differ", text, list(getattr(exc, "names", [])),
                         traceback=tb)  # fmt: skip
    if REDUCTION_MARKER in text or GRAPH_CHANGED_MARKER in text:
        names: list[str] = []
        aliases: dict[str, list[str]] = {}
        indices = unused_indices(text).get(rank, [])
        if (order or ddp_model is not None) and indices:
            module = getattr(ddp_model, "module", ddp_model)
            if not order:
                order = reducer_parameter_names(module, getattr(ddp_model, "parameters_to_ignore", ()))
            names = [order[i] if i < len(order) else f"<parameter index {i}>" for i in indices]
            all_aliases = parameter_aliases(module) if module is not None else {}
            aliases = {n: all_aliases[n] for n in names if n in all_aliases}
        elif indices:
            names = [f"<parameter index {i}>" for i in indices]
        if GRAPH_CHANGED_MARKER in text:
            return Diagnosis(
                rank, "graph_changed",
                "static_graph=True, but the set of parameters used changed after the first step",
                original, names, aliases, tb,
            )  # fmt: skip
        return Diagnosis(
            rank, "unused_parameters", f"{len(names)} parameters got no gradient", original, names, aliases, tb
        )
    if any(marker in text for marker in READY_TWICE_MARKERS):
        return Diagnosis(
            rank, "ready_twice",
            "a parameter's gradient was produced twice in one step (reentrant checkpointing or reuse)",
            original, traceback=tb,
        )  # fmt: skip
    if any(marker in text for marker in WORKERS_DIED_MARKERS):
        return Diagnosis(rank, "workers_died", "its background data-loading workers died", original, traceback=tb)
    if any(marker in text for marker in OOM_MARKERS):
        return Diagnosis(rank, "oom", "it ran out of memory", original, traceback=tb)
    if any(marker in text for marker in TIMEOUT_MARKERS):
        return Diagnosis(rank, "timeout", "a collective waited longer than ddp.timeout_s for the other ranks",
                         original, traceback=tb)  # fmt: skip
    if any(marker in text for marker in PEER_LOST_MARKERS):
        return Diagnosis(rank, "peer_lost", "lost its connection to a rank that stopped", original, traceback=tb)
    return Diagnosis(rank, "error", original.splitlines()[0] if original else type(exc).__name__, original,
                     traceback=tb)  # fmt: skip


def group_by_module(names: Iterable[str]) -> dict[str, list[str]]:
    """Parameter names grouped by the module that owns them, in first-seen order."""
    groups: dict[str, list[str]] = defaultdict(list)
    for name in names:
        groups[name.rpartition(".")[0] or "(root module)"].append(name)
    return groups


def _ranks(ranks: Iterable[int]) -> str:
    ranks = sorted(set(ranks))
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


_FIXES = {
    "workers_died": (
        "The data-loading (augmentation) worker processes died. They print no error of their own when they are\n"
        "killed; the likely cause is memory: the host's out-of-memory killer (see `dmesg | grep -i oom`), or a\n"
        "GPU out-of-memory error. Lower, in this order (memory=lowmem sets all three):\n"
        "  memory.batch_size        fewer samples in memory per step\n"
        "  memory.num_workers       fewer worker processes, each holding its own batches (0: in-process)\n"
        "  memory.pin_memory=false  no page-locked copies of every batch\n"
        "(nnU-Net also reads framework.batch_size, framework.num_workers and framework.pin_memory.)\n"
        "If a worker raised an error of its own, it is printed above in the rank's log."
    ),
    "oom": (
        "Lower memory.batch_size first (or memory=lowmem: smaller batches, in-process loading, no pinned\n"
        "memory, mixed precision); with framework=torch, memory.on_oom=halve lets every rank drop the step and\n"
        "go on at half the batch size. One rank skipping a batch on its own would leave the others waiting."
    ),
}
_CAUSES = {
    "graph_changed": "static_graph=True needs the same parameters used in every step: DDP recorded the first step's "
    "graph, and a later step used a different set.",
    "ready_twice": "With find_unused_parameters=True, DDP searches the graph after the forward and marks every "
    "parameter it cannot reach as unused; reentrant activation checkpointing (torch.utils.checkpoint without "
    "use_reentrant=False; OpenMMLab backbones with with_cp=True) hides its segments' parameters from that search, "
    "and they then get a gradient after all: marked ready twice.",
}


_FROM_DDP = ("unused_parameters", "graph_changed", "ready_twice")
_OURS = ("ignored_got_grad", "replicas_differ", "frozen")


def facts_of(group: list[Diagnosis]) -> Any:
    """What the diagnoses of one kind tell the advice (adapters.advice.Facts)."""
    from .advice import Facts

    first = group[0]
    names = list(dict.fromkeys(n for d in group for n in d.unused))
    return Facts(
        kind=first.kind, preset=first.preset or "strict", probe_steps=first.probe_steps,
        step=max(d.step for d in group), unused=names,
        ranks_differ=len({frozenset(d.unused) for d in group}) > 1,
        changed=first.changed, accumulation=any(d.accumulation for d in group),
        reentrant=any(d.reentrant for d in group) or first.kind == "ready_twice",
        manual_optimization=first.manual_optimization, chosen=first.chosen, observed_steps=first.observed_steps,
        frozen_since_build=list(dict.fromkeys(n for d in group for n in d.frozen_since_build)),
    )  # fmt: skip


def _context_lines(d: Diagnosis) -> list[str]:
    """What the run had decided, and what changed since DDP was built, as sentences."""
    lines = []
    if d.chosen and d.preset in ("auto", "ignore"):
        seen = {"strict": "every parameter used in every step", "ignore": "the same parameters unused in every "
                "step", "find": "the unused parameters change"}.get(d.chosen, "")  # fmt: skip
        step = f"in training step {d.step}" if d.step else "in a later step"
        lines.append(
            f"ddp={d.preset} decided this from the first {d.observed_steps} training step(s): it saw {seen}, and "
            f"chose {d.chosen}. The parameters above got no gradient {step}, after those steps: the model's "
            "unused set changes from step to step."
        )
    frozen = [n for n in d.frozen_since_build if n in set(d.unused)]  # requires_grad explains their missing gradient
    if frozen:
        lines.append(
            f"{len(frozen)} of the parameters DDP reduces were trainable when it built its reducer and are frozen "
            f"now ({', '.join(frozen[:6])}{' ...' if len(frozen) > 6 else ''}): requires_grad changed after the "
            "wrapper was built, and DDP still waits for their gradients."
        )
    return lines


def format_failure(diagnoses: list[Diagnosis], *, context: str = "") -> str:
    """The message a user sees when a run stops: what happened, where, by name, and the fix."""
    from .advice import render

    if not diagnoses:
        return "The run stopped, and no rank reported why (a rank was killed, or crashed in native code)."
    lines: list[str] = []
    by_kind: dict[str, list[Diagnosis]] = defaultdict(list)
    for d in sorted(diagnoses, key=lambda d: d.rank):
        by_kind[d.kind].append(d)
    consequences = []
    if len(by_kind) > 1:
        consequences = by_kind.pop("peer_lost", []) + by_kind.pop("timeout", [])
    for kind, group in by_kind.items():
        if kind in ("unused_parameters", "graph_changed"):
            lines.append(f"DDP stopped on {_ranks(d.rank for d in group)}: {group[0].summary}.")
            where: dict[str, set[int]] = defaultdict(set)
            for d in group:
                for name in d.unused:
                    where[name].add(d.rank)
            if where:
                lines.append("Parameters that got no gradient, by module:")
                ordered = list(dict.fromkeys(n for d in group for n in d.unused))
                for module, full in group_by_module(ordered).items():
                    rank_sets = {frozenset(where[n]) for n in full}
                    on = _ranks(next(iter(rank_sets))) if len(rank_sets) == 1 else "some ranks"
                    lines.append(f"  {module} ({on}): {', '.join(full)}")
                aliases = {n: a for d in group for n, a in d.aliases.items()}
                for name, other in aliases.items():
                    lines.append(f"  ({name} is shared; also reachable as {', '.join(other)})")
                rank_sets = {frozenset(d.unused) for d in group}
                if len(rank_sets) > 1:
                    lines.append("The unused set differs between ranks: ddp=static cannot hold.")
            if kind in _CAUSES:
                lines.append(_CAUSES[kind])
            lines.extend(_context_lines(group[0]))
            lines.append(render(facts_of(group)))
            if context:
                lines.append(context)
        elif kind in _OURS:
            lines.append(f"The run stopped on {_ranks(d.rank for d in group)}:")
            lines.append(group[0].original)
        elif kind == "timeout":
            lines.append(
                f"{_ranks(d.rank for d in group).capitalize()} gave up after waiting ddp.timeout_s for the "
                "other ranks in a collective: another rank is stuck or gone, and did not say why."
            )
        elif kind == "peer_lost":
            lines.append(
                f"{_ranks(d.rank for d in group).capitalize()} lost the connection to another rank, "
                "which stopped without reporting why (see its log)."
            )
        elif kind == "ready_twice":
            lines.append(f"DDP stopped on {_ranks(d.rank for d in group)}: {group[0].summary}.")
            lines.append(_CAUSES[kind])
            lines.extend(_context_lines(group[0]))
            lines.append(render(facts_of(group)))
        elif kind in ("workers_died", "oom"):
            lines.append(f"The run stopped on {_ranks(d.rank for d in group)}: {group[0].summary}.")
            lines.append(_FIXES[kind])
        else:
            for d in group:
                lines.append(f"rank {d.rank} failed: {d.summary}")
        first = group[0]
        if kind in _OURS:
            continue
        if kind == "error":
            text = (first.traceback or first.original).rstrip()
            if text:  # a process killed outright left none
                lines.append(f"\nThe original error (rank {first.rank}):")
                lines.extend("  " + line for line in text.splitlines())
        else:
            whose = "torch's original error" if kind in _FROM_DDP else "The original error"
            lines.append(f"\n{whose} (rank {first.rank}):")
            lines.extend("  " + line for line in first.original.splitlines())
    if consequences:
        lines.append(
            f"\n({_ranks(d.rank for d in consequences)} then lost the connection to it: a consequence, not a cause.)"
        )
    return "\n".join(lines)
