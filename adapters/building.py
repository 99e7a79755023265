"""Building objects named by ``_target_`` nodes, shared by the adapters: import, check, instantiate, repeat."""

from __future__ import annotations

import inspect
from typing import Any

from .errors import ConfigError


def split(node: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(target, arguments)`` of a ``_target_`` node."""
    node = dict(node)
    target = node.pop("_target_", None)
    return target, node


def locate(target: str) -> Any:
    """The object a dotted path names (module attribute, or nested attribute)."""
    import importlib

    parts = target.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError as exc:
            if exc.name and not ".".join(parts[:cut]).startswith(exc.name):
                raise  # the module exists but something it imports does not
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(f"no module found in '{target}'")


def check_target(path: str, node: dict[str, Any], example: str) -> None:
    """The target imports and accepts the arguments given: checked once, before any process starts."""
    target, args = split(node)
    if not target:
        raise ConfigError(f"{path}._target_ is missing: name the class or function to build, e.g. {example}.")
    try:
        obj = locate(target)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(
            f"{path}._target_={target} cannot be imported: {exc}\n"
            "Fix: make the module importable (installed, or on PYTHONPATH) and check the spelling."
        ) from None
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    for key in args:
        if key not in params:
            raise ConfigError(
                f"{path}.{key}: {target} takes no argument '{key}'. It takes: {', '.join(params) or 'none'}.\n"
                f"Fix: remove it (~{path}.{key}) or name the whole node: {path}='{{_target_: {target}, ...}}'."
            )


def build(path: str, node: dict[str, Any], **offered: Any) -> Any:
    """Instantiate ``node`` (nested ``_target_`` nodes too). ``offered`` arguments go only where taken."""
    from hydra.utils import instantiate

    target, args = split(node)
    try:
        params = inspect.signature(locate(target)).parameters
    except (TypeError, ValueError):
        params = {}
    extra = {k: v for k, v in offered.items() if k in params and k not in args}
    return instantiate({"_target_": target, **args, **extra}, _convert_="all")


def cycle(iterable: Any) -> Any:
    """Batches without end (a loop that wants more steps than one pass has). A pass that yields nothing (data
    smaller than one batch, or sharded away) raises instead of looping for ever."""
    while True:
        empty = True
        for item in iterable:
            empty = False
            yield item
        if empty:
            raise ConfigError(
                "framework.data gives this rank no batch: fewer samples than one batch per process (after "
                "drop_last and the split across processes).\nFix: more samples, or a smaller framework.batch_size."
            )


def names_in_source(package: str, relative: str, cls: str, method: str | None = None) -> list[str]:
    """Argument names of ``cls.method`` (or, without ``method``, the annotated fields of dataclass ``cls``) in
    ``<package's folder>/<relative>``, read from the source file without importing the library (an import takes
    seconds, and ``explain`` imports no framework); empty where it is not installed."""
    import ast
    import importlib.util
    from pathlib import Path

    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    try:
        tree = ast.parse((Path(list(spec.submodule_search_locations)[0]) / relative).read_text())
    except (OSError, SyntaxError):
        return []
    for node in tree.body:
        if not (isinstance(node, ast.ClassDef) and node.name == cls):
            continue
        if method is None:
            return [item.target.id for item in node.body
                    if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)]  # fmt: skip
        for item in node.body:
            if isinstance(item, ast.FunctionDef) and item.name == method:
                args = item.args
                return [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs) if a.arg != "self"]
    return []


def refuse_objects(path: str, values: dict[str, Any], fix: str) -> None:
    """Keyword arguments passed as they are take plain values: a ``_target_`` anywhere in one is refused."""
    from .presets import _targets

    for where, _ in _targets(values, path):
        raise ConfigError(f"{where.rpartition('.')[0]}: takes plain values; objects to build (_target_) are not "
                          f"built here.\nFix: {fix}")  # fmt: skip
