"""Composing and checking the config: everything that must be right before a run folder or a process exists.

* ``compose`` builds the config from command-line overrides the way ``train.py`` will, and rewrites Hydra's
  errors so they name the key, the valid choices and the fix (Hydra itself suggests ``+key=value`` for a
  misspelt key, which would silently add the typo).
* ``validate`` checks what the schema cannot: keys added with ``+``, the
  launcher, the framework being installed, and the framework's own options.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

from . import registry
from .errors import ConfigError, close_matches
from .policy import (
    Backend,
    DDPPolicy,
    LauncherConfig,
    MemoryPolicy,
    RunConfig,
    check_kwargs,
    check_memory,
    check_policy,
)
from .presets import _ours, _targets, check_shared_files, check_targets, check_trust, config_sources, locate
from .schemas import CONFIG_NAME, conf_dir, register_configs
from .world import World

# --- compose ----------------------------------------------------------------------------------------


def compose(overrides: Sequence[str] = (), *, with_choices: bool = False) -> Any:
    """The config ``train.py`` would run with these overrides, without the ``hydra`` node.

    With ``with_choices``: ``(cfg, {"ddp": "safe", ...})``, the option picked in each config group.
    """
    import yaml
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import open_dict
    from omegaconf.errors import OmegaConfBaseException

    register_configs()
    _check_searchpath(overrides)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = hydra_compose(config_name=CONFIG_NAME, overrides=list(overrides), return_hydra_config=True)
            loaded = _loaded_files(overrides)
    except (HydraException, OmegaConfBaseException) as exc:
        error = _explain_compose_error(exc, overrides)
        raise type(error)(f"{error}{_where(str(exc), overrides)}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"A config file is not valid YAML:\n{_indent(str(exc))}\nFix: correct that file (a shared preset's "
            "owner can), or leave it out of the command line."
        ) from None
    finally:
        GlobalHydra.instance().clear()
    choices = {k: v for k, v in OmegaConf.to_container(cfg.hydra.runtime.choices).items() if "hydra/" not in k}
    with open_dict(cfg):
        del cfg["hydra"]
    sources = config_sources(overrides)
    _check_preset_exists(choices.get("preset"), sources)
    allowed = list(cfg.trust.allowed_targets)
    check_shared_files(loaded, bool(cfg.trust.allow_python_configs))
    check_trust(choices, sources, allowed)
    exempt = {_override_key(o) for o in overrides if _override_key(o).endswith("._target_")}
    ours = [r.config for _, r in loaded if _ours(r) and isinstance(r.config, DictConfig)]
    exempt |= {t for node in ours for _, t in _targets(OmegaConf.to_container(node, enum_to_str=True))}
    check_targets(cfg, allowed, exempt, loaded)
    return (cfg, choices) if with_choices else cfg


def _loaded_files(overrides: Sequence[str]) -> list[tuple[Any, Any]]:
    """Every config file in the composed defaults list, with where Hydra found it (inside an initialized Hydra)."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    loader = GlobalHydra.instance().config_loader()
    defaults = loader.compute_defaults_list(CONFIG_NAME, list(overrides), RunMode.RUN)
    _, repo = loader._parse_overrides_and_create_caching_repo(CONFIG_NAME, list(overrides))
    loaded, seen = [], set()
    for default in defaults.defaults:
        if default.config_path is None or default.config_path in seen:
            continue
        seen.add(default.config_path)
        result = repo.load_config(config_path=default.config_path)
        if result is not None:
            loaded.append((default, result))
    return loaded


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


