"""Composing and checking the config: everything that must be right before a run folder or a process exists.

* ``register_configs`` puts the schemas in Hydra's ConfigStore, outside any selectable group's options:
  ``RunConfig`` as ``adapters_schema`` (the root of conf/config.yaml), and each framework's schema under
  ``schema/framework/<name>``, which its conf/framework/<name>.yaml extends.
* ``compose`` builds the config from command-line overrides the way ``train.py`` will, and rewrites Hydra's
  errors so they name the key, the valid choices and the fix (Hydra itself suggests ``+key=value`` for a
  misspelt key, which would silently add the typo).
* ``validate`` checks what the schema cannot: keys added with ``+``, choices not implemented yet, the
  launcher, the framework being installed, and the framework's own options.
"""

from __future__ import annotations

import difflib
import os
import re
import time
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

from . import registry
from .errors import ConfigError
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

CONFIG_NAME = "config"
START_RESOLVER = "adapters_start"


def conf_dir() -> Path:
    """conf/ in a clone (next to the package), or adapters/conf in an installed wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / f"{CONFIG_NAME}.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"conf/{CONFIG_NAME}.yaml not found next to {here}")


_registered = False


def register_configs() -> None:
    """Store the schemas in Hydra's ConfigStore and the run-folder resolver in OmegaConf (idempotent)."""
    global _registered
    if _registered:
        return
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="adapters_schema", node=RunConfig)
    for name in registry.FRAMEWORKS:
        cs.store(group="schema/framework", name=name, node=registry.load_adapter(name).schema)
    _registered = True


# --- one run folder per run -------------------------------------------------------------------------

_start: float | None = None


def run_start() -> float:
    """When this run started, the same on every rank.

    Under torchrun every rank composes the config itself, a second apart, so ``${now:...}`` would give
    each rank its own folder. Rank 0 publishes its time in torchrun's own store (first writer wins, so a
    restarted worker finds the same folder) and the other ranks read it.
    """
    global _start
    if _start is None:
        if "ADAPTERS_RUN_START" in os.environ:  # set by the launching process for its jobs (submitit)
            _start = float(os.environ["ADAPTERS_RUN_START"])
        else:
            _start = _shared_time() if torchrun_env() else time.time()
    return _start


def _format_start(pattern: str) -> str:
    return time.strftime(pattern, time.localtime(run_start()))


# At import: processes that unpickle a Hydra job (submitit's) resolve hydra.sweep.dir before anything else.
OmegaConf.register_new_resolver(START_RESOLVER, _format_start, replace=True)


def torchrun_env() -> bool:
    """True in a worker started by torchrun (or torch.distributed.launch)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or ("LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ)


def agent_store(prefix: str, timeout_s: float) -> Any:
    """A client of torchrun's agent store under ``prefix`` (None when not started by torchrun's agent).

    The store outlives the workers (and their restarts), and every node reaches it.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    from datetime import timedelta

    from torch.distributed import PrefixStore, TCPStore

    store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                     timeout=timedelta(seconds=timeout_s))  # fmt: skip
    return PrefixStore(prefix, store)


def _shared_time() -> float:
    store = agent_store(f"adapters/start/{os.environ.get('TORCHELASTIC_RUN_ID', '')}", timeout_s=120)
    if store is None:
        return time.time()  # the old launcher has no store before init_process_group
    if os.environ.get("RANK", "0") == "0":
        value = store.compare_set("time", "", repr(time.time()))
    else:
        value = store.get("time")
    return float(value)


# --- compose ----------------------------------------------------------------------------------------


