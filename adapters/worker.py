"""One rank: set the environment, create the process group, run the adapter, explain a failure, tear down.

The same code runs in a process spawned by the local launcher and in a process started by torchrun.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import threads
from .config import RunSettings
from .diagnose import Diagnosis, diagnose

LOG_FORMAT = "[%(asctime)s][rank %(rank)s][%(name)s][%(levelname)s] - %(message)s"


@dataclass
class WorkerSpec:
    """Everything a rank needs, as plain values (a spawned process has no Hydra state)."""

    rank: int
    local_rank: int
    world_size: int
    settings: RunSettings  # the checked config, typed
    run_dir: str
    backend: str
    env: dict[str, str] = field(default_factory=dict)  # set before torch.distributed reads it
    probe_only: bool = False  # `python -m adapters doctor`
    threads: int = 0  # intra-op threads for this rank (0: leave torch's own), and where the number comes from
    threads_why: str = ""


@dataclass
class Outcome:
    rank: int
    ok: bool
    summary: dict[str, Any] = field(default_factory=dict)
    diagnosis: Diagnosis | None = None


class _RankFilter(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


def setup_logging(rank: int, run_dir: Path) -> logging.Logger:
    """Rank 0 shows progress on the console; every rank logs everything to <run folder>/rank<N>.log."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    formatter = logging.Formatter(LOG_FORMAT)
    console = logging.StreamHandler(sys.stdout)
    console.setLevel(logging.INFO if rank == 0 else logging.ERROR)
    run_dir.mkdir(parents=True, exist_ok=True)
    logfile = logging.FileHandler(run_dir / f"rank{rank}.log")
    for handler in (console, logfile):
        handler.setFormatter(formatter)
        handler.addFilter(_RankFilter(rank))
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    return logging.getLogger("adapters")


def run_worker(spec: WorkerSpec, exits: bool = False) -> Outcome:
    """Run one rank to the end. Never raises: a failure comes back as an Outcome with a Diagnosis.

    ``exits``: the caller ends the process with ``os._exit`` right after (see ``_teardown``).
    """
    os.environ.update(spec.env)
    log = setup_logging(spec.rank, Path(spec.run_dir))
    ctx = None
    try:
        import torch

        if spec.threads:
            threads.apply(spec.threads)
            if spec.rank == 0:
                log.info("intra-op threads per rank: %d (%s)", spec.threads, spec.threads_why)
        import torch.distributed as dist

        from .base import WorkerContext
        from .policy import Backend
        from .registry import load_adapter
        from .unused import ProbeDone

        run = spec.settings
        adapter = load_adapter(run.framework)
        policy = run.policy
        backend = Backend[spec.backend]
        native = adapter.translate(policy, backend=backend)
        os.environ.update(native.env)
        # TORCH_DISTRIBUTED_DEBUG is read when torch.distributed is first imported; setting os.environ
        # later (as common advice has it) changes nothing unless the level is read again, before the group exists.
        dist.set_debug_level_from_env()
        device = "cpu"
        if backend is Backend.nccl:
            torch.cuda.set_device(spec.local_rank)
            device = f"cuda:{spec.local_rank}"
        kwargs = {}
        if policy.timeout_s:
            from datetime import timedelta

            kwargs["timeout"] = timedelta(seconds=policy.timeout_s)
        if not adapter.framework_inits_process_group(backend):
            dist.init_process_group(backend.name, rank=spec.rank, world_size=spec.world_size,
                                    **kwargs, **_attempt_store())  # fmt: skip
        log.info(
            "rank %d/%d on %s, backend %s, TORCH_DISTRIBUTED_DEBUG=%s (torch.distributed reads: %s)",
            spec.rank, spec.world_size, device, backend.name, os.environ.get("TORCH_DISTRIBUTED_DEBUG", "unset"),
            dist.get_debug_level().name,
        )  # fmt: skip
        applied = adapter.memory_settings(run.memory, run.framework_cfg, backend=backend, world_size=spec.world_size)
        ctx = WorkerContext(
            rank=spec.rank, local_rank=spec.local_rank, world_size=spec.world_size, backend=backend,
            device=device, run_dir=Path(spec.run_dir), framework=run.framework_cfg, policy=policy, native=native,
            log=log, memory=run.memory, memory_applied=applied, resume=run.resume, probe_only=spec.probe_only,
        )  # fmt: skip
        if spec.rank == 0:
            for note in native.notes:
                log.info(note)
            log.info("ddp.unused_params=%s -> %s", policy.unused_params.name, native.snippet)
            log.info("memory -> %s", applied.line() or "the framework's own")
        try:
            summary = adapter.run(ctx)
            save_replica_for_test(ctx)
            ctx.engine.after_run()
            if ctx.engine.observation is not None:
                summary = {**(summary or {}), "observed_s": round(ctx.engine.observation.seconds, 2)}
        except ProbeDone as done:
            summary = {"probe": done.result}
        outcome = Outcome(spec.rank, True, summary=summary or {})
    except BaseException as exc:  # a rank must report, whatever went wrong
        tb = _short_traceback(exc)
        # The traceback goes to this rank's log file only; the launcher prints one explanation for all ranks.
        with open(Path(spec.run_dir) / f"rank{spec.rank}.log", "a") as f:
            f.write(tb)
        context: dict[str, Any] = {}
        if ctx is not None:
            try:
                context = ctx.engine.failure_context()
            except Exception:  # the context only sharpens the advice; never lose the failure itself
                log.debug("no failure context", exc_info=True)
        diagnosis = diagnose(exc, spec.rank, ctx and ctx.ddp_model, tb, order=context.get("order"))
        for key, value in context.items():
            if key != "order" and hasattr(diagnosis, key):
                setattr(diagnosis, key, value)
        if getattr(exc, "step", None):  # the engine's own errors know the step they stopped at
            diagnosis.step = exc.step
        outcome = Outcome(spec.rank, False, diagnosis=diagnosis)
    _teardown(ctx, outcome.ok, exits)
    return outcome


