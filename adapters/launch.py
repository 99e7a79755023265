"""Start the ranks and bring back one answer: the local launcher, and the torchrun path.

Local: this process (the Hydra job) spawns ``launcher.nproc`` workers and watches them. When one fails,
the others get ``launcher.grace_s`` seconds to report their own error, then they are stopped, so a crashed
rank never leaves the rest waiting in a collective. Each worker sends its outcome over a pipe before it
exits; a worker that finished and reported success counts as a success even if gloo's threads abort the
interpreter afterwards (a known exit-time race on CPU).

torchrun: this process is one rank; it runs the worker in place and torchrun's agent watches the ranks.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from . import lifetime, threads
from .config import Checked, RunSettings, resolve_backend
from .diagnose import Diagnosis, format_failure
from .errors import RunFailed
from .worker import Outcome, WorkerSpec, run_worker
from .world import World

log = logging.getLogger("adapters.launch")


def launch(checked: Checked, run_dir: Path, *, probe_only: bool = False) -> dict[str, Any]:
    """Train with the checked config; returns rank 0's summary or raises RunFailed.

    ``probe_only``: every rank stops after the probe (``python -m adapters doctor``); the summary holds it.
    """
    settings = checked.settings()
    world = World.detect()
    if world.in_place:
        return _run_in_place(checked, settings, run_dir, probe_only, world)
    return _run_local(checked, settings, run_dir, probe_only)


def free_port(addr: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def _spawned(spec: WorkerSpec, conn: Connection, beats: Any) -> None:
    lifetime.die_with_parent(kernel=True)  # started from the launcher's main thread
    lifetime.start_heartbeat(beats, spec.rank)
    outcome = run_worker(spec, exits=True)
    try:
        conn.send(outcome)
        conn.close()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        # Skip interpreter shutdown: the outcome is sent, and gloo's threads can abort a normal exit.
        os._exit(0 if outcome.ok else 1)


def _run_local(checked: Checked, settings: RunSettings, run_dir: Path, probe_only: bool) -> dict[str, Any]:
    import multiprocessing as mp

    launcher = checked.launcher
    backend = resolve_backend(launcher.backend, launcher.nproc)
    nproc = launcher.nproc
    port = launcher.master_port or free_port(launcher.master_addr)
    log.info("starting %d worker process(es), backend %s, run folder %s", nproc, backend.name, run_dir)
    n_threads, threads_why = threads.plan(launcher.threads_per_rank, nproc, os.environ)
    context = mp.get_context("spawn")
    beats = context.Array("d", nproc, lock=False)  # each rank's last heartbeat (time.monotonic)
    procs: dict[int, Any] = {}
    conns: dict[int, Connection] = {}
    outcomes: dict[int, Outcome] = {}
    stopped: set[int] = set()
    silent: dict[int, float] = {}
    try:
        for rank in range(nproc):
            env = {"MASTER_ADDR": launcher.master_addr, "MASTER_PORT": str(port), "RANK": str(rank),
                   "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc),
                   **threads.env_for(n_threads)}  # fmt: skip
            spec = WorkerSpec(rank, rank, nproc, settings, str(run_dir), backend.name, env,
                              probe_only, n_threads, threads_why)  # fmt: skip
            receive, send = context.Pipe(duplex=False)
            proc = context.Process(target=_spawned, args=(spec, send, beats), name=f"rank{rank}")
            with lifetime.terminal_signals_ignored():
                proc.start()
            send.close()
            procs[rank], conns[rank] = proc, receive
        _watch(procs, conns, outcomes, stopped, launcher.grace_s, beats, launcher.heartbeat_s, silent)
    except BaseException:  # Ctrl-C, SIGTERM, or a bug here: never leave workers behind
        _stop([p for p in procs.values() if p.is_alive()])
        raise
    return _verdict(procs, outcomes, stopped, run_dir, silent, launcher)


def _watch(procs, conns, outcomes, stopped, grace_s: float, beats: Any, heartbeat_s: float, silent) -> None:
    """Collect outcomes until every rank has ended. After the first failure the others get ``grace_s`` to
    report; a rank whose heartbeat is older than ``heartbeat_s`` (0: not watched) is named and all are stopped."""
    failed_at: float | None = None
    open_conns = dict(conns)
    started = time.monotonic()
    while any(p.exitcode is None for p in procs.values()) or open_conns:
        waitables = [p.sentinel for p in procs.values() if p.exitcode is None] + list(open_conns.values())
        timeout = None if failed_at is None else max(0.0, failed_at + grace_s - time.monotonic())
        if heartbeat_s:
            timeout = 1.0 if timeout is None else min(timeout, 1.0)
        ready = wait(waitables, timeout)
        for rank, conn in list(open_conns.items()):
            if conn in ready:
                try:
                    outcomes[rank] = conn.recv()
                except EOFError:
                    pass
                del open_conns[rank]
        for proc in procs.values():
            if proc.sentinel in ready:
                proc.join()
        if heartbeat_s and not silent:
            now = time.monotonic()
            for rank, proc in procs.items():
                last = beats[rank] or started
                if proc.exitcode is None and rank in open_conns and now - last > heartbeat_s:
                    silent[rank] = now - last
            if silent:
                log.error(
                    "%s stopped answering (no heartbeat for %.0f s, launcher.heartbeat_s=%g): stopping every rank",
                    ", ".join(f"rank {r}" for r in sorted(silent)), max(silent.values()), heartbeat_s,
                )  # fmt: skip
                alive = {r: p for r, p in procs.items() if p.exitcode is None}
                stopped.update(r for r in alive if r not in silent)
                _stop(list(alive.values()))
                for rank in alive:
                    open_conns.pop(rank, None)
                continue
        failing = [r for r, o in outcomes.items() if not o.ok] + [
            r for r, p in procs.items() if p.exitcode not in (None, 0) and r not in outcomes and r not in open_conns
        ]
        if failing and failed_at is None:
            failed_at = time.monotonic()
            alive = [r for r, p in procs.items() if p.exitcode is None]
            if alive:
                log.info("rank %d failed; stopping the other ranks in %.0f s unless they finish", min(failing), grace_s)
        if failed_at is not None and time.monotonic() >= failed_at + grace_s:
            alive = {r: p for r, p in procs.items() if p.exitcode is None}
            stopped.update(alive)
            _stop(list(alive.values()))
            for rank in alive:
                open_conns.pop(rank, None)


def _stop(procs: list[Any], patience: float = 5.0) -> None:
    for proc in procs:
        proc.terminate()
        if proc.pid:
            try:
                os.kill(proc.pid, signal.SIGCONT)  # a stopped process acts on SIGTERM only once continued
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + patience
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.exitcode is None:
            proc.kill()
            proc.join()


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def _verdict(
    procs, outcomes: dict[int, Outcome], stopped: set[int], run_dir: Path, silent: dict[int, float], launcher: Any
) -> dict[str, Any]:
    diagnoses: list[Diagnosis] = []
    for rank, proc in sorted(procs.items()):
        outcome = outcomes.get(rank)
        if outcome is not None and outcome.ok:
            if proc.exitcode != 0:
                log.debug("rank %d finished, then exited with %s (ignored)", rank, _exit_text(proc.exitcode))
            continue
        if outcome is not None:
            diagnoses.append(outcome.diagnosis)
        elif rank in silent:
            diagnoses.append(Diagnosis(
                rank, "frozen", f"rank {rank} stopped answering",
                f"Rank {rank} stopped answering: no heartbeat for {silent[rank]:.0f} s (launcher.heartbeat_s="
                f"{launcher.heartbeat_s:g}). It was stopped by a signal (SIGSTOP, a debugger, a suspended job) or is "
                "stuck in native code that holds Python's GIL; every rank was stopped so that none waits for it.",
            ))  # fmt: skip
        elif rank not in stopped:
            diagnoses.append(Diagnosis(
                rank, "error",
                f"the process died with {_exit_text(proc.exitcode)} before reporting (killed by the OS, "
                "for example for memory, or a crash in native code)", "",
            ))  # fmt: skip
    if diagnoses:
        note = ""
        late = sorted(stopped - {d.rank for d in diagnoses})
        if late and not silent:
            which = ", ".join(map(str, late))
            note = (
                f"\n(rank{'s' if len(late) > 1 else ''} {which} had not reported {launcher.grace_s:g} s after the "
                f"first failure (launcher.grace_s) and {'were' if len(late) > 1 else 'was'} stopped, so none is left "
                f"waiting: {'their' if len(late) > 1 else 'its'} own error, if any, is in rank{late[0]}.log)"
            )
        elif late:
            note = f"\n(stopped rank{'s' if len(late) > 1 else ''} {', '.join(map(str, late))} with it)"
        raise RunFailed(f"{format_failure(diagnoses)}{note}\nLogs: {run_dir}/rank<N>.log")
    return outcomes[0].summary


def _run_in_place(checked: Checked, settings: RunSettings, run_dir: Path, probe_only: bool,
                  world: World) -> dict[str, Any]:  # fmt: skip
    backend = resolve_backend(checked.launcher.backend, world.local_world_size)
    if world.is_main:
        starter = "submitit" if world.starter == "submitit" else "torchrun"
        log.info("running under %s: %d rank(s), backend %s, run folder %s (launcher.nproc is not used)",
                 starter, world.world_size, backend.name, run_dir)  # fmt: skip
    n_threads, threads_why = threads.plan(checked.launcher.threads_per_rank, world.local_world_size, os.environ)
    spec = WorkerSpec(world.rank, world.local_rank, world.world_size, settings, str(run_dir),
                      backend.name, probe_only=probe_only, threads=n_threads, threads_why=threads_why)  # fmt: skip
    # A torchrun worker training ends with os._exit (cli.py); a submitit task, or doctor, lives on after this.
    outcome = run_worker(spec, exits=world.starter != "submitit" and not probe_only)
    if not outcome.ok:
        diagnoses = _share_failures(outcome.diagnosis, world)
        raise RunFailed(f"{format_failure(diagnoses)}\nLogs: {run_dir}/rank<N>.log")
    return outcome.summary


def _share_failures(mine: Diagnosis, world: World, wait_s: float = 3.0) -> list[Diagnosis]:
    """Under torchrun, ranks may be on other machines: each failed rank writes its diagnosis into torchrun's
    store, and reads the others', so that a rank that only lost its peers (or timed out waiting for them)
    names the rank that really failed and its error."""
    import json
    from dataclasses import asdict

    try:
        store = world.attempt_store("failures", timeout_s=wait_s)
        if store is None:
            return [mine]
        if mine.kind not in ("peer_lost", "timeout"):
            store.set(f"rank{mine.rank}", json.dumps(asdict(mine)))
            return [mine]
        found = [mine]
        deadline = time.monotonic() + wait_s
        for other in range(world.world_size):
            if other == mine.rank:
                continue
            while time.monotonic() < deadline:
                if store.check([f"rank{other}"]):
                    found.append(Diagnosis(**json.loads(store.get(f"rank{other}"))))
                    break
                time.sleep(0.1)
        return found
    except Exception:  # the store may be gone with the failed machine; say what this rank knows
        return [mine]