def _check_searchpath(overrides: Sequence[str]) -> None:
    """A folder named in hydra.searchpath that does not exist would be skipped with a warning, and its presets
    silently missing."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    searchpath = [o for o in overrides if _override_key(o) == "hydra.searchpath"]
    try:
        parsed = OverridesParser.create().parse_overrides(searchpath)
    except HydraException as exc:
        raise ConfigError(
            f"{searchpath[0]}: {exc}\nFix: hydra.searchpath=[file://path/to/folder,pkg://module]"
        ) from None
    for override in parsed:
        value = override.value()
        if not isinstance(value, list):
            raise ConfigError(
                f"{override.input_line}: hydra.searchpath is a list.\nFix: 'hydra.searchpath=[file://{value}]'."
            )
        for url in value:
            url = str(url)
            if url.startswith("pkg://"):
                continue
            folder = Path(url.removeprefix("file://")).expanduser()
            if not folder.is_dir():
                raise ConfigError(
                    f"hydra.searchpath names {url}, but {folder.resolve()} is not a folder.\n"
                    "Fix: point it at the folder that holds preset/, ddp/ ... (file://path), or at a package "
                    "(pkg://module)."
                )


def _check_preset_exists(name: Any, sources: Any) -> None:
    """``optional preset`` in the defaults list makes Hydra skip a preset it cannot find; refuse it instead."""
    if not name:
        return
    from hydra.core.object_type import ObjectType

    if locate(sources, "preset", str(name)) is not None:
        return
    known = sorted(
        {n for src in sources if src.obj.is_group("preset") for n in src.obj.list("preset", ObjectType.CONFIG)}
    )
    raise ConfigError(
        f"preset={name}: there is no such preset. Available: {', '.join(known) or 'none'}.\n"
        "Fix: preset=<one of them>; a team's presets need their folder on hydra.searchpath=[file://...] or "
        "their package installed (python -m adapters presets lists what is visible)."
    )


_IN_CONFIG = re.compile(r"^In '([^'/]+)/([^']+)':")


def _where(text: str, overrides: Sequence[str]) -> str:
    """For an error inside a config file: which file, and where it was found."""
    found = _IN_CONFIG.search(text)
    if not found:
        return ""
    group, name = found.groups()
    source = locate(config_sources(overrides), group, name)
    return f"\n(in {group}={name}: {source.location(group, name)})" if source else f"\n(in {group}={name})"


_COULD_NOT_OVERRIDE = re.compile(r"Could not override '([^']+)'")
_INVALID_VALUE = re.compile(r"Invalid value '([^']*)', expected one of \[([^\]]*)\]")
_FULL_KEY = re.compile(r"full_key: (\S+)")
_KEY_NOT_IN = re.compile(r"Key '([^']+)' not in '([^']+)'")
_NO_OPTION = re.compile(r"Could not find '([^']+)/([^'/]+)'")
_CONVERT = re.compile(r"Value '([^']*)' of type '[^']*' could not be converted to (\w+)")
_NOT_CONTAINER = re.compile(
    r"Invalid value assigned: \w+ is not a (ListConfig|DictConfig)|Cannot assign \w+ to (Dict|List)\["
)
_NOT_BOOL = re.compile(r"Value '([^']*)' is not a valid bool")
_OPTIONS = re.compile(r"Available options in '[^']+':\n((?:\t.*\n?)+)")


def _explain_compose_error(exc: Exception, overrides: Sequence[str]) -> ConfigError:
    text = str(exc)
    cause = exc.__cause__ or exc.__context__
    detail = f"{text}\n{cause}" if cause is not None and str(cause) not in text else text
    if "mismatched input '='" in text:  # a value with '=' in it, such as Lightning's epoch=1-step=20.ckpt
        override = next((o for o in overrides if "=" in o.partition("=")[2]), None)
        if override is not None:
            key, _, value = override.partition("=")
            return ConfigError(
                f"{override}: the value holds '=', which Hydra's override grammar reads as another assignment.\n"
                f"Fix: quote the value, as one shell word: '{key}=\"{value}\"'"
            )
    missing = _COULD_NOT_OVERRIDE.search(text)
    if missing:
        key = missing.group(1)
        deeper = _FULL_KEY.search(detail)
        if deeper and deeper.group(1).startswith(key + "."):
            override = next((o for o in overrides if _override_key(o) == key), key)
            return ConfigError(
                f"{override}: this adds {deeper.group(1)}, which {key} does not have yet.\n"
                f"Fix: ++{override.lstrip('+')} (sets the node, adding keys), or add one key at a time with "
                f"+{deeper.group(1)}=<value>."
            )
        others = [o for o in overrides if not _override_key(o) == key]
        parent = key.rpartition(".")[0]
        try:
            node = OmegaConf.select(compose(others), parent) if parent else compose(others)
        except ConfigError:
            node = None
        return unknown_key_error(key, [str(k) for k in node.keys()] if isinstance(node, DictConfig) else [])
    no_option = _NO_OPTION.search(text)
    if no_option:
        group, option = no_option.groups()
        options = _OPTIONS.search(text)
        listed = ", ".join(o.strip() for o in options.group(1).splitlines() if o.strip()) if options else "none"
        return ConfigError(
            f"{group}={option}: there is no such option in the '{group}' group.\n"
            f"Available: {listed}.\nFix: {group}=<one of them>."
        )
    not_in = _KEY_NOT_IN.search(detail)
    full_key = _FULL_KEY.search(detail)
    if not_in and full_key:
        return unknown_key_error(full_key.group(1), schema_fields(not_in.group(2)))
    container = _NOT_CONTAINER.search(detail)
    if container and full_key:
        key, kind = full_key.group(1), container.group(1) or container.group(2)
        value = next((o.split("=", 1)[1] for o in overrides if _override_key(o) == key), "")
        if kind in ("ListConfig", "List"):
            return ConfigError(f"{key}={value} is not a valid value: {key} takes a list.\n"
                               f"Fix: '{key}=[first,second]' (quoted for the shell).")  # fmt: skip
        return ConfigError(f"{key}={value} is not a valid value: {key} takes a mapping.\n"
                           f"Fix: '{key}={{name: value}}', or set one key: {key}.<name>=<value>.")  # fmt: skip
    convert = _CONVERT.search(detail) or _NOT_BOOL.search(detail)
    if convert and full_key:
        value = convert.group(1)
        kind = convert.group(2) if convert.re is _CONVERT else "Boolean"
        wanted = {"Integer": "a whole number", "Float": "a number", "Boolean": "true or false"}.get(kind, kind)
        example = {"Integer": "2", "Float": "1.5", "Boolean": "true"}.get(kind, "<value>")
        key = full_key.group(1)
        return ConfigError(f"{key}={value} is not a valid value: {key} takes {wanted}.\nFix: {key}=<{wanted}>, "
                           f"e.g. {key}={example}.")  # fmt: skip
    invalid = _INVALID_VALUE.search(detail)
    if invalid:
        full_key = _FULL_KEY.search(detail)
        key = full_key.group(1) if full_key else "the value"
        value, choices = invalid.groups()
        return ConfigError(f"{key}={value} is not a valid value. Valid values: {choices}.\nFix: {key}=<one of them>.")
    return ConfigError(detail.strip())


def schema_fields(class_name: str) -> list[str]:
    """The keys of one of our schema dataclasses, by its class name (as OmegaConf's errors name it)."""
    from .policy import TrustConfig

    schemas = [DDPPolicy, LauncherConfig, MemoryPolicy, RunConfig, TrustConfig]
    schemas += [registry.load_adapter(name).schema for name in registry.FRAMEWORKS]
    for schema in schemas:
        if schema.__name__ == class_name:
            return [f.name for f in fields(schema)]
    return []


def _override_key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def unknown_key_error(key: str, valid: Sequence[str]) -> ConfigError:
    """The misspelt key, what it probably should be, and the keys that exist there."""
    parent, _, leaf = key.rpartition(".")
    prefix = f"{parent}." if parent else ""
    close = close_matches(leaf, valid)
    lines = [f"{key} is not a known setting."]
    if close:
        lines[0] += f" Did you mean {prefix}{close[0]}?"
    if valid:
        lines.append(f"Valid keys in {parent or 'the config'}: {', '.join(valid)}.")
    if close:
        lines.append(f"Fix: {prefix}{close[0]}=<value>.")
    elif not valid and parent:
        lines.append(f"{parent} is an open mapping: add the key with +{key}=<value>.")
    else:
        lines.append(f"Fix: drop {key} from the command line (or the config that sets it), or use one of those keys.")
    return ConfigError("\n".join(lines))


# --- validate ---------------------------------------------------------------------------------------


@dataclass
class RunSettings:
    """The checked config as typed objects: what travels from compose to every rank (plain, picklable)."""

    framework: str  # the framework's name
    framework_cfg: Any  # the ``framework`` node as an instance of the adapter's schema
    policy: DDPPolicy
    launcher: LauncherConfig
    memory: MemoryPolicy
    resume: str | None = None


@dataclass
class Checked(RunSettings):
    """A composed config that passed every check: the typed settings, and the composed config they came from."""

    cfg: DictConfig | None = None

    def settings(self) -> RunSettings:
        return RunSettings(self.framework, self.framework_cfg, self.policy, self.launcher, self.memory, self.resume)


def _check_known_keys(node: DictConfig, schema: type, path: str) -> None:
    valid = [f.name for f in fields(schema)]
    for key in node.keys():
        if key not in valid:
            raise unknown_key_error(f"{path}.{key}", valid)


def to_object(node: DictConfig, schema: type, path: str) -> Any:
    """``node`` as an instance of ``schema``, with errors naming ``path``."""
    from omegaconf.errors import OmegaConfBaseException

    _check_known_keys(node, schema, path)
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), node))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{path}: {exc}") from None


