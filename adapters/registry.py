"""Which frameworks exist, where their adapter lives and what they need installed.

A sorted, read-only table ``name -> Entry``; adapter modules are imported on first use, so choosing
``framework=torch`` never imports mmengine, mmdet, fastNLP or nnU-Net. Adding a framework is one line
here, one module in ``adapters/frameworks/``, one ``conf/framework/<name>.yaml``, one test file, one
docs page and one pyproject extra, all spelt ``<name>``.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

from .errors import ConfigError, MissingDependency

if TYPE_CHECKING:
    from .base import Adapter


@dataclass(frozen=True)
class Entry:
    module: str  # dotted path of the module that defines ``ADAPTER``
    title: str  # the framework's own name, for messages
    requires: tuple[str, ...]  # importable top-level modules the adapter needs
    extra: str | None  # the pyproject extra that installs them


FRAMEWORKS = MappingProxyType(
    dict(
        sorted(
            {
                "torch": Entry("adapters.frameworks.torch", "PyTorch DDP", ("torch",), None),
                "mmdet": Entry("adapters.frameworks.mmdet", "MMDetection", ("mmdet", "mmengine", "mmcv"), "mmdet"),
                "fastnlp": Entry("adapters.frameworks.fastnlp", "fastNLP", ("fastNLP",), "fastnlp"),
                "nnunet": Entry("adapters.frameworks.nnunet", "nnU-Net v2", ("nnunetv2",), "nnunet"),
                "accelerate": Entry(
                    "adapters.frameworks.accelerate", "Hugging Face Accelerate", ("accelerate",), "accelerate"
                ),
                "transformers": Entry(
                    "adapters.frameworks.transformers",
                    "the Hugging Face Transformers Trainer",
                    ("transformers", "accelerate"),
                    "transformers",
                ),
                "lightning": Entry("adapters.frameworks.lightning", "PyTorch Lightning", ("lightning",), "lightning"),
            }.items()
        )
    )
)


def entry(name: str) -> Entry:
    try:
        return FRAMEWORKS[name]
    except KeyError:
        raise ConfigError(
            f"framework={name} is not a known framework. Choose one of: {', '.join(FRAMEWORKS)}."
        ) from None


def install_hint(name: str) -> str:
    e = entry(name)
    if e.extra is None:
        return "pip install -e ."
    return f"pip install -e '.[{e.extra}]'  (or: nox -s {e.extra})"


def missing_modules(name: str) -> list[str]:
    return [m for m in entry(name).requires if importlib.util.find_spec(m) is None]


def get_adapter(name: str) -> Adapter:
    """The adapter for ``name``, after checking that its framework is installed."""
    e = entry(name)
    missing = missing_modules(name)
    if missing:
        raise MissingDependency(
            f"framework={name} needs {e.title}, but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not installed in this environment "
            f"({__import__('sys').executable}).\nFix: {install_hint(name)}"
        )
    return load_adapter(name)


def load_adapter(name: str) -> Adapter:
    """The adapter object without checking the framework is installed (its translation needs none)."""
    return importlib.import_module(entry(name).module).ADAPTER
