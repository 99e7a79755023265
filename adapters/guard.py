"""The guard on parameters left out of DDP: they may never be updated on some ranks only.

``ddp=ignore`` (and ``ddp=auto`` when it picks ignore) puts parameters on DDP's ignore list: DDP neither
reduces their gradients nor broadcasts them. That is right while no rank uses them. If one does get a
gradient on some rank (a branch the probe never saw run, a rarely routed expert, a name in ``ddp.ignore``
that the model does use), that rank's optimizer would apply a gradient the others never see, and the
replicas would drift apart without a word.

The guard closes that hole for every framework at once, because it acts inside backward, not in any
framework's training loop:

* a gradient hook on each left-out parameter marks it as used on this rank (the hooks cost nothing while
  the parameters stay unused);
* at the end of every backward pass that DDP synchronises (not inside ``no_sync``, so gradient
  accumulation pays once per optimizer step), the ranks add up one small vector of flags: which left-out
  parameters got a gradient anywhere. That is the guard's whole cost per step: one tiny all-reduce, on the
  CPU (a gloo group of its own when the run uses nccl, so it never waits for the GPU);
* when any did, their gradients are averaged across ranks the way DDP averages (a rank that did not use one
  contributes zeros), before anything reads them: gradient clipping (nnU-Net clips before its optimizer
  step), GradScaler's unscale and inf check (which decides whether the step is taken at all), and the
  optimizer step. An optimizer pre-step hook would come too late for the first two. Rank 0 logs once per
  parameter which ones, in which step, and the override that makes the choice explicit;
* with ``ddp.on_ignored_grad=fail`` every rank stops instead, in the same place: before the optimizer step.

Left-out parameters are also broadcast from rank 0 once, when the guard is installed, as DDP does for every
parameter it keeps: otherwise a model initialised differently on each rank would stay different there.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from .diagnose import group_by_module
from .policy import OnIgnoredGrad


class IgnoredParametersGotGradients(RuntimeError):
    """``ddp.on_ignored_grad=fail``: a parameter left out of DDP got a gradient; raised on every rank."""

    def __init__(self, message: str, names: list[str], step: int):
        super().__init__(message)
        self.names = names
        self.step = step


class StepCounter:
    """Counts the training steps DDP synchronises, from a forward pre-hook on the DDP wrapper.

    A step counts when its forward runs with gradients enabled outside ``no_sync``: DDP decides at forward
    time whether the following backward reduces gradients, and so does the guard.
    """

    def __init__(self, ddp: Any, start: int = 0):
        self.ddp = ddp
        self.steps = start  # synchronised forwards so far
        self.syncing = False  # whether the latest forward's backward is synchronised
        self._handle = ddp.register_forward_pre_hook(self._forward)

    def _forward(self, *_: Any) -> None:
        import torch

        if not torch.is_grad_enabled():  # an evaluation forward: DDP prepares no backward for it
            return
        self.syncing = self.ddp.require_backward_grad_sync
        if self.syncing:
            self.steps += 1

    def remove(self) -> None:
        self._handle.remove()


class IgnoredGradGuard:
    """Installed on a DDP wrapper whose ignore list holds ``names`` (reducer names of the inner module)."""

    def __init__(
        self,
        ddp: Any,
        names: list[str],
        counter: StepCounter,
        *,
        on_grad: OnIgnoredGrad,
        why: str,
        advice: str,
        log: logging.Logger,
        flag_group: Any = None,
    ):
        import torch
        import torch.distributed as dist

        module = ddp.module
        by_name = dict(module.named_parameters(remove_duplicate=False))
        self.names = list(names)
        self.params = [by_name[n] for n in self.names]
        self.counter = counter
        self.on_grad = on_grad
        self.why = why  # who left them out, e.g. "ddp=auto's probe (2 steps) saw them unused"
        self.advice = advice  # the overrides that make the choice explicit
        self.log = log
        self.process_group = getattr(ddp, "process_group", None)
        self.flag_group = flag_group  # CPU (gloo) group for the flags; None: the default group
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.dirty: set[int] = set()
        self.reported: set[str] = set()
        self.synced_steps: list[int] = []  # steps in which gradients were averaged (for tests and summaries)
        self._queued = False
        self._handles: list[Any] = []
        for index, param in enumerate(self.params):
            self._handles.append(param.register_post_accumulate_grad_hook(self._marker(index)))
        ignored = {id(p) for p in self.params}
        kept = [p for p in module.parameters() if p.requires_grad and id(p) not in ignored]
        # Any parameter DDP reduces gets a gradient in every synchronised backward (DDP stops the run
        # otherwise, since nothing here finds unused parameters), so one of them tells that a backward ran.
        # Two, for a model whose first parameter is unusual; the hook queues the check only once.
        for param in kept[:1] + kept[-1:]:
            self._handles.append(param.register_post_accumulate_grad_hook(self._backward_running))
        with torch.no_grad():
            for param in self.params:
                dist.broadcast(param.data, 0, group=self.process_group)

    def _marker(self, index: int) -> Callable[[Any], None]:
        def mark(_: Any) -> None:
            self.dirty.add(index)

        return mark

    def _backward_running(self, _: Any) -> None:
        if self._queued:
            return
        import torch

        self._queued = True
        torch.autograd.Variable._execution_engine.queue_callback(self._after_backward)

    def _after_backward(self) -> None:
        """Runs once at the end of each backward pass, on every rank."""
        import torch
        import torch.distributed as dist

        self._queued = False
        if not self.counter.syncing:  # inside no_sync: DDP does not reduce either; flags keep accumulating
            return
        flags = torch.zeros(len(self.params), dtype=torch.int32)
        if self.dirty:
            flags[sorted(self.dirty)] = 1
            self.dirty.clear()
        dist.all_reduce(flags, group=self.flag_group)
        if not bool(flags.any()):
            return
        used = flags.nonzero().flatten().tolist()
        step = self.counter.steps
        names = [self.names[i] for i in used]
        ranks_using = {self.names[i]: int(flags[i]) for i in used}
        if self.on_grad is OnIgnoredGrad.fail:
            raise IgnoredParametersGotGradients(self._message(names, ranks_using, step, stopping=True), names, step)
        self._average([self.params[i] for i in used])
        self.synced_steps.append(step)
        new = [n for n in names if n not in self.reported]
        if new and self.rank == 0:
            self.log.warning(self._message(new, ranks_using, step, stopping=False))
        self.reported.update(new)

    def _average(self, params: list[Any]) -> None:
        """DDP's averaging for ``params``: sum over ranks of each rank's gradient (zeros where None) / world."""
        import torch
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        by_kind: dict[tuple[Any, Any], list[Any]] = {}
        for p in params:
            by_kind.setdefault((p.dtype, p.device), []).append(p)
        for group in by_kind.values():
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in group]
            flat = _flatten_dense_tensors(grads)
            dist.all_reduce(flat, group=self.process_group)
            flat.div_(self.world_size)
            for p, averaged in zip(group, _unflatten_dense_tensors(flat, grads), strict=True):
                if p.grad is None:
                    p.grad = averaged.clone()
                else:
                    p.grad.copy_(averaged)

    def _message(self, names: list[str], ranks_using: dict[str, int], step: int, *, stopping: bool) -> str:
        counts = sorted(set(ranks_using.values()))
        where = (f"on {counts[0]} of {self.world_size} ranks" if len(counts) == 1
                 else f"on {counts[0]} to {counts[-1]} of {self.world_size} ranks")  # fmt: skip
        lines = [f"{len(names)} parameter(s) left out of DDP got a gradient in training step {step}, {where} "
                 f"({self.why}):"]  # fmt: skip
        for module, leaves in group_by_module(names).items():
            lines.append(f"  {module}: {', '.join(leaves)}")
        if stopping:
            lines.append("The run stops before the optimizer step (ddp.on_ignored_grad=fail), so no rank applied "
                         "a gradient the others did not.")  # fmt: skip
        else:
            lines.append("Their gradients were averaged across ranks before the optimizer step, as DDP would have "
                         "done, so the replicas stay equal (ddp.on_ignored_grad=sync; this is said once per "
                         "parameter).")  # fmt: skip
        lines.append(self.advice)
        return "\n".join(lines)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