def validate(cfg: DictConfig, *, for_run: bool = True, framework_checks: bool = True) -> Checked:
    """Check a composed config. ``for_run=False`` skips what only matters on this machine (explain);
    ``framework_checks=False`` skips the framework's own (costlier) checks, for a config checked before."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        OmegaConf.resolve(cfg)  # interpolations fail here, before any rank starts, not lazily in one
    except OmegaConfBaseException as exc:
        raise ConfigError(f"The config could not be resolved: {exc}") from None
    policy = to_object(cfg.ddp, DDPPolicy, "ddp")
    launcher = to_object(cfg.launcher, LauncherConfig, "launcher")
    memory = to_object(cfg.memory, MemoryPolicy, "memory")
    check_policy(policy)
    check_kwargs(policy)
    _check_root(cfg)
    check_launcher(launcher, for_run=for_run)
    name = cfg.framework.get("name") if isinstance(cfg.framework, DictConfig) else None
    if name not in registry.FRAMEWORKS:
        raise ConfigError(f"framework.name={name!r} is not one of: {', '.join(registry.FRAMEWORKS)}.")
    if for_run:
        check_backend(launcher)
        adapter = registry.get_adapter(name)
    else:
        adapter = registry.load_adapter(name)
    framework_cfg = to_object(cfg.framework, adapter.schema, "framework")
    adapter.check_policy(policy)
    if for_run and framework_checks:
        adapter.validate(framework_cfg)
    check_memory(memory, name, framework_cfg.batch_size if name == "torch" else None)
    resume = cfg.get("resume")
    check_resume(resume, name)
    return Checked(name, framework_cfg, policy, launcher, memory, None if resume is None else str(resume), cfg)


def _check_root(cfg: DictConfig) -> None:
    from .policy import RunConfig

    valid = [f.name for f in fields(RunConfig)]
    for key in cfg.keys():
        if key not in valid:
            raise unknown_key_error(str(key), valid)


def check_launcher(launcher: LauncherConfig, *, for_run: bool = True) -> None:
    """What torch, torchrun or the sockets would refuse later, refused now with the range and the fix."""
    import ipaddress

    from .policy import LauncherName, out_of_range

    torchrun = launcher.name is LauncherName.torchrun
    if launcher.nproc < 1:
        raise out_of_range("launcher.nproc", launcher.nproc, "the number of worker processes must be at least 1",
                           "launcher.nproc=2 (or the number of GPUs on this machine)")  # fmt: skip
    if launcher.threads_per_rank < 0:
        raise out_of_range("launcher.threads_per_rank", launcher.threads_per_rank, "intra-op threads per rank must "
                           "be 0 (one share of this machine's CPUs per rank) or a positive number",
                           "launcher.threads_per_rank=0")  # fmt: skip
    if launcher.grace_s < 0:
        raise out_of_range("launcher.grace_s", launcher.grace_s, "seconds the other ranks get to report after a "
                           "failure must be 0 or more", "launcher.grace_s=3 (the default)")  # fmt: skip
    if launcher.heartbeat_s != 0 and launcher.heartbeat_s < 3:
        raise out_of_range("launcher.heartbeat_s", launcher.heartbeat_s, "a rank beats once a second, so a frozen "
                           "rank is told apart after 3 s at the earliest; 0 turns the watch off",
                           "launcher.heartbeat_s=60 (the default), or 0")  # fmt: skip
    if not 0 <= launcher.master_port <= 65535:
        raise out_of_range("launcher.master_port", launcher.master_port, "a TCP port is 1 to 65535, and 0 picks a "
                           "free one", "launcher.master_port=0")  # fmt: skip
    host = launcher.master_addr
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not re.fullmatch(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}"
                            r"[A-Za-z0-9])?)*", host) or re.fullmatch(r"[0-9.]+", host):  # fmt: skip
            raise ConfigError(
                f"launcher.master_addr={host} is neither an IP address nor a host name.\n"
                "Fix: launcher.master_addr=127.0.0.1 (the local launcher runs every rank on this machine)."
            ) from None
    if launcher.nnodes < 1:
        raise out_of_range("launcher.nnodes", launcher.nnodes, "at least 1 machine takes part", "launcher.nnodes=1")
    if not 0 <= launcher.node_rank < launcher.nnodes:
        raise out_of_range("launcher.node_rank", launcher.node_rank, f"with launcher.nnodes={launcher.nnodes} "
                           f"machines, this machine's index is 0 to {launcher.nnodes - 1}",
                           f"launcher.node_rank=<0..{launcher.nnodes - 1}>, different on each machine")  # fmt: skip
    if launcher.max_restarts < 0:
        raise out_of_range("launcher.max_restarts", launcher.max_restarts, "restarts must be 0 or more",
                           "launcher.max_restarts=0")  # fmt: skip
    if not torchrun:
        for key in ("max_restarts", "nnodes", "node_rank"):
            if getattr(launcher, key) != getattr(LauncherConfig, key):
                raise ConfigError(
                    f"launcher.{key}={getattr(launcher, key)} needs launcher=torchrun: the local launcher runs one "
                    "machine's ranks once and has no agent to restart them or meet other machines.\n"
                    f"Fix: launcher=torchrun launcher.{key}={getattr(launcher, key)}, or drop launcher.{key}."
                )
    rdzv = ("c10d", "static", "etcd", "etcd-v2")
    if launcher.rdzv_backend not in rdzv:
        raise ConfigError(f"launcher.rdzv_backend={launcher.rdzv_backend} is not one of: {', '.join(rdzv)}.\n"
                          "Fix: launcher.rdzv_backend=c10d.")  # fmt: skip
    endpoint = re.fullmatch(r"(\[[0-9a-fA-F:]+\]|[^:\s]+)(?::(\d+))?", launcher.rdzv_endpoint)
    if not endpoint or (endpoint.group(2) and not 1 <= int(endpoint.group(2)) <= 65535):
        raise ConfigError(
            f"launcher.rdzv_endpoint={launcher.rdzv_endpoint} is not host:port (a port 1 to 65535).\n"
            "Fix: launcher.rdzv_endpoint=<node 0's host>:29400."
        )
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", launcher.rdzv_id):
        raise ConfigError(f"launcher.rdzv_id={launcher.rdzv_id} may hold letters, digits, '.', '_' and '-' only.\n"
                          "Fix: launcher.rdzv_id=<a name for this run, the same on every node>.")  # fmt: skip
    if for_run and not torchrun and not World.detect().in_place:
        import socket

        try:
            with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((host, launcher.master_port))
        except OSError as exc:
            if launcher.master_port and exc.errno == 98:
                raise ConfigError(
                    f"launcher.master_port={launcher.master_port} is in use on this machine (another run?).\n"
                    "Fix: launcher.master_port=0 (picks a free port)."
                ) from None
            raise ConfigError(
                f"launcher.master_addr={host} is not an address of this machine ({exc.strerror}); the local "
                "launcher runs every rank here.\nFix: launcher.master_addr=127.0.0.1."
            ) from None


def check_resume(resume: Any, framework: str) -> None:
    if resume is None:
        return
    if framework != "torch":
        raise ConfigError(
            f"resume={resume}: resuming a run is built for framework=torch, whose loop is ours; "
            f"framework={framework} runs its own loop.\nFix: drop resume (the run starts afresh in a new folder)."
        )
    folder = Path(str(resume)).expanduser()
    last = folder / "checkpoints" / "last.pt"
    if not last.is_file():
        found = sorted(p.parent.parent for p in Path("outputs").glob("*/*/checkpoints/last.pt"))[-3:]
        listed = "\n".join(f"  resume={p}" for p in found) or "  (none under outputs/)"
        raise ConfigError(
            f"resume={resume}: {'there is no such folder' if not folder.is_dir() else f'{last} does not exist'}.\n"
            f"Run folders with a checkpoint, newest last:\n{listed}\n"
            "Fix: resume=<one of them>, or drop resume to start afresh."
        )


def resolve_backend(backend: Backend, local_procs: int) -> Backend:
    """``auto`` is nccl when CUDA has a GPU for every process on this machine, else gloo."""
    if backend is not Backend.auto:
        return backend
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() >= local_procs:
        return Backend.nccl
    return Backend.gloo


def check_backend(launcher: LauncherConfig) -> None:
    """nccl needs a GPU for every local process."""
    if launcher.backend is not Backend.nccl:
        return
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    world = World.detect()
    local_procs = world.local_world_size if world.in_place else launcher.nproc
    if gpus < local_procs:
        raise ConfigError(
            f"launcher.backend=nccl needs one GPU per process: {local_procs} process(es) here, but this "
            f"machine has {gpus} usable GPU(s).\nFix: launcher.backend=gloo (CPU) or launcher.nproc={gpus or 1}."
        )
