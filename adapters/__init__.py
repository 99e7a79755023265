"""One DDP unused-parameters policy, applied to PyTorch, MMDetection, fastNLP and nnU-Net.

Importing this package imports no training framework; adapters are loaded when chosen.
"""

from .base import Adapter, WorkerContext
from .errors import AdapterError, ConfigError, MissingDependency, RunFailed
from .native import NativeSettings
from .policy import Backend, DDPPolicy, DebugLevel, UnusedParams

__all__ = [
    "Adapter", "AdapterError", "Backend", "ConfigError", "DDPPolicy", "DebugLevel", "MissingDependency",
    "NativeSettings", "RunFailed", "UnusedParams", "WorkerContext",
]  # fmt: skip
