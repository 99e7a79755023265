"""Fault injection for the test suite, armed only by one explicit opt-in.

Each hook reads its own ``ADAPTERS_TEST_*`` variable, but only when ``ADAPTERS_TEST_HOOKS=1`` is set too, so
a variable left in a shell or a job template never changes a real run. An armed hook logs a warning (once
per process), and a hook variable set without the opt-in is logged as ignored.
"""

from __future__ import annotations

import logging
import os

OPT_IN = "ADAPTERS_TEST_HOOKS"
_said: set[str] = set()


def armed(name: str) -> str | None:
    """The value of the hook variable ``name`` when test hooks are armed, else None."""
    value = os.environ.get(name)
    if not value:
        return None
    on = os.environ.get(OPT_IN) == "1"
    if name not in _said:
        _said.add(name)
        log = logging.getLogger("adapters.testhooks")
        if on:
            log.warning("test hook armed: %s=%s (%s=1): this run is a test, not a real one", name, value, OPT_IN)
        else:
            log.warning("%s=%s is set but ignored: test hooks are armed only with %s=1", name, value, OPT_IN)
    return value if on else None


def freeze_for_test(step: int, rank: int) -> None:
    """ADAPTERS_TEST_FREEZE_AT_STEP=N: rank ADAPTERS_TEST_FREEZE_RANK (default 1) stops itself with SIGSTOP after
    step N, as a process suspended by a debugger or stuck in native code would look from outside."""
    at = armed("ADAPTERS_TEST_FREEZE_AT_STEP")
    if at and step == int(at) and rank == int(os.environ.get("ADAPTERS_TEST_FREEZE_RANK", "1")):
        import signal

        os.kill(os.getpid(), signal.SIGSTOP)


def die_in_checkpoint_write(step: int) -> None:
    """ADAPTERS_TEST_DIE_IN_CHECKPOINT=N: the checkpoint writer is killed (SIGKILL) at step N after the new
    checkpoint is half written, before it replaces the last one."""
    at = armed("ADAPTERS_TEST_DIE_IN_CHECKPOINT")
    if at and step == int(at):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def die_for_test(step: int, rank: int) -> None:
    """Test hook: ADAPTERS_TEST_DIE_AT_STEP=N kills this rank (ADAPTERS_TEST_DIE_RANK, default 1) with SIGKILL
    after step N, in the first attempt only (torchrun's TORCHELASTIC_RESTART_COUNT=0), as a lost machine would."""
    at = armed("ADAPTERS_TEST_DIE_AT_STEP")
    if not at or step != int(at) or rank != int(os.environ.get("ADAPTERS_TEST_DIE_RANK", "1")):
        return
    from .world import World

    if World.detect().restart == 0:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
