"""Intra-op threads per rank: the ranks on one machine share its cores, so each gets its share.

torch starts every process with as many intra-op threads as the machine has cores. Two ranks on two cores
then run four busy threads, which fight for the cores and wait on each other at every collective: on this
project's 2-core machine the demo ran 6 to 9 times slower that way than with one thread per rank. torchrun sets
``OMP_NUM_THREADS=1`` for the same reason; the local launcher does the same from ``launcher.threads_per_rank``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

ENV_KEYS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask: a container's or a scheduler's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def plan(setting: int, local_ranks: int, env: Mapping[str, str]) -> tuple[int, str]:
    """Threads per rank and where the number comes from.

    ``setting`` (``launcher.threads_per_rank``) wins when above 0; else a positive ``OMP_NUM_THREADS`` in
    the environment (set by the user, or by torchrun); else this machine's CPUs divided by its ranks.
    """
    if setting > 0:
        return setting, f"launcher.threads_per_rank={setting}"
    # OpenMP also takes a list ("4,2": 4 at the outer level); the first number is the one that counts here.
    given = env.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if given.isascii() and given.isdigit() and int(given) > 0:
        return int(given), f"OMP_NUM_THREADS={given} from the environment; launcher.threads_per_rank overrides"
    cpus = available_cpus()
    n = max(1, cpus // max(1, local_ranks))
    return n, f"{cpus} CPU(s) on this machine / {local_ranks} rank(s) here; launcher.threads_per_rank overrides"


def env_for(threads: int) -> dict[str, str]:
    """What a process started for a rank needs in its environment (read by OpenMP and MKL at start-up)."""
    return {key: str(threads) for key in ENV_KEYS}


def apply(threads: int) -> None:
    """Set this rank's intra-op threads (and the environment its own subprocesses inherit)."""
    import torch

    os.environ.update(env_for(threads))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
