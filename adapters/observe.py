"""How ``ddp=auto`` (and ``ddp=ignore`` without names, and ``python -m adapters doctor``) decide: from the run's
own first training steps, not from a probe run beside them.

The framework builds its DDP wrapper as it always does (for auto: with nothing added, DDP's own default) and
trains. For its first ``ddp.probe_steps`` synchronised steps, DDP's reducer stands aside and ``FirstSteps``
does its job: a hook on every parameter the reducer holds records which ones get a gradient, and at the end of
each synchronised backward pass the ranks add up those records (one small all-reduce) and average the
gradients of every parameter used on any rank exactly as DDP averages them (each gradient times 1/world size,
summed over the ranks, a rank that did not use a parameter adding zeros; one that no rank used keeps no
gradient, as with ``find_unused_parameters=True``). Then every rank holds the same record and makes the same
decision, and the engine rebuilds the wrapper's reducer accordingly, in place, right before the next training
forward (``adapters.reducer.rebuild``). From then on DDP works as if it had been built with that setting.

Nothing is run that the framework would not run, and nothing is run twice: the batches, their order, the random
streams, the schedule, the step counters, the trainer's state, gradient accumulation, GradScaler and clipping
are the framework's own. The only difference from a run with the chosen setting set by hand is who averaged the
gradients in those first steps, and the average is the same: with two ranks the final weights are bit for bit
the same (with more, the summation order of an all-reduce can differ in the last bit).

How the reducer stands aside: DDP decides at each forward whether the backward that follows reduces gradients
(``require_backward_grad_sync``, what ``no_sync()`` sets). A forward pre-hook on the wrapper remembers what
the framework asked for and sets it to False for that forward; a forward hook puts both of DDP's flags back to
what DDP itself would have left (so buffers are broadcast exactly as they would be) and, when the framework
asked for a synchronised backward, passes the outputs through a sink whose backward queues the end-of-backward
work on the outermost graph task (``adapters.backward``): correct with reentrant activation checkpointing,
whose inner backward passes end early. Micro-steps under ``no_sync`` are recorded and averaged with the
synchronised step that ends their window, as DDP does. A model whose forward returns nothing the loss is built
from, or that runs its backward inside the forward (Lightning's manual optimization), has no sink to carry
the callback: it is queued from the first gradient hook of each backward instead.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from . import backward
from .diagnose import group_by_module, parameter_aliases
from .policy import UnusedParams
from .reducer import reducer_names


@dataclass
class Observation:
    """What every rank saw in the observed steps, and what follows from it. Plain data: it travels between
    processes (the doctor's report)."""

    steps: int
    world_size: int
    seconds: float  # the observed steps' time, on the slowest rank
    parameters: list[str]  # the reducer's parameters, in its order
    unused: dict[int, list[list[str]]]  # rank -> per observed step: the parameters that got no gradient
    aliases: dict[str, list[str]] = field(default_factory=dict)
    reentrant: bool = False  # reentrant activation checkpointing in the model's graph (find_unused_parameters fails)
    accumulation: bool = False  # micro-steps under no_sync (gradient accumulation) were seen
    backward_in_forward: bool = False  # the backward ran inside the wrapper's forward (manual optimization)

    @property
    def unused_sets(self) -> list[frozenset[str]]:
        return [frozenset(step) for rank in sorted(self.unused) for step in self.unused[rank]]

    @property
    def never_used(self) -> list[str]:
        """Unused in every observed step on every rank, in reducer order."""
        common = frozenset.intersection(*self.unused_sets) if self.unused_sets else frozenset()
        return [p for p in self.parameters if p in common]

    @property
    def sometimes_unused(self) -> list[str]:
        union = frozenset().union(*self.unused_sets)
        never = set(self.never_used)
        return [p for p in self.parameters if p in union and p not in never]

    @property
    def changed(self) -> bool:
        """The unused set changed between steps or differed between ranks."""
        return len(set(self.unused_sets)) > 1

    def decision(self) -> tuple[UnusedParams, str]:
        sets = self.unused_sets
        if all(not s for s in sets):
            return UnusedParams.strict, "every parameter got a gradient in every observed step on every rank"
        if not self.changed:
            return UnusedParams.ignore, (
                f"the same {len(sets[0])} parameters got no gradient in every observed step on every rank"
            )
        if self.reentrant:
            return UnusedParams.ignore, (
                "the parameters without a gradient changed between steps or ranks, and the model uses reentrant "
                "activation checkpointing, with which find_unused_parameters=True fails; every parameter that was "
                "unused somewhere is left out of DDP, and the guard averages its gradient whenever a rank uses it"
            )
        return UnusedParams.find, "the parameters without a gradient changed between steps or ranks"

    def leave_out(self) -> list[str]:
        """The parameters ignore leaves out of DDP: the never-used ones, and with reentrant checkpointing and a
        changing set, every one that was unused somewhere."""
        if self.changed and self.reentrant:
            return [p for p in self.parameters if p in set(self.never_used) | set(self.sometimes_unused)]
        return self.never_used

    def ranks_unused(self, name: str) -> list[int]:
        return [r for r in sorted(self.unused) if any(name in step for step in self.unused[r])]

    def report(self) -> str:
        """The doctor report: unused parameters by module and rank, the recommended preset, and what the
        observed steps cannot show."""
        choice, reason = self.decision()
        preset = {"strict": "ddp=strict", "ignore": "ddp=ignore", "find": "ddp=safe"}[choice.name]
        if choice is UnusedParams.ignore and not self.changed and not self.accumulation:
            preset = "ddp=ignore (or ddp=static)"
        lines = [
            f"Observed: {self.what_was_observed()} on each of {self.world_size} rank(s), "
            f"{len(self.parameters)} parameters DDP reduces, {self.seconds:.2f} s.",
            *self.unused_lines(),
            f"Recommended: {preset}, because {reason}. ddp=auto picks it by itself.",
            f"What these steps cannot show: only the first {self.steps} step(s) ran. A branch used later (every "
            "k-th step, at random like LayerDrop or a rarely routed expert, after a warm-up) looks unused here. "
            "Where parameters are left out of DDP and a later step does use them, the guard averages their "
            "gradients across ranks before anything reads them and says so once (ddp.on_ignored_grad=fail stops "
            "instead); the run's end compares every rank's parameters. Make it explicit with ddp=safe, or see "
            "more with a larger ddp.probe_steps.",
        ]
        return "\n".join(lines)

    def unused_lines(self) -> list[str]:
        """The parameters that got no gradient, by module and rank (or that every one did)."""
        lines = []
        if self.decision()[0] is UnusedParams.strict:
            lines.append("Every parameter got a gradient in every observed step on every rank.")
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
        if self.reentrant:
            lines.append("The model uses reentrant activation checkpointing (torch.utils.checkpoint with "
                         "use_reentrant=True): find_unused_parameters=True cannot be used with it.")  # fmt: skip
        return lines

    def summary_line(self) -> str:
        choice, reason = self.decision()
        return f"ddp=auto chose {choice.name}: {reason} (observed: {self.what_was_observed()}, {self.seconds:.2f} s)"

    def what_was_observed(self) -> str:
        if self.backward_in_forward:  # manual optimization: each backward inside training_step is DDP's iteration
            return f"the first {self.steps} synchronised backward passes, run inside the model's forward"
        return f"the first {self.steps} training step(s)"


class FirstSteps:
    """The observer on one DDP wrapper for its first ``steps`` synchronised steps (see the module's docstring).

    ``on_done(observation)`` runs on every rank at the end of the last observed backward pass, after the
    gradients of that step were averaged; the observer has removed its hooks by then."""

    def __init__(self, ddp: Any, steps: int, on_done: Callable[[Observation], None], log: logging.Logger, *,
                 forever: bool = False):  # fmt: skip
        import torch
        import torch.distributed as dist

        self.ddp = ddp
        self.steps = steps
        # forever: the wrapper's reducer cannot take the decision; the engine averages every step itself
        self.forever = forever
        self.on_done = on_done
        self.log = log
        self.names = reducer_names(ddp)
        by_name = dict(ddp.module.named_parameters())
        self.params = [by_name[n] for n in self.names]
        self.group = getattr(ddp, "process_group", None)
        self.sparse = {id(p) for m in ddp.module.modules() if getattr(m, "sparse", False) is True
                       for p in m.parameters(recurse=False)}  # fmt: skip
        self.world_size = dist.get_world_size(self.group)
        backend = dist.get_backend(self.group)
        self.device = torch.device("cpu")
        if backend != "gloo" and torch.cuda.is_available():
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.used = torch.zeros(len(self.params), dtype=torch.int32)  # this rank, since the last reduction
        self.records: list[Any] = []  # this rank's use per observed step
        self.reentrant = False
        self.accumulation = False
        self.backward_in_forward = False
        self.done = False
        self.started = 0.0
        self._intended: bool | None = None  # what the framework asked for at the current forward
        self._in_forward = False
        self._queued = False  # the end-of-backward work is queued for the current backward
        self._fallback = False  # no sink: the first gradient hook of a backward queues the work
        self._after_callback = False  # the work ran; a gradient arriving now means it ran too early
        self._lost = False
        self._handles = [p.register_post_accumulate_grad_hook(self._marker(i)) for i, p in enumerate(self.params)]
        self._handles.append(ddp.register_forward_pre_hook(self._before_forward))
        # always_call: a forward that raises (out of memory, dropped by the loop and retried) still gets DDP's flags
        # back as the framework set them
        self._handles.append(ddp.register_forward_hook(self._after_forward, always_call=True))

    # --- forward: keep DDP's reducer out of this step's backward ----------------------------------------

    def _before_forward(self, ddp: Any, *_: Any) -> None:
        import torch

        if self.done or not torch.is_grad_enabled():
            return
        if self._intended is not None:  # the last forward ended without its hook: put the framework's flag back
            ddp.require_backward_grad_sync = self._intended
            self._intended = None
        if self._after_callback and self._lost:
            self._fail_lost()
        if not self.started:
            self.started = time.perf_counter()
        self._intended = bool(ddp.require_backward_grad_sync)
        if not self._intended:
            self.accumulation = True
        ddp.require_backward_grad_sync = False
        self._in_forward = True
        self._queued = False
        self._fallback = False
        self._after_callback = False
        self._lost = False

    def _after_forward(self, ddp: Any, _args: Any, output: Any) -> Any:
        import torch

        if self.done or not torch.is_grad_enabled() or self._intended is None:
            return None
        intended, self._intended = self._intended, None
        self._in_forward = False
        if output is None:  # the forward raised (always_call): flags back, nothing to attach
            ddp.require_backward_grad_sync = intended
            return None
        # What DDP's own forward leaves when the framework asked for intended: buffers are then broadcast at
        # the next forward exactly as they would have been.
        ddp.require_backward_grad_sync = intended
        ddp.require_forward_param_sync = intended
        if not intended:
            return None
        if self._queued:  # the backward already ran inside the forward, and was reduced
            return None
        output, tensors = backward.attach(output, self._reached_outputs)
        if not tensors:
            self._fallback = True
            return output
        if not self.records:  # one walk of the graph, in the first observed step
            self.reentrant = backward.uses_reentrant_checkpointing(tensors)
        return output

    # --- backward ------------------------------------------------------------------------------------

    def _marker(self, index: int) -> Callable[[Any], None]:
        def mark(_: Any) -> None:
            self.used[index] = 1
            if self._after_callback:
                self._lost = True
            elif self._in_forward and not self._queued:
                self.backward_in_forward = True  # manual optimization: backward inside the forward
                self._queue()
            elif self._fallback and not self._queued:
                self._queue()

        return mark

    def _reached_outputs(self) -> None:
        if not self._queued:
            self._queue()

    def _queue(self) -> None:
        self._queued = True
        backward.queue(self._end_of_backward)

    def _end_of_backward(self) -> None:
        """On every rank at the end of a synchronised backward: add up who used what, average the gradients."""
        import torch.distributed as dist

        if self.done:
            return
        self._queued = False
        self._after_callback = not self._in_forward  # inside a forward, more backward passes may follow
        mine = self.used.clone()
        self.used.zero_()
        counts = mine.to(self.device, copy=True)  # all_reduce works in place: mine stays this rank's record
        dist.all_reduce(counts, group=self.group)
        counts = counts.cpu()
        self._average([p for p, c in zip(self.params, counts.tolist(), strict=True) if c > 0])
        if self.forever:
            return
        self.records.append(mine)
        if len(self.records) >= self.steps:
            self._finish()

    def _average(self, params: list[Any]) -> None:
        """DDP's average of ``params``' gradients: each times 1/world size, summed over the ranks; a rank without
        a gradient adds zeros and then holds the average too."""
        import torch
        import torch.distributed as dist

        scale = 1.0 / self.world_size
        by_kind: dict[tuple[Any, Any], list[Any]] = {}
        for p in params:
            if id(p) in self.sparse:  # summed dense, one collective each, on every rank alike; kept sparse
                dense = (p.grad.to_dense() if p.grad is not None else torch.zeros_like(p)) * scale
                dist.all_reduce(dense, group=self.group)
                p.grad = dense.to_sparse()
                continue
            by_kind.setdefault((p.dtype, p.device), []).append(p)
        for group in by_kind.values():
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) * scale
                              for p in group])  # fmt: skip
            dist.all_reduce(flat, group=self.group)
            offset = 0
            for p in group:
                view = flat[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
                if p.grad is None:
                    p.grad = view.clone()
                else:
                    p.grad.copy_(view)

    def _finish(self) -> None:
        import torch
        import torch.distributed as dist

        self.remove()
        mine = torch.stack(self.records).to(torch.uint8)
        gathered = [torch.zeros_like(mine).to(self.device) for _ in range(self.world_size)]
        dist.all_gather(gathered, mine.to(self.device), group=self.group)
        elapsed = torch.tensor([time.perf_counter() - self.started], dtype=torch.float64, device=self.device)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=self.group)
        flags = torch.tensor([self.reentrant, self.accumulation, self.backward_in_forward], dtype=torch.int32,
                             device=self.device)  # fmt: skip
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        unused = {
            rank: [[n for n, u in zip(self.names, step.tolist(), strict=True) if not u] for step in used.cpu()]
            for rank, used in enumerate(gathered)
        }
        reentrant, accumulation, inside = (bool(f) for f in flags.cpu().tolist())
        observation = Observation(
            steps=len(self.records), world_size=self.world_size, seconds=float(elapsed.item()),
            parameters=list(self.names), unused=unused, aliases=parameter_aliases(self.ddp.module),
            reentrant=reentrant, accumulation=accumulation, backward_in_forward=inside,
        )  # fmt: skip
        self.on_done(observation)

    def _fail_lost(self) -> None:
        from .errors import ConfigError

        raise ConfigError(
            "ddp=auto could not follow this model's backward pass: gradients arrived after the end of a backward "
            "pass it saw (the forward returns no tensor the loss is built from, and the model uses reentrant "
            "activation checkpointing).\nFix: choose the setting yourself: ddp=strict if every parameter gets a "
            "gradient in every step, ddp=ignore ddp.ignore=[...] for the parameters that do not, or "
            "use_reentrant=False in torch.utils.checkpoint and ddp=safe."
        )

    def remove(self) -> None:
        """Stop observing: every hook goes, DDP's flags are the framework's own again."""
        self.done = True
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._intended is not None:  # removed between a forward and its hook
            self.ddp.require_backward_grad_sync = self._intended
            self._intended = None