def compose(overrides: Sequence[str] = (), *, with_choices: bool = False) -> Any:
    """The config ``train.py`` would run with these overrides, without the ``hydra`` node.

    With ``with_choices``: ``(cfg, {"ddp": "safe", ...})``, the option picked in each config group.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import open_dict
    from omegaconf.errors import OmegaConfBaseException

    from .presets import check_trust, config_sources

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = hydra_compose(config_name=CONFIG_NAME, overrides=list(overrides), return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as exc:
        error = _explain_compose_error(exc, overrides)
        raise type(error)(f"{error}{_where(str(exc), overrides)}") from None
    finally:
        GlobalHydra.instance().clear()
    choices = {k: v for k, v in OmegaConf.to_container(cfg.hydra.runtime.choices).items() if "hydra/" not in k}
    with open_dict(cfg):
        del cfg["hydra"]
    check_trust(choices, config_sources(overrides), list(cfg.trust.allowed_targets))
    return (cfg, choices) if with_choices else cfg


_IN_CONFIG = re.compile(r"^In '([^'/]+)/([^']+)':")


def _where(text: str, overrides: Sequence[str]) -> str:
    """For an error inside a config file: which file, and where it was found."""
    from .presets import config_sources, locate

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
_OPTIONS = re.compile(r"Available options in '[^']+':\n((?:\t.*\n?)+)")


def _explain_compose_error(exc: Exception, overrides: Sequence[str]) -> ConfigError:
    text = str(exc)
    cause = exc.__cause__ or exc.__context__
    detail = f"{text}\n{cause}" if cause is not None and str(cause) not in text else text
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
    close = difflib.get_close_matches(leaf, valid, n=1, cutoff=0.6)
    lines = [f"{key} is not a known setting."]
    if close:
        lines[0] += f" Did you mean {prefix}{close[0]}?"
    if valid:
        lines.append(f"Valid keys in {parent or 'the config'}: {', '.join(valid)}.")
    if close:
        lines.append(f"Fix: {prefix}{close[0]}=<value>.")
    elif not valid and parent:
        lines.append(f"{parent} is an open mapping: add the key with +{key}=<value>.")
    return ConfigError("\n".join(lines))


# --- validate ---------------------------------------------------------------------------------------


@dataclass
class Checked:
    """A composed config that passed every check, and what was derived from it on the way."""

    cfg: DictConfig
    policy: DDPPolicy
    launcher: LauncherConfig
    memory: MemoryPolicy
    framework: str


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


def validate(cfg: DictConfig, *, for_run: bool = True) -> Checked:
    """Check a composed config. ``for_run=False`` skips what only matters on this machine (explain)."""
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
    if launcher.nproc < 1:
        raise ConfigError(
            f"launcher.nproc={launcher.nproc}: the number of worker processes must be at least 1.\n"
            "Fix: launcher.nproc=2 (or the number of GPUs on this machine)."
        )
    if launcher.threads_per_rank < 0:
        raise ConfigError(
            f"launcher.threads_per_rank={launcher.threads_per_rank}: intra-op threads per rank must be 0 (one "
            "share of this machine's CPUs per rank) or a positive number.\nFix: launcher.threads_per_rank=0."
        )
    if launcher.grace_s < 0:
        raise ConfigError(f"launcher.grace_s={launcher.grace_s} must be >= 0.")
    name = cfg.framework.get("name") if isinstance(cfg.framework, DictConfig) else None
    if name not in registry.FRAMEWORKS:
        raise ConfigError(f"framework.name={name!r} is not one of: {', '.join(registry.FRAMEWORKS)}.")
    if for_run:
        check_backend(launcher)
        adapter = registry.get_adapter(name)
    else:
        adapter = registry.load_adapter(name)
    schema = adapter.schema
    if is_dataclass(schema):
        to_object(cfg.framework, schema, "framework")
    if for_run:
        adapter.validate(cfg.framework)
    check_memory(memory, name)
    return Checked(cfg, policy, launcher, memory, name)


def resolve_backend(backend: Backend, local_procs: int) -> Backend:
    """``auto`` is nccl when CUDA has a GPU for every process on this machine, else gloo."""
    if backend is not Backend.auto:
        return backend
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() >= local_procs:
        return Backend.nccl
    return Backend.gloo


def check_backend(launcher: LauncherConfig) -> None:
    if launcher.backend is not Backend.nccl:
        return
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    local_procs = int(os.environ.get("LOCAL_WORLD_SIZE", launcher.nproc)) if torchrun_env() else launcher.nproc
    if gpus < local_procs:
        raise ConfigError(
            f"launcher.backend=nccl needs one GPU per process: {local_procs} process(es) here, but this "
            f"machine has {gpus} usable GPU(s).\nFix: launcher.backend=gloo (CPU) or launcher.nproc={gpus or 1}."
        )
