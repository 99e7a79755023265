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

    from .config import conf_dir, register_configs

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
