"""The guard on parameters left out of DDP: they may never be updated on some ranks only.

``ddp=ignore`` (and ``ddp=auto`` when it picks ignore) puts parameters on DDP's ignore list: DDP neither
reduces their gradients nor broadcasts them. That is right while no rank uses them. If one does get a
gradient on some rank (a branch the first steps never saw run, a rarely routed expert, a name in ``ddp.ignore``
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
  bucket would be complete anyway), in one buffer with the flags appended. No collective is added; this
  matters on CPUs, where one small gloo collective costs as much as a few percent of a step. DDP starts its
  own end of backward after this one (it queues it after reducing the last bucket), and only then waits for
  buckets.
* ``sink``: the same all-reduce, queued from the backward of the wrapper's outputs rather than from a gradient
  hook (``adapters.backward``), for models with reentrant activation checkpointing: their checkpointed
  segments run backward passes of their own, which end before the rest of the model has its gradients.
* ``collective``: one small all-reduce of the flags at the end of backward, on the CPU. On nccl, in a gloo
  group of its own: reading flags that rode on a GPU bucket would make the CPU wait for the GPU at every
  step, where this waits only for the other ranks' CPUs, which run ahead of their GPUs. Also wherever the
  last bucket cannot carry them (``choose_exchange``): a model with its own communication hook or sparse
  gradients, a wrapper with a static graph or one that finds unused parameters (DDP then reduces buckets
  from its own end-of-backward callback, which must not wait for ours), a GPU model on gloo.

Left-out parameters are also broadcast from rank 0 once, when the guard is installed, as DDP does for every
parameter it keeps: otherwise a model initialised differently on each rank would stay different there.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Any, Callable

from .diagnose import group_by_module, reducer_parameter_names
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
    time whether the following backward reduces gradients, and so does the guard. ``before(ddp, syncing)`` runs
    after the count, before any other pre-hook of the wrapper (the engine's checks and decisions). It holds the
    wrapper weakly: a replaced wrapper must be freed at once, or its reducer's hooks would fire in later
    backwards.
    """

    def __init__(self, ddp: Any, start: int = 0, before: Callable[[Any, bool], None] | None = None):
        self._ddp = weakref.ref(ddp)
        self.steps = start  # synchronised forwards so far
        self.forwards = 0  # forwards with gradients enabled (synchronised or not)
        self.syncing = False  # whether the latest forward's backward is synchronised
        self._before = before
        self._handle = ddp.register_forward_pre_hook(self._forward, prepend=True)

    def _forward(self, *_: Any) -> None:
        import torch

        ddp = self._ddp()
        if ddp is None or not torch.is_grad_enabled():  # an evaluation forward: DDP prepares no backward
            return
        self.forwards += 1
        self.syncing = bool(ddp.require_backward_grad_sync)
        if self.syncing:
            self.steps += 1
        if self._before is not None:
            self._before(ddp, self.syncing)

    def remove(self) -> None:
        self._handle.remove()


@dataclass
class _HookState:
    """What the DDP communication hook holds: the guard only weakly (see StepCounter), and the group."""

    guard: Any  # weakref.ref to the IgnoredGradGuard
    process_group: Any


def _piggyback_hook(state, bucket):  # DDP checks a hook's argument names and annotations: leave them so
    """DDP's default reduction for every bucket but the last, whose reduction waits for the end of backward."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    guard = state.guard()
    if guard is None or guard.removed or guard.exchange != "piggyback" or not bucket.is_last():
        return allreduce_hook(state.process_group, bucket)
    return guard._defer(bucket)


_piggyback_hook.dropped_on_rebuild = True  # the engine installs a new guard on a rebuilt reducer


def choose_exchange(ddp: Any) -> tuple[str, str]:
    """``piggyback`` where the flags can ride on DDP's last bucket, else ``collective``; and why."""
    import torch.distributed as dist

    group = getattr(ddp, "process_group", None)
    if dist.get_backend(group) != "gloo":
        return "collective", "nccl: flags on a GPU bucket would make the CPU wait for the GPU at every step"
    if getattr(ddp, "find_unused_parameters", False) or getattr(ddp, "static_graph", False):
        return "collective", "DDP finds unused parameters or has a static graph: it reduces buckets its own way"
    params = [p for p in ddp.module.parameters() if p.requires_grad]
    if any(p.device.type != "cpu" for p in params):
        return "collective", "the model is on a GPU while the backend is gloo"
    if any(getattr(m, "sparse", False) is True for m in ddp.module.modules()):
        return "collective", "the model has sparse gradients"
    return "piggyback", "gloo: the flags ride on DDP's last bucket"


