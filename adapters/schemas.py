"""Where this project's config files and schemas live, for Hydra.

``register_configs`` puts the schemas in Hydra's ConfigStore, outside any selectable group's options:
``RunConfig`` as ``adapters_schema`` (the root of conf/config.yaml), and each framework's schema under
``schema/framework/<name>``, which its conf/framework/<name>.yaml extends. The dataclasses are the one source
of every default; the YAML files hold only what differs from them.
"""

from __future__ import annotations

from pathlib import Path

from . import registry
from .policy import RunConfig

CONFIG_NAME = "config"


def conf_dir() -> Path:
    """conf/ in a clone (next to the package), or adapters/conf in an installed wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / f"{CONFIG_NAME}.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"conf/{CONFIG_NAME}.yaml not found next to {here}")


_registered = False


def register_configs() -> None:
    """Store the schemas in Hydra's ConfigStore (idempotent)."""
    global _registered
    if _registered:
        return
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="adapters_schema", node=RunConfig)
    for name in registry.FRAMEWORKS:
        cs.store(group="schema/framework", name=name, node=registry.load_adapter(name).schema)
    _registered = True
