"""Who started this process, and the distributed world it belongs to: one object, read from the environment.

A process running this package was started in one of four ways, and everything that needs ranks, a store
shared by the ranks or the run's start time asks ``World.detect()`` rather than reading variables itself:

* ``shell``: ``train.py`` from a shell (or a job of one task). Our launcher will spawn the ranks; the
  spawned ranks get their world as plain values (``worker.WorkerSpec``), not from here.
* ``torchrun``: a worker of torchrun's agent (``TORCHELASTIC_RUN_ID``): the agent's store outlives the
  workers and their restarts (``TORCHELASTIC_RESTART_COUNT``), and every node reaches it.
* ``submitit``: a task of a Slurm job started by Hydra's submitit launcher with several tasks
  (``adopt_submitit`` turns submitit's view of the job into torch.distributed's variables).
* ``other``: another launcher that sets torch.distributed's variables (mpirun, a Slurm script, the old
  ``torch.distributed.launch``); no store before the process group exists.

The last three run as one rank, in place (``World.in_place``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Mapping

from omegaconf import OmegaConf

from .errors import ConfigError

VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
START_RESOLVER = "adapters_start"
START_VAR = "ADAPTERS_RUN_START"  # set by the launching process for the jobs it starts (submitit's)


@dataclass(frozen=True)
class World:
    """This process's place in the run, as the environment says."""

    starter: str  # shell | torchrun | submitit | other
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    restart: int  # torchrun's restart count (0: the first attempt)
    run_id: str  # torchrun's run id ("" elsewhere)
    has_agent_store: bool

    @classmethod
    def detect(cls, environ: Mapping[str, str] | None = None) -> World:
        env = os.environ if environ is None else environ
        if "TORCHELASTIC_RUN_ID" in env:
            starter = "torchrun"
        elif "LOCAL_RANK" in env and "WORLD_SIZE" in env:
            starter = "submitit" if "SUBMITIT_EXECUTOR" in env else "other"
        else:
            starter = "shell"
        return cls(
            starter=starter, rank=int(env.get("RANK", "0")), local_rank=int(env.get("LOCAL_RANK", "0")),
            world_size=int(env.get("WORLD_SIZE", "1")), local_world_size=int(env.get("LOCAL_WORLD_SIZE", "1")),
            restart=int(env.get("TORCHELASTIC_RESTART_COUNT", "0")), run_id=env.get("TORCHELASTIC_RUN_ID", ""),
            has_agent_store=env.get("TORCHELASTIC_USE_AGENT_STORE") == "True",
        )  # fmt: skip

    @property
    def in_place(self) -> bool:
        """This process is one rank already (started by torchrun, submitit or another launcher)."""
        return self.starter != "shell"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def store(self, prefix: str, timeout_s: float) -> Any:
        """A client of torchrun's agent store under ``prefix``, or None where there is no such store."""
        if not self.has_agent_store:
            return None
        from datetime import timedelta

        from torch.distributed import PrefixStore, TCPStore

        store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=timedelta(seconds=timeout_s))  # fmt: skip
        return PrefixStore(prefix, store)

    def attempt_store(self, name: str, timeout_s: float) -> Any:
        """A store whose keys belong to this attempt only: torchrun hands restarted workers the same agent store,
        where the previous attempt's keys (gloo's addresses, failures) are still written."""
        return self.store(f"adapters/{name}/attempt_{self.restart}", timeout_s)

    def shared(self, key: str, make: Any, timeout_s: float) -> str | None:
        """One value for the whole run: rank 0 makes it (``make()``) and publishes it in the agent store, the other
        ranks, and restarted workers, read it there. None without a store."""
        store = self.store(f"adapters/{key}/{self.run_id}", timeout_s)
        if store is None:
            return None
        if self.is_main and not store.check(["value"]):
            store.compare_set("value", "", str(make()))
        return store.get("value").decode()


def check_launch_env(world: World | None = None) -> None:
    """Refuse torch.distributed variables that no launcher set for this process (left over in the shell).

    torchrun sets TORCHELASTIC_RUN_ID with them; another launcher (mpirun, a SLURM script) sets at least RANK,
    WORLD_SIZE, MASTER_ADDR and MASTER_PORT. LOCAL_RANK and WORLD_SIZE alone would make this process wait, as
    rank 0 of a world that never comes, for other ranks.
    """
    world = world or World.detect()
    if world.starter != "other" or "SUBMITIT_EXECUTOR" in os.environ:
        return
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if not missing:
        return
    present = " ".join(f"{k}={os.environ[k]}" for k in VARS if k in os.environ)
    raise ConfigError(
        f"This shell sets {present}, but no launcher started this process: torchrun would also set "
        f"TORCHELASTIC_RUN_ID, and {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing. Left over "
        f"from an earlier run, they would make train.py wait as one rank of a world that never comes.\n"
        f"Fix: unset {' '.join(k for k in VARS if k in os.environ)}  (then train.py starts its own "
        "ranks), or start it with torchrun."
    )


def adopt_submitit() -> None:
    """In a job started by Hydra's submitit launcher with several tasks, each task is one rank.

    srun starts tasks_per_node tasks on each node; this sets the torch.distributed environment from
    submitit's view of the job (rank 0's host as the rendezvous, a port derived from the job id), so the
    task then runs in place like a torchrun worker. A job of one task spawns launcher.nproc workers itself.
    """
    if "SUBMITIT_EXECUTOR" not in os.environ or "WORLD_SIZE" in os.environ:
        return
    import submitit

    env = submitit.JobEnvironment()
    if env.num_tasks < 2:
        return
    digits = "".join(ch for ch in str(env.job_id) if ch.isdigit()) or "0"
    os.environ.update(
        RANK=str(env.global_rank), LOCAL_RANK=str(env.local_rank), WORLD_SIZE=str(env.num_tasks),
        LOCAL_WORLD_SIZE=str(env.num_tasks // max(env.num_nodes, 1)), MASTER_ADDR=env.hostnames[0],
        MASTER_PORT=str(20000 + int(digits) % 20000),
    )  # fmt: skip


# --- the run's start time: one folder per run ---------------------------------------------------------

_start: float | None = None


def run_start() -> float:
    """When this run started, the same on every rank.

    Under torchrun every rank composes the config itself, a second apart, so ``${now:...}`` would give
    each rank its own folder. Rank 0 publishes its time in torchrun's own store (first writer wins, so a
    restarted worker finds the same folder) and the other ranks read it.
    """
    global _start
    if _start is None:
        if START_VAR in os.environ:
            _start = float(os.environ[START_VAR])
        else:
            world = World.detect()
            shared = world.shared("start", lambda: repr(time.time()), timeout_s=120) if world.in_place else None
            _start = float(shared) if shared is not None else time.time()
    return _start


def _format_start(pattern: str) -> str:
    return time.strftime(pattern, time.localtime(run_start()))


# At import: processes that unpickle a Hydra job (submitit's) resolve hydra.sweep.dir before anything else.
OmegaConf.register_new_resolver(START_RESOLVER, _format_start, replace=True)
