"""The project's exceptions.

Every error a user can cause names the setting, the valid choices and the fix. The classes also subclass
the builtin a caller would expect (``ValueError`` for bad settings, ``ImportError`` for a missing
framework), so code that does not know this package still catches them sensibly.
"""

from __future__ import annotations

from typing import Iterable


class AdapterError(Exception):
    """Base class: a problem the user can fix; the message says how. No traceback is shown for these."""

    exit_code = 2


class ConfigError(AdapterError, ValueError):
    """A setting is missing, misspelt or has a value outside its choices."""


class MissingDependency(AdapterError, ImportError):
    """The chosen framework is not installed in this environment."""


class RunFailed(AdapterError, RuntimeError):
    """A training run stopped on at least one rank; the message holds each rank's explanation."""

    exit_code = 1


def close_matches(word: str, choices: Iterable[str], n: int = 1) -> list[str]:
    """The choices closest to a misspelt ``word`` (at most ``n``), for the "Did you mean" part of a message."""
    import difflib

    return difflib.get_close_matches(word, list(choices), n=n, cutoff=0.6)
