"""The probe behind ``ddp=auto``, ``ddp=ignore`` and ``python -m adapters doctor``: written once for every adapter.

Each adapter supplies the unwrapped module, an iterator of the run's real batches and a function that runs
one forward and backward pass on a batch (no optimizer step). The probe runs ``ddp.probe_steps`` of them on
every rank, records which trainable parameters got a gradient in each, puts weights, buffers, gradients and
the RNG back as they were, gathers the records from all ranks and decides:

* every parameter used in every step on every rank: ``strict`` (DDP's fastest setting);
* the same parameters unused in every step on every rank: ``ignore`` (DDP leaves them out: no search, no
  reduction of zeros, their gradients stay None so optimizers leave them untouched);
* the unused set changes between steps or ranks: ``find`` (``find_unused_parameters=True``).
"""

from __future__ import annotations

import fnmatch
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from .diagnose import group_by_module, parameter_aliases, reducer_parameter_names
from .errors import ConfigError, close_matches
from .policy import UnusedParams


@dataclass
class ProbeResult:
    """What every rank saw, and what follows from it. Plain data: it travels between processes."""

    steps: int
    world_size: int
    seconds: float  # the slowest rank's probe time
    step_seconds: float  # the slowest rank's time per probe step
    parameters: list[str]  # trainable parameters, in DDP's reducer order
    unused: dict[int, list[list[str]]]  # rank -> per step: the parameters that got no gradient
    aliases: dict[str, list[str]] = field(default_factory=dict)

    @property
    def unused_sets(self) -> list[frozenset[str]]:
        return [frozenset(step) for rank in sorted(self.unused) for step in self.unused[rank]]

    @property
    def never_used(self) -> list[str]:
        """Unused in every step on every rank, in reducer order."""
        common = frozenset.intersection(*self.unused_sets) if self.unused_sets else frozenset()
        return [p for p in self.parameters if p in common]

    @property
    def sometimes_unused(self) -> list[str]:
        union = frozenset().union(*self.unused_sets)
        never = set(self.never_used)
        return [p for p in self.parameters if p in union and p not in never]

    def decision(self) -> tuple[UnusedParams, str]:
        sets = self.unused_sets
        if all(not s for s in sets):
            return UnusedParams.strict, "every parameter got a gradient in every probe step on every rank"
        if len(set(sets)) == 1:
            return UnusedParams.ignore, (
                f"the same {len(sets[0])} parameters got no gradient in every step on every rank"
            )
        return UnusedParams.find, "the parameters without a gradient changed between steps or ranks"

    def ranks_unused(self, name: str) -> list[int]:
        return [r for r in sorted(self.unused) if any(name in step for step in self.unused[r])]

    def report(self) -> str:
        """The doctor report: unused parameters by module and rank, the recommended preset, and what the
        probe cannot see."""
        choice, reason = self.decision()
        preset = {"strict": "ddp=strict", "ignore": "ddp=ignore (or ddp=static)", "find": "ddp=safe"}[choice.name]
        lines = [
            f"Probe: {self.steps} forward/backward steps on each of {self.world_size} rank(s), "
            f"{len(self.parameters)} trainable parameters, {self.seconds:.2f} s "
            f"({self.step_seconds:.3f} s per step).",
            *self.unused_lines(),
            f"Recommended: {preset}, because {reason}. ddp=auto picks it by itself.",
            f"What the probe cannot see: only these {self.steps} steps run, on the first batches. A branch used "
            "later (every k-th step, at random like LayerDrop or a rarely routed expert, after a warm-up) looks "
            "unused here, and a model's own Python state (a step counter) is not rewound after the probe. Where "
            "parameters are left out of DDP and a later step does use them, the guard averages their gradients "
            "across ranks before the optimizer step and says so once (ddp.on_ignored_grad=fail stops instead); "
            "the run's end compares every rank's parameters. Make it explicit with ddp=safe, or see more with a "
            "larger ddp.probe_steps.",
        ]
        return "\n".join(lines)

    def unused_lines(self) -> list[str]:
        """The parameters that got no gradient, by module and rank (or that every one did)."""
        lines = []
        if self.decision()[0] is UnusedParams.strict:
            lines.append("Every parameter got a gradient in every step on every rank.")
        for title, names, note in (
            ("Unused in every step on every rank", self.never_used,
             "while unused their gradients stay None: optimizers and weight decay leave them untouched"),
            ("Unused in some steps or on some ranks", self.sometimes_unused,
             "with find_unused_parameters=True a rank that did not use one averages in zeros for it"),
        ):  # fmt: skip
            if not names:
                continue
            lines.append(f"{title} ({len(names)}; {note}):")
            for module, leaves in group_by_module(names).items():
                ranks = sorted({r for leaf in leaves for r in self.ranks_unused(leaf)})
                on = "rank " if len(ranks) == 1 else "ranks "
                lines.append(f"  {module} ({on}{', '.join(map(str, ranks))}): {', '.join(leaves)}")
        return lines

    def summary_line(self) -> str:
        choice, reason = self.decision()
        return f"ddp=auto chose {choice.name}: {reason} (probe: {self.steps} steps in {self.seconds:.2f} s)"


