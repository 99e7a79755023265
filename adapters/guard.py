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
* at the end of every backward pass that DDP synchronises (not inside ``no_sync``, so with gradient
  accumulation it acts once per optimizer step), the ranks learn which left-out parameters got a gradient
  anywhere: a small vector of flags, summed over ranks;
* when any did, their gradients are averaged across ranks the way DDP averages (a rank that did not use one
  contributes zeros), before anything reads them: gradient clipping (nnU-Net clips before its optimizer
  step), GradScaler's unscale and inf check (which decides whether the step is taken at all), and the
  optimizer step. An optimizer pre-step hook would come too late for the first two. Rank 0 logs once per
  parameter which ones, in which step, and the override that makes the choice explicit;
* with ``ddp.on_ignored_grad=fail`` every rank stops instead, in the same place: before the optimizer step.

How the flags travel costs the guard almost everything it costs, so there are two ways:

* ``piggyback`` (gloo): the flags ride on DDP's own reduction. A DDP communication hook reduces every bucket
  as DDP's default does, except the last one, whose reduction it starts at the end of backward (when that
  bucket would be complete anyway) with the flags appended. No collective is added; this matters on CPUs,
  where one small gloo collective costs as much as a few percent of a step. DDP starts its own end of
  backward after this one (it queues it after reducing the last bucket), and only then waits for buckets.
* ``collective`` (nccl, or where the model already has a communication hook): one small all-reduce of the
  flags at the end of backward, on the CPU, in a gloo group of its own: reading flags that rode on a GPU
  bucket would make the CPU wait for the GPU at every step, where this waits only for the other ranks'
  CPUs, which run ahead of their GPUs.

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
    """Installed on a DDP wrapper whose ignore list holds ``names`` (reducer names of the inner module).

    ``exchange``: ``piggyback`` or ``collective`` (see the module's docstring); None picks piggyback on gloo
    when DDP takes a communication hook, else collective. ``flag_group``: the CPU group for ``collective``.
    """

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
        exchange: str | None = None,
    ):
        import torch
        import torch.distributed as dist

        module = ddp.module
        by_name = dict(module.named_parameters(remove_duplicate=False))
        self.names = list(names)
        self.params = [by_name[n] for n in self.names]
        self.counter = counter
        self.on_grad = on_grad
        self.why = why  # who left them out, e.g. "they are named in ddp.ignore"
        self.advice = advice  # the overrides that make the choice explicit
        self.log = log
        self.process_group = getattr(ddp, "process_group", None)
        self.flag_group = flag_group
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.dirty: set[int] = set()
        self.reported: set[str] = set()
        self.synced_steps: list[int] = []  # steps in which gradients were averaged
        self._queued = False
        self._pending: Any = None  # piggyback: (the last bucket's buffer, the future DDP waits for)
        self._handles: list[Any] = []
        for index, param in enumerate(self.params):
            self._handles.append(param.register_post_accumulate_grad_hook(self._marker(index)))
        with torch.no_grad():
            for param in self.params:
                dist.broadcast(param.data, 0, group=self.process_group)
        if exchange is None:
            gloo = dist.get_backend(self.process_group) == "gloo"
            exchange = "piggyback" if gloo and self._hook_into(ddp) else "collective"
        elif exchange == "piggyback" and not self._hook_into(ddp):
            raise RuntimeError("the DDP wrapper already has a communication hook")
        self.exchange = exchange
        if exchange == "collective":
            ignored = {id(p) for p in self.params}
            kept = [p for p in module.parameters() if p.requires_grad and id(p) not in ignored]
            # Every parameter DDP reduces gets a gradient in every synchronised backward (DDP stops the run
            # otherwise: nothing here finds unused parameters), so one of them tells that a backward runs.
            # Two, in case one is unusual; the check is queued once per backward.
            for param in kept[:1] + kept[-1:]:
                self._handles.append(param.register_post_accumulate_grad_hook(self._backward_running))

    def _marker(self, index: int) -> Callable[[Any], None]:
        def mark(_: Any) -> None:
            self.dirty.add(index)

        return mark

    def _take_flags(self, dtype: Any = None) -> Any:
        import torch

        flags = torch.zeros(len(self.params), dtype=dtype or torch.int32)
        if self.dirty:
            flags[sorted(self.dirty)] = 1
            self.dirty.clear()
        return flags

    # --- piggyback: the flags ride on DDP's last bucket ----------------------------------------------

    def _hook_into(self, ddp: Any) -> bool:
        try:
            ddp.register_comm_hook(None, self._comm_hook)
        except RuntimeError:  # the model already has one (DDP takes only one)
            return False
        return True

    def _comm_hook(self, state, bucket):  # DDP checks the names and annotations of a hook's arguments
        """DDP's default reduction for every bucket, but the last, which waits for the end of backward."""
        import torch
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        if not bucket.is_last():
            return allreduce_hook(self.process_group, bucket)
        future: Any = torch.futures.Future()
        self._pending = (bucket.buffer(), future)
        # Queued now, before DDP queues its own end of backward (which waits for this future).
        torch.autograd.Variable._execution_engine.queue_callback(self._after_backward_piggyback)
        return future

    def _after_backward_piggyback(self) -> None:
        import torch
        import torch.distributed as dist

        buffer, future = self._pending
        self._pending = None
        size = buffer.numel()
        combined = torch.cat([buffer.div_(self.world_size), self._take_flags(buffer.dtype).to(buffer.device)])
        dist.all_reduce(combined, group=self.process_group)
        future.set_result(combined[:size])  # DDP copies it into the bucket's gradients
        self._act(combined[size:].to("cpu", torch.int32))

    # --- collective: one small all-reduce of the flags -------------------------------------------------

    def _backward_running(self, _: Any) -> None:
        if self._queued:
            return
        import torch

        self._queued = True
        torch.autograd.Variable._execution_engine.queue_callback(self._after_backward)

    def _after_backward(self) -> None:
        """Runs once at the end of each backward pass, on every rank."""
        import torch.distributed as dist

        self._queued = False
        if not self.counter.syncing:  # inside no_sync: DDP does not reduce either; flags keep accumulating
            return
        flags = self._take_flags()
        dist.all_reduce(flags, group=self.flag_group)
        self._act(flags)

    # --- both ---------------------------------------------------------------------------------------

    def _act(self, flags: Any) -> None:
        """``flags[i]``: on how many ranks left-out parameter i got a gradient since the last reduction."""
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