def save_replica_for_test(ctx: Any) -> None:
    """Test hook: ADAPTERS_TEST_SAVE_REPLICAS=1 (armed by ADAPTERS_TEST_HOOKS=1) makes every rank write a
    SHA-256 of each of its model's parameters to <run folder>/replica_rank<N>.json, so that the tests compare
    the replicas themselves, independently of the replica check."""
    from .testhooks import armed

    if ctx.ddp_model is None or not armed("ADAPTERS_TEST_SAVE_REPLICAS"):
        return
    import hashlib
    import json

    import torch

    module = getattr(ctx.ddp_model, "module", ctx.ddp_model)
    digests = {}
    for name, param in module.named_parameters():
        raw = param.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        digests[name] = hashlib.sha256(raw).hexdigest()
    (ctx.run_dir / f"replica_rank{ctx.rank}.json").write_text(json.dumps(digests, indent=0))


def _attempt_store() -> dict[str, Any]:
    """Under torchrun, a store whose keys are this attempt's own: torchrun (torch 2.13, c10d rendezvous) hands
    restarted workers the same agent store, where the previous attempt's gloo addresses are still written, and
    a new group would connect to the dead workers' ports ("connectFullMesh ... Connection refused")."""
    from .world import World

    store = World.detect().attempt_store("group", timeout_s=300)
    return {} if store is None else {"store": store}


def _short_traceback(exc: BaseException) -> str:
    """The traceback without torch's own frames (nn.Module call plumbing), keeping the frame that raised."""
    import torch

    torch_dir = os.path.dirname(torch.__file__) + os.sep
    frames = traceback.extract_tb(exc.__traceback__)
    kept = [f for i, f in enumerate(frames) if not f.filename.startswith(torch_dir) or i == len(frames) - 1]
    lines = ["Traceback (most recent call last, torch's frames left out):\n", *traceback.format_list(kept)]
    return "".join(lines + traceback.format_exception_only(type(exc), exc))


def _teardown(ctx: Any, ok: bool, exits: bool = False) -> None:
    """Drop DDP before the process group, and wait for the others only when this rank finished well.

    A failed rank does not wait at a barrier its peers may never reach. ``exits``: the process ends with
    ``os._exit`` right after (the local launcher's workers, torchrun's), so the group is left to the exit.
    Destroying a gloo group joins its threads while this thread holds the GIL; a gloo thread that is still
    freeing a finished collective (the barrier's, whose tensors are Python objects) waits for the GIL, and
    the rank hangs after a finished run (seen once in a hundred runs). Where the process lives on (a
    submitit task, a benchmark calling ``run_worker``), the barrier's work is held until the group is gone,
    and the gloo threads get a moment to let go of theirs first.
    """
    if ctx is not None:
        ctx.engine.release()
    gc.collect()
    try:
        import time

        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            work = None
            if ok:
                work = dist.barrier(async_op=True)
                work.wait()
            if not exits:
                time.sleep(0.05)  # releases the GIL: gloo's threads drop what they still hold
                dist.destroy_process_group()
            del work  # freed here, on this thread, if nothing else holds it
    except Exception:  # tearing down after a failure must not hide the failure
        logging.getLogger("adapters").debug("teardown failed", exc_info=True)
    for handler in logging.getLogger().handlers:
        handler.flush()
