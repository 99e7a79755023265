"""Knowing when a backward pass ends, from a DDP wrapper's outputs: the way DDP itself does it (``_DDPSink``).

A callback queued on the autograd engine runs when the graph task that queued it ends. Queued from a
parameter's gradient hook, that can be an inner task: reentrant activation checkpointing
(``torch.utils.checkpoint`` with ``use_reentrant=True``) runs a backward of its own for each checkpointed
segment, and a callback queued there runs before the rest of the model has its gradients. Queued from the
backward of the forward's outputs, it belongs to the outermost task and runs after every gradient: ``attach``
passes the outputs' tensors through an identity function whose backward queues the callback (as
``_DDPSink`` does for ``find_unused_parameters`` and ``static_graph``), cloning them as DDP does so that a loss
modified in place stays legal.

Callbacks run in the order they were queued, and one queued while callbacks run goes last: ``after_ddp``
queues a function that queues the real one, so it runs after DDP's own end of backward (which DDP queues when
its last bucket is ready, after the outputs' backward).
"""

from __future__ import annotations

from typing import Any, Callable

_CHECKPOINT_NODES = ("CheckpointFunctionBackward",)  # torch.utils.checkpoint's reentrant variant


def _sink_class() -> Any:
    import torch

    class OutputSink(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, callback: Callable[[], None], *tensors: Any) -> Any:
            ctx.set_materialize_grads(False)  # outputs the loss does not use keep a None gradient
            ctx.callback = callback
            return tuple(t.clone() for t in tensors)

        @staticmethod
        def backward(ctx: Any, *grads: Any) -> Any:
            ctx.callback()
            return (None, *grads)

    return OutputSink


_SINK: Any = None


def attach(output: Any, callback: Callable[[], None]) -> tuple[Any, list[Any]]:
    """``output`` with every tensor that requires a gradient passed through the sink, and those tensors.

    ``callback`` runs when the backward pass reaches the outputs (once per backward that uses any of them); an
    empty list means the output holds no such tensor (torch's pytree finds none) and nothing was attached."""
    global _SINK
    import torch
    from torch.utils._pytree import tree_flatten, tree_unflatten

    flat, spec = tree_flatten(output)
    picked = [i for i, t in enumerate(flat) if isinstance(t, torch.Tensor) and t.requires_grad and t.grad_fn]
    if not picked:
        return output, []
    if _SINK is None:
        _SINK = _sink_class()
    passed = _SINK.apply(callback, *(flat[i] for i in picked))
    for i, tensor in zip(picked, passed, strict=True):
        flat[i] = tensor
    return tree_unflatten(flat, spec), [flat[i] for i in picked]


def queue(fn: Callable[[], None]) -> None:
    """Run ``fn`` when the current backward graph task ends."""
    import torch

    torch.autograd.Variable._execution_engine.queue_callback(fn)


def after_ddp(fn: Callable[[], None]) -> None:
    """Run ``fn`` at the end of the current backward, after DDP's own end of backward."""
    queue(lambda: queue(fn))


def uses_reentrant_checkpointing(tensors: list[Any], limit: int = 200_000) -> bool:
    """Whether the autograd graph behind ``tensors`` holds a reentrant checkpoint (one walk of the graph)."""
    seen: set[int] = set()
    stack = [t.grad_fn for t in tensors if getattr(t, "grad_fn", None) is not None]
    while stack and len(seen) < limit:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if type(node).__name__ in _CHECKPOINT_NODES:
            return True
        stack.extend(fn for fn, _ in node.next_functions if fn is not None)
    return False
