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
    # What the run had decided, for the advice: the training step, and the probe behind ddp=auto / ignore.
    step: int = 0
    probe_steps: int = 0
    probe_choice: str = ""


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


def diagnose(exc: BaseException, rank: int, ddp_model: Any = None, tb: str = "") -> Diagnosis:
    """Explain ``exc`` raised on ``rank``. ``ddp_model`` (the DDP wrapper) turns indices into names."""
    text = str(exc)
    original = f"{type(exc).__name__}: {text}"
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
        if ddp_model is not None and indices:
            module = getattr(ddp_model, "module", ddp_model)
            order = reducer_parameter_names(module, getattr(ddp_model, "parameters_to_ignore", ()))
            names = [order[i] if i < len(order) else f"<parameter index {i}>" for i in indices]
            all_aliases = parameter_aliases(module)
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
    "unused_parameters": (
        "Fix it with one word on the command line:\n"
        "  ddp=auto     probe the model first and pick the cheapest setting that works (the default).\n"
        "  ddp=static   static_graph=True. No per-step search; needs the same parameters unused in every step.\n"
        "  ddp=safe     find_unused_parameters=True. Works whatever changes between steps; walks the autograd\n"
        "               graph after every forward to find them.\n"
        "  (the same as ddp.unused_params=static / ddp.unused_params=find)\n"
        "Or make the loss use them, or freeze them (requires_grad=False) so DDP does not wait for them."
    ),
    "graph_changed": (
        "static_graph=True needs the same parameters used in every step. Fix: ddp=safe "
        "(find_unused_parameters=True), which allows the used set to change."
    ),
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
    "ready_twice": (
        "This happens with find_unused_parameters=True (ddp=safe) and reentrant activation checkpointing\n"
        "(torch.utils.checkpoint without use_reentrant=False; OpenMMLab backbones with with_cp=True), or when a\n"
        "module runs twice in one step. Fix: ddp=static, or checkpointing with use_reentrant=False."
    ),
}


_FROM_DDP = ("unused_parameters", "graph_changed", "ready_twice")
_OURS = ("ignored_got_grad", "replicas_differ", "frozen")


def _probe_missed(d: Diagnosis) -> str:
    """The advice when ddp=auto's (or ddp=ignore's) probe decided and a later step proved it wrong."""
    seen = {"strict": "every parameter used in every step", "ignore": "the same parameters unused in every step",
            "find": "the unused parameters change"}.get(d.probe_choice, "")  # fmt: skip
    step = f"in training step {d.step}" if d.step else "in a later step"
    return (
        f"The probe decided this: before training it ran {d.probe_steps} forward/backward step(s), saw {seen}, "
        f"and chose {d.probe_choice}. The parameters above got no gradient {step}, which the probe did not see: "
        "the model's unused set changes from step to step.\n"
        "Fix it on the command line:\n"
        "  ddp=safe               find_unused_parameters=True: works whatever changes between steps or ranks.\n"
        f"  ddp.probe_steps=N      a longer probe (now {d.probe_steps}), if the change shows up within N steps.\n"
        "Or make the loss use them in every step."
    )


def format_failure(diagnoses: list[Diagnosis], *, context: str = "") -> str:
    """The message a user sees when a run stops: what happened, where, by name, and the fix."""
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
                    lines.append("The unused set differs between ranks, so ddp=static may not hold: prefer ddp=safe.")
            lines.append(_probe_missed(group[0]) if group[0].probe_choice else _FIXES[kind])
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
        elif kind in ("ready_twice", "workers_died", "oom"):
            subject = "DDP stopped" if kind == "ready_twice" else "The run stopped"
            lines.append(f"{subject} on {_ranks(d.rank for d in group)}: {group[0].summary}.")
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