class IgnoredGradGuard:
    """Installed on a DDP wrapper whose ignore list holds ``names`` (reducer names of the inner module).

    ``exchange``: ``piggyback``, ``collective`` or ``sink`` (see the module's docstring); None chooses
    (``choose_exchange``; a model that already has a communication hook gets ``collective``).
    ``flag_group``: the CPU group for ``collective`` (None: the default group).
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
        fixes: Callable[[int], str] | None = None,
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
        self.fixes = fixes  # step -> the fixes when the run stops (adapters.advice.render)
        self.log = log
        self.process_group = getattr(ddp, "process_group", None)
        self.flag_group = flag_group
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.dirty: set[int] = set()
        self.reported: set[str] = set()
        self.synced_steps: list[int] = []  # steps in which gradients were averaged
        self.removed = False
        self._queued_at = -1  # collective: the forward whose backward has its check queued
        self._pending: Any = None  # piggyback: (the last bucket's buffer, the future DDP waits for)
        self._carrier: Any = None  # piggyback: the last bucket and the flags, reduced in one all-reduce
        self._handles: list[Any] = []
        for index, param in enumerate(self.params):
            self._handles.append(param.register_post_accumulate_grad_hook(self._marker(index)))
        with torch.no_grad():
            for param in self.params:
                dist.broadcast(param.data, 0, group=self.process_group)
        chosen, self.exchange_reason = choose_exchange(ddp)
        exchange = exchange or chosen
        if exchange == "piggyback" and not self._hook_into(ddp):
            exchange, self.exchange_reason = "collective", "the model already has a DDP communication hook"
        self.exchange = exchange
        if exchange == "sink":
            self._handles.append(ddp.register_forward_hook(self._attach_sink, always_call=True))
        else:  # the first synchronised forward tells whether the model checkpoints reentrantly: then sink
            self._first = ddp.register_forward_hook(self._look_at_graph, always_call=True)
            self._handles.append(self._first)
        if exchange == "collective":
            # A parameter DDP reduces tells that a backward runs. Without find_unused_parameters or a static
            # graph every one of them gets a gradient in every synchronised backward (DDP stops the run
            # otherwise), so two suffice; with them, any may be unused, so all of them are watched.
            by_reducer = dict(module.named_parameters())
            kept = [by_reducer[n] for n in reducer_parameter_names(module, getattr(ddp, "parameters_to_ignore", ()))]
            if not (getattr(ddp, "find_unused_parameters", False) or getattr(ddp, "static_graph", False)):
                kept = kept[:1] + kept[-1:]
            for param in kept:
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
        state = _HookState(weakref.ref(self), self.process_group)
        try:
            ddp.register_comm_hook(state, _piggyback_hook)
        except RuntimeError:  # the model already has one (DDP takes only one)
            hooks = getattr(ddp, "_comm_hooks", None)
            if isinstance(hooks, list) and hooks and hooks[-1][0] is _piggyback_hook:
                hooks.pop()  # DDP records the hook before its reducer refuses it
            return False
        return True

    def _defer(self, bucket: Any) -> Any:
        import torch

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
        # One buffer for the bucket and the flags, kept from step to step: a fresh one of the bucket's size every
        # step costs the allocator's page faults, more than the copies in and out. A second, small all-reduce for
        # the flags would cost one more gloo round trip every step (about 0.7 ms on a loaded 2-core machine).
        carrier = self._carrier
        if carrier is None or carrier.numel() != size + len(self.params) or carrier.dtype != buffer.dtype:
            carrier = self._carrier = torch.empty(size + len(self.params), dtype=buffer.dtype, device=buffer.device)
        torch.div(buffer, self.world_size, out=carrier[:size])
        carrier[size:] = self._take_flags(buffer.dtype)
        dist.all_reduce(carrier, group=self.process_group)
        buffer.copy_(carrier[:size])
        future.set_result(buffer)  # the bucket's own buffer: DDP copies nothing more
        flags = carrier[size:]
        if bool(flags.any()):
            self._act(flags.to(torch.int32))

    # --- collective: one small all-reduce of the flags -------------------------------------------------

    def _backward_running(self, _: Any) -> None:
        if self._queued_at == self.counter.forwards or self.exchange != "collective":
            return
        import torch

        self._queued_at = self.counter.forwards  # once per backward; the next forward arms it again
        torch.autograd.Variable._execution_engine.queue_callback(self._after_backward)

    def _look_at_graph(self, ddp: Any, _args: Any, output: Any) -> Any:
        import torch
        from torch.utils._pytree import tree_leaves

        from . import backward

        if output is None or not torch.is_grad_enabled() or not ddp.require_backward_grad_sync:
            return None
        self._first.remove()
        tensors = [t for t in tree_leaves(output) if isinstance(t, torch.Tensor) and t.grad_fn is not None]
        if not backward.uses_reentrant_checkpointing(tensors):
            return None
        # Gradient hooks queue their end-of-backward work on the current graph task, which for a checkpointed
        # segment ends before the rest of the model has its gradients: from now on the outputs carry it.
        self.exchange, self.exchange_reason = "sink", "reentrant activation checkpointing"
        self._handles.append(ddp.register_forward_hook(self._attach_sink, always_call=True))
        return self._attach_sink(ddp, _args, output)

    def _attach_sink(self, ddp: Any, _args: Any, output: Any) -> Any:
        import torch

        from . import backward

        if output is None or not torch.is_grad_enabled() or not ddp.require_backward_grad_sync:
            return None
        output, tensors = backward.attach(output, self._outputs_reached)
        return output if tensors else None

    def _outputs_reached(self) -> None:
        from . import backward

        if self._queued_at != self.counter.forwards:
            self._queued_at = self.counter.forwards
            backward.queue(self._after_backward)

    def _after_backward(self) -> None:
        """Runs once at the end of each backward pass, on every rank."""
        import torch.distributed as dist

        if self.removed or not self.counter.syncing:  # no_sync: DDP does not reduce either; flags accumulate
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
            if self.fixes is not None:
                lines.append(self.fixes(step))
                return "\n".join(lines)
        else:
            lines.append("Their gradients were averaged across ranks before the optimizer step, as DDP would have "
                         "done, so the replicas stay equal (ddp.on_ignored_grad=sync; this is said once per "
                         "parameter).")  # fmt: skip
        lines.append(self.advice)
        return "\n".join(lines)

    def remove(self) -> None:
        """Stop watching (the wrapper is being replaced). A communication hook cannot be taken off a DDP
        wrapper; it holds the guard weakly and reduces as DDP's default does from now on."""
        self.removed = True
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
