"""Process lifetime: workers never outlive their launcher, signals end a run in one line, frozen ranks are seen.

* ``die_with_parent`` (in every worker): on Linux the kernel kills the worker when the process that started
  it dies, whatever killed it (``PR_SET_PDEATHSIG``); a thread also checks the parent every second, which
  covers other systems and a parent that was already gone when the worker started.
* ``Interrupted`` is raised in the launcher by SIGTERM and SIGHUP (what a scheduler, systemd or a closed
  terminal sends), as ``KeyboardInterrupt`` is by Ctrl-C; the launcher stops its workers and says so in one
  line, exiting with 128 + the signal's number.
* ``Heartbeat``: each worker's thread writes the time into shared memory every second; the local launcher
  names a rank whose beat stops (SIGSTOP, a debugger, native code holding Python's GIL) within
  ``launcher.heartbeat_s``, instead of leaving the others to wait in a collective.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any

PR_SET_PDEATHSIG = 1


class Interrupted(BaseException):
    """The launcher got a signal that ends the run (SIGTERM, SIGHUP). A BaseException, like KeyboardInterrupt,
    so that no ``except Exception`` on the way swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum: int, _frame: Any) -> None:
    raise Interrupted(signum)


def install_stop_signals() -> None:
    """In the launcher (main thread): SIGTERM and SIGHUP raise Interrupted where the launcher is."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupted)


def exit_code(exc: BaseException) -> int:
    """128 + the signal's number, as a shell reports a process ended by it (Ctrl-C: 130)."""
    signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
    return 128 + int(signum)


def describe(exc: BaseException) -> str:
    return "Ctrl-C" if isinstance(exc, KeyboardInterrupt) else f"{exc.args[0]}"


class terminal_signals_ignored:
    """Start child processes with Ctrl-C and SIGHUP ignored: they are the launcher's to handle, once, for all
    ranks. A disposition of SIG_IGN survives exec, and Python leaves an ignored SIGINT ignored."""

    def __enter__(self) -> None:
        self.saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGHUP)}

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)


def die_with_parent(parent: int | None = None, *, kernel: bool = True) -> None:
    """End this process when ``parent`` (default: the current parent) is gone.

    ``kernel``: also ask Linux to SIGKILL this process when its parent dies. Only where the parent started
    this process from its main thread (the local launcher): the signal follows the thread that forked.
    """
    parent = os.getppid() if parent is None else parent
    if kernel:
        try:
            kill_me_with_parent()
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # gone before the request took effect
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                try:  # stderr may be a pipe to the process that is gone
                    sys.stderr.write(f"the process that started this rank ({parent}) is gone: stopping\n")
                    sys.stderr.flush()
                finally:
                    os.kill(os.getpid(), signal.SIGKILL)  # no cleanup that could wait on peers

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def kill_me_with_parent() -> None:
    """``preexec_fn`` for a child process: Linux kills it when the process that starts it dies."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


def start_heartbeat(beats: Any, index: int, every_s: float = 1.0) -> None:
    """Write ``time.monotonic()`` (one clock for the whole machine on Linux) into ``beats[index]``."""

    def beat() -> None:
        while True:
            beats[index] = time.monotonic()
            time.sleep(every_s)

    beats[index] = time.monotonic()
    threading.Thread(target=beat, name="heartbeat", daemon=True).start()
