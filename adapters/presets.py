"""Presets: where each config comes from, what a shared one sets, and whether its callables are allowed.

A team shares presets as a folder (``hydra.searchpath=[file://...]``) or as a pip package whose Hydra
SearchPathPlugin adds it to the search path. Configs found there are not ours: the callables they name
(``_target_``) must lie under ``trust.allowed_targets``, and they may not change ``trust`` themselves.
This module reads the config sources the way Hydra searches them (first source that has a config wins).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from omegaconf import DictConfig, OmegaConf

from .errors import ConfigError

GROUPS = ("preset", "framework", "ddp", "launcher")


@dataclass
class Source:
    provider: str
    url: str  # scheme://path, as Hydra names it
    obj: Any  # hydra's ConfigSource
    trusted: bool

    def location(self, group: str, name: str) -> str:
        return f"{self.url.rstrip('/')}/{group}/{name}.yaml ({self.provider})"


def config_sources(overrides: Sequence[str] = ()) -> list[Source]:
    """Hydra's search path for these overrides, in search order: plugins' paths and hydra.searchpath too.

    Built without touching Hydra's global state, so it can run inside a running Hydra app.
    """
    from hydra._internal.sources_registry import SourcesRegistry
    from hydra._internal.utils import create_config_search_path
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from .schemas import conf_dir, register_configs

    register_configs()
    ours = str(conf_dir())
    entries = [(e.provider, e.path if "://" in e.path else f"file://{e.path}")
               for e in create_config_search_path(ours).get_path()]  # fmt: skip
    extra = []
    searchpath = [o for o in overrides if o.startswith("hydra.searchpath")]
    for override in OverridesParser.create().parse_overrides(searchpath):
        extra += [("hydra.searchpath", url if "://" in url else f"file://{url}") for url in override.value() or []]
    main = next((i for i, (provider, _) in enumerate(entries) if provider == "main"), len(entries) - 1)
    ordered = entries[: main + 1] + extra + entries[main + 1 :]
    sources = []
    for provider, url in ordered:
        scheme = url.split("://", 1)[0]
        obj = SourcesRegistry.instance().resolve(scheme)(provider=provider, path=url)
        sources.append(Source(provider, url, obj, _trusted(obj, ours)))
    return sources


def _trusted(source: Any, ours: str) -> bool:
    if source.provider in ("hydra", "schema"):
        return True
    return source.provider == "main" and source.path.rstrip("/") == ours.rstrip("/")


def locate(sources: Iterable[Source], group: str, name: str) -> Source | None:
    return next((s for s in sources if s.obj.is_config(f"{group}/{name}")), None)


def _raw(source: Source, group: str, name: str) -> DictConfig:
    return source.obj.load_config(f"{group}/{name}.yaml").config


def _targets(node: Any, path: str = "") -> Iterable[tuple[str, Any]]:
    """Every ``_target_`` in a plain container, with its path."""
    if isinstance(node, dict):
        for key, value in node.items():
            here = f"{path}.{key}" if path else str(key)
            if key == "_target_":
                yield here, value
            else:
                yield from _targets(value, here)
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from _targets(item, f"{path}[{i}]")


def check_trust(choices: dict[str, Any], sources: list[Source], allowed: Sequence[str]) -> None:
    """Refuse a config from a shared source that names a callable outside ``allowed`` or widens ``trust``."""
    for group in GROUPS:
        name = choices.get(group)
        if not name:
            continue
        source = locate(sources, group, str(name))
        if source is None or source.trusted:
            continue
        raw = _raw(source, group, str(name))
        where = f"{group}={name} (from {source.location(group, str(name))})"
        if "trust" in raw:
            raise ConfigError(f"{where} sets `trust`: a shared config cannot widen what it is trusted with. "
                              "Remove `trust` from it; set trust.allowed_targets on the command line.")  # fmt: skip
        for path, target in _targets(OmegaConf.to_container(raw, resolve=False)):
            ok = (
                isinstance(target, str)
                and "${" not in target
                and any(target == prefix.rstrip(".") or target.startswith(prefix) for prefix in allowed)
            )
            if not ok:
                raise ConfigError(
                    f"{where} names the callable {target!r} at {path}. Shared presets may only name callables "
                    f"under trust.allowed_targets: {', '.join(allowed)}.\nFix: review that preset; if you trust "
                    f"it, allow the module on the command line, e.g. "
                    f"'trust.allowed_targets=[{', '.join([*allowed, str(target).rsplit('.', 1)[0] + '.'])}]'."
                )


@dataclass
class PresetInfo:
    name: str
    location: str
    trusted: bool
    sets: list[str]
    shadowed_by: str | None = None


def describe(raw: DictConfig) -> list[str]:
    """What a preset file sets: the groups it picks, then each value, as command-line overrides."""
    out = []
    for entry in raw.get("defaults", []) or []:
        if isinstance(entry, (DictConfig, dict)):
            for key, value in entry.items():
                out.append(f"{str(key).replace('override', '').strip().lstrip('/')}={value}")
    body = OmegaConf.masked_copy(raw, [k for k in raw.keys() if k != "defaults"]) if "defaults" in raw else raw
    for key, value in _leaves(OmegaConf.to_container(body, resolve=False)):
        out.append(f"{key}={value}")
    return out


def _leaves(node: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from _leaves(value, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, node


def list_presets(overrides: Sequence[str] = ()) -> list[PresetInfo]:
    from hydra.core.object_type import ObjectType

    sources = config_sources(overrides)
    seen: dict[str, str] = {}
    infos = []
    for source in sources:
        if not source.obj.is_group("preset"):
            continue
        for name in sorted(source.obj.list("preset", ObjectType.CONFIG)):
            info = PresetInfo(name, source.location("preset", name), source.trusted,
                              describe(_raw(source, "preset", name)), seen.get(name))  # fmt: skip
            seen.setdefault(name, info.location)
            infos.append(info)
    return infos


def format_presets(infos: list[PresetInfo]) -> str:
    if not infos:
        return "No presets found."
    lines = []
    for info in infos:
        origin = "built in" if info.trusted else "shared: its callables are checked against trust.allowed_targets"
        lines.append(f"preset={info.name}    {info.location}  [{origin}]")
        if info.shadowed_by:
            lines.append(f"  (not used: {info.shadowed_by} comes first in the search path)")
        lines.extend(f"  {item}" for item in info.sets)
    return "\n".join(lines)


# --- what a shared source really contributes ---------------------------------------------------------

_OWN_CONFIGS = ("config", "adapters_schema")


def _ours(result: Any) -> bool:
    """A config Hydra loaded from this project's conf/, Hydra's own package, or the ConfigStore (our schemas and
    installed Hydra plugins' configs)."""
    from .schemas import conf_dir

    if result.path == "structured://":  # registered by installed Python code: ours, Hydra's, its plugins'
        return True
    if result.provider == "hydra" and result.path == "pkg://hydra.conf":
        return True
    return result.provider == "main" and result.path.rstrip("/") == f"file://{conf_dir()}".rstrip("/")


# Keys that name a checkpoint to load (torch.load unpickles it): the run folder to resume, mmengine's resume and
# load_from, fastNLP's resume_from.
UNPICKLED = (
    "resume",
    "framework.resume",
    "framework.load_from",
    "framework.resume_from",
    "framework.ckpt_path",
    "framework.resume_from_checkpoint",
)


def check_shared_files(loaded: Sequence[tuple[Any, Any]], allow_python_configs: bool) -> None:
    """Every config file from a shared source in the composed defaults list (``(default, result)`` pairs, as
    Hydra resolved them), whatever its group or package: it may not shadow this project's schemas, set any
    ``hydra.*`` key or pick a Hydra group (callbacks, logging, launcher, search path, run folder run before
    any check), set ``trust``, point framework.config at a Python file (mmengine executes it), or name a checkpoint
    to load (``UNPICKLED``: loading unpickles it)."""
    for default, result in loaded:
        if _ours(result):
            continue
        path = default.config_path
        where = f"{path}.yaml from {result.path} ({result.provider})"
        group = path.split("/", 1)[0] if "/" in path else ""
        if group == "schema" or path in _OWN_CONFIGS:
            raise ConfigError(
                f"{where} has the name of this project's own schema ({path}): a shared source cannot replace it.\n"
                "Fix: remove or rename that file in the shared source."
            )
        if group == "hydra":
            raise ConfigError(
                f"{where} is one of Hydra's own config groups (logging, callbacks, launcher ...), which act before "
                "any check: a shared source cannot provide them.\nFix: keep Hydra settings on the command line or "
                "in this project's conf/."
            )
        package = default.package or ""
        body = result.config or {}
        keys = [str(k) for k in body.keys() if k != "defaults"]
        written = [f"{package}.{k}" if package else k for k in keys] or ([package] if package else [])
        for key in written:
            root = key.split(".", 1)[0]
            if key == "hydra" and not package and isinstance(body.get("hydra"), (DictConfig, dict)) and body["hydra"]:
                key = f"hydra.{next(iter(body['hydra']))}"
            if root == "hydra":
                raise ConfigError(
                    f"{where} sets {key}: Hydra's settings (callbacks, job_logging, launcher, searchpath, run.dir) "
                    "run or act before any check, so a shared source may not set them.\n"
                    f"Fix: remove `{key}` from that file; set Hydra options on the command line."
                )
            if root == "trust":
                raise ConfigError(
                    f"{where} sets `{key}`: a shared config cannot widen what it is trusted with.\n"
                    "Fix: remove it from that file; set trust.allowed_targets on the command line."
                )
        config = _select(body, package, "framework.config")
        if config is not None and not allow_python_configs:
            if not (isinstance(config, str) and config.startswith("mmdet::") and "${" not in config):
                raise ConfigError(
                    f"{where} sets framework.config={config}: an mmdet config is a Python file that mmengine "
                    "executes, so one named by a shared source is refused (configs shipped with mmdet, "
                    "mmdet::<path>, are allowed).\nFix: if you trust that file, allow it on the command line with "
                    "trust.allow_python_configs=true, or name the config yourself: framework.config=<path>."
                )
        for key in UNPICKLED:
            value = _select(body, package, key)
            if value is not None and value is not False and not allow_python_configs:
                raise ConfigError(
                    f"{where} sets {key}={value}: that names a checkpoint to load, and loading one unpickles it (a "
                    "pickle can run code), so one named by a shared source is refused.\nFix: if you trust that file, "
                    f"allow it on the command line with trust.allow_python_configs=true, or name it yourself: "
                    f"{key}=<path>."
                )


def _select(body: Any, package: str, key: str) -> Any:
    """The value ``body`` (a file placed at ``package``) gives the absolute ``key``, or None."""
    prefix = f"{package}." if package else ""
    if package and not key.startswith(prefix):
        return None
    node: Any = body
    for part in key[len(prefix) :].split("."):
        if not isinstance(node, (DictConfig, dict)) or part not in node:
            return None
        node = node[part]
    return node


def _set_by(loaded: Sequence[tuple[Any, Any]], key: str) -> str:
    """ " (set by <file> from <source>)" for the last shared file that sets ``key`` or a node above it."""
    parts = key.split(".")
    for default, result in reversed(loaded):  # later files in the defaults list win
        if _ours(result) or not isinstance(result.config, DictConfig):
            continue
        for n in range(len(parts), 0, -1):
            if _select(result.config, default.package or "", ".".join(parts[:n])) is not None:
                return f" (set by {default.config_path}.yaml from {result.path})"
    return ""


def check_targets(cfg: Any, allowed: Sequence[str], exempt: set[str], loaded: Sequence[tuple[Any, Any]] = ()) -> None:
    """Every ``_target_`` in the composed, resolved config, judged by where the object it names really comes
    from: ``torch.nn.modules.module.torch.load`` is spelled under torch.nn. but is ``torch.load``. ``exempt``:
    targets the command line set, and those spelled in this project's own config files."""
    import inspect

    from omegaconf.errors import OmegaConfBaseException

    try:
        container = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException:
        return  # validate() names the key that does not resolve, before anything runs
    for path, target in _targets(container):
        if path in exempt or target in exempt:
            continue
        fix = (
            f"Fix: review the config that sets {path}; if you trust {target!r}, allow it on the command line, e.g. "
            f"'trust.allowed_targets=[{', '.join([*allowed, str(target).rsplit('.', 1)[0] + '.'])}]'."
        )
        origin = _set_by(loaded, path)
        if not (isinstance(target, str) and _under(target, allowed)):
            raise ConfigError(f"{path}={target!r}{origin} names a callable outside trust.allowed_targets "
                              f"({', '.join(allowed)}).\n{fix}")  # fmt: skip
        from hydra._internal.utils import _locate

        try:
            obj = _locate(target)
        except Exception as exc:
            raise ConfigError(f"{path}={target!r}{origin} cannot be located: {exc}\n{fix}") from None
        module = obj.__name__ if inspect.ismodule(obj) else getattr(obj, "__module__", None)
        if not (isinstance(module, str) and _under(module + ".", allowed)):
            raise ConfigError(
                f"{path}={target!r}{origin} is spelled under trust.allowed_targets but is really {module}."
                f"{getattr(obj, '__qualname__', '')} (module {module}), which is not.\n{fix}"
            )


def _under(name: str, allowed: Sequence[str]) -> bool:
    return any(name == prefix.rstrip(".") or name.startswith(prefix) for prefix in allowed)
