"""A built DDP wrapper's reducer: the parameters it holds, and rebuilding it in place.

DDP fixes how it treats parameters without a gradient (``find_unused_parameters``, ``static_graph``, the ignore
list) when it builds its reducer, inside its constructor. Frameworks build the wrapper themselves before a step
has run and keep their own reference to it (Lightning's strategy, mmengine's runner, the Trainer's accelerator, a
user's loop variable), so what is decided from the run's own steps (``ddp=auto``) or applied to the framework's
wrapper (``ddp.ignore``) must change the reducer of that very object, not build another wrapper.

``rebuild`` does it the way torch itself rebuilds a reducer when a wrapper is unpickled
(``DistributedDataParallel.__setstate__``): the old reducer's autograd hooks are removed
(``_remove_autograd_hooks``, which torch provides so that a wrapper can be rebuilt on the same model), the
parameters are collected again (``_build_params_for_reducer``), a new reducer and logger are built
(``_ddp_init_helper``), and the wrapper's communication hooks are registered on the new reducer. No collective
runs, so it is safe wherever every rank reaches the same point of its step with the same decision: the engine
calls it right before a training forward, on every rank.
"""

from __future__ import annotations

from typing import Any

from .diagnose import reducer_parameter_names


class CannotRebuild(RuntimeError):
    """The wrapper uses a DDP feature whose state a rebuilt reducer would lose."""


def cannot_rebuild(ddp: Any) -> str:
    """Why ``ddp``'s reducer cannot be rebuilt in place, or '' when it can."""
    if getattr(ddp, "_use_python_reducer", False):
        return "it runs torch.compile's Python reducer (optimize_ddp='python_reducer')"
    if getattr(ddp, "mixed_precision", None) is not None:
        return "it was built with DDP's mixed_precision argument"
    if getattr(ddp, "_delay_all_reduce_params", None):
        return "it delays the reduction of some parameters (delay_all_reduce_named_params)"
    if not hasattr(ddp, "reducer") or not hasattr(ddp, "_ddp_init_helper"):
        return f"it is a {type(ddp).__name__}, not a DistributedDataParallel"
    try:
        named_hook = ddp._get_ddp_logging_data().get("comm_hook")
    except Exception:  # the logging data only sharpens the check
        named_hook = None
    if named_hook and not getattr(ddp, "_comm_hooks", None):
        return f"it has a built-in communication hook ({named_hook}) that cannot be registered again"
    return ""


def rebuild(ddp: Any, *, ignore: list[str] | None = None, find: bool | None = None,
            static: bool | None = None) -> None:  # fmt: skip
    """Give ``ddp`` a new reducer: ``ignore`` (names as ``DistributedDataParallel`` looks them up, added to the
    module's own ignore list), ``find`` (``find_unused_parameters``), ``static`` (``static_graph``); None keeps
    what the wrapper has. The module, its parameters, the wrapper object and what frameworks attached to it stay."""
    why = cannot_rebuild(ddp)
    if why:
        raise CannotRebuild(f"the DDP wrapper's reducer cannot be rebuilt: {why}")
    from torch.nn.parallel import DistributedDataParallel

    module = ddp.module
    if ignore:
        own = list(getattr(module, "_ddp_params_and_buffers_to_ignore", ()))
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            module, own + [n for n in ignore if n not in own]
        )
        ddp.parameters_to_ignore = set(module._ddp_params_and_buffers_to_ignore)
    if find is not None:
        ddp.find_unused_parameters = find
    want_static = ddp.static_graph if static is None else static
    # A hook marked ``dropped_on_rebuild`` belongs to something that installs itself again (the guard).
    hooks = [(h, st) for h, st in getattr(ddp, "_comm_hooks", ()) if not getattr(h, "dropped_on_rebuild", False)]
    ddp.reducer._remove_autograd_hooks()
    ddp._module_parameters = [p for n, p in module.named_parameters() if n not in ddp.parameters_to_ignore]
    parameters, expect_sparse = ddp._build_params_for_reducer()
    names = ddp._build_debug_param_to_name_mapping(parameters)
    ddp.static_graph = False
    ddp._ddp_init_helper(parameters, expect_sparse, names, want_static)
    ddp._has_rebuilt_buckets = False
    ddp._comm_hooks = []
    for hook, state in hooks:
        ddp.register_comm_hook(state, hook)
    if want_static:
        ddp._set_static_graph()


def reducer_names(ddp: Any) -> list[str]:
    """The names of the parameters ``ddp``'s reducer holds, in its index order, as of now (call it right after the
    reducer is built: it reads ``requires_grad`` as it is)."""
    return reducer_parameter_names(ddp.module, getattr(ddp, "parameters_to_ignore", ()))