def run_probe(
    module: Any,
    batches: Iterator[Any],
    step: Callable[[Any], None],
    steps: int,
    ignored: Iterable[str] = (),
) -> ProbeResult:
    """Run the probe on this rank and gather every rank's record (a collective: every rank must call it)."""
    import torch
    import torch.distributed as dist

    names = reducer_parameter_names(module, ignored)
    by_name = dict(module.named_parameters(remove_duplicate=False))
    params = [by_name[n] for n in names]
    # Every trainable parameter's gradient is cleared and put back, those DDP is told to ignore included.
    trainable = [p for p in module.parameters() if p.requires_grad]
    state = {k: v.detach().clone() for k, v in module.state_dict(keep_vars=True).items()}
    saved_grads = [p.grad for p in trainable]
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    was_training = module.training
    module.train()
    unused: list[list[str]] = []
    started = time.perf_counter()
    try:
        for _ in range(steps):
            for p in trainable:
                p.grad = None
            step(next(batches))
            unused.append([n for n, p in zip(names, params, strict=True) if p.grad is None])
    finally:
        elapsed = time.perf_counter() - started
        for p, g in zip(trainable, saved_grads, strict=True):
            p.grad = g
        module.load_state_dict(state)
        module.train(was_training)
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    mine = {"rank": dist.get_rank() if dist.is_initialized() else 0, "unused": unused, "seconds": elapsed}
    records = [mine]
    if dist.is_initialized():
        records = [None] * dist.get_world_size()
        dist.all_gather_object(records, mine)
    slowest = max(r["seconds"] for r in records)
    return ProbeResult(
        steps=steps, world_size=len(records), seconds=slowest, step_seconds=slowest / steps, parameters=names,
        unused={r["rank"]: r["unused"] for r in records}, aliases=parameter_aliases(module),
    )  # fmt: skip


def match_ignore(module: Any, patterns: list[str]) -> list[str]:
    """Trainable parameters matched by ``ddp.ignore`` (a parameter name, a module name, or a glob), as reducer
    names. A tied parameter matches under any of its names."""
    names = reducer_parameter_names(module)
    known = set(names)
    canonical = {id(p): n for n, p in module.named_parameters() if n in known}
    spellings = [(n, canonical[id(p)]) for n, p in module.named_parameters(remove_duplicate=False)
                 if id(p) in canonical]  # fmt: skip
    chosen: list[str] = []
    for pattern in patterns:
        hits = [reducer for n, reducer in spellings
                if n == pattern or n.startswith(pattern + ".") or fnmatch.fnmatchcase(n, pattern)]  # fmt: skip
        if not hits:
            modules = sorted({n.rsplit(".", k)[0] for n in names for k in range(1, n.count(".") + 1)})
            close = close_matches(pattern, names + modules, n=3)
            hint = f" Close: {', '.join(close)}." if close else ""
            raise ConfigError(f"ddp.ignore: '{pattern}' matches no trainable parameter of the model.{hint}")
        chosen += [n for n in hits if n not in chosen]
    return [n for n in names if n in chosen]


def ignore_spellings(module: Any, names: list[str]) -> list[str]:
    """Every name under which DDP looks a tensor up in its ignore list, for each parameter in ``names``.

    DDP (``_build_params_for_reducer``) keeps a parameter when any module that holds it does not list it
    under that module's own name, so a tied tensor must be listed under every name it has; a root-module
    parameter is looked up as ``.name`` there and as ``name`` elsewhere in DDP.
    """
    by_name = dict(module.named_parameters(remove_duplicate=False))
    wanted = {id(by_name[n]) for n in names}
    out: list[str] = []
    for module_name, mod in module.named_modules(remove_duplicate=False):
        for param_name, param in mod.named_parameters(recurse=False):
            if id(param) in wanted:
                full = f"{module_name}.{param_name}"
                out += [full] if module_name else [full, param_name]
    return list(dict.fromkeys(out))


def set_ignored(module: Any, names: list[str]) -> list[str]:
    """Tell DDP (before it wraps ``module``) to leave these parameters out of its reduction, under every name
    it may look them up by, keeping whatever the model's own code already asked DDP to ignore. Returns the
    names added."""
    from torch.nn.parallel import DistributedDataParallel

    own = list(getattr(module, "_ddp_params_and_buffers_to_ignore", ()))
    added = [n for n in ignore_spellings(module, names) if n not in own]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, own + added)
    return added
