"""Checkpoints that a crash never leaves half-written, with every rank's random state.

Written by rank 0 to a temporary file in the same folder and renamed over the last one (a rename within one
filesystem is atomic), so ``last.pt`` is always either the previous complete checkpoint or the new one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def save_atomic(state: dict[str, Any], path: Path) -> None:
    import torch

    from .testhooks import die_in_checkpoint_write

    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a writer killed mid-write
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
        die_in_checkpoint_write(int(state.get("step", -1)))
    os.replace(tmp, path)
    try:  # the rename itself survives a power cut only once the folder is written too
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def load(path: Path) -> dict[str, Any] | None:
    import torch

    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


def all_rng_states() -> list[Any]:
    """Every rank's torch RNG state (CPU, and CUDA where there is one), gathered on every rank."""
    import torch
    import torch.distributed as dist

    mine = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, mine)
    return states


def restore_rng(state: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["cpu"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def agree(resumed: dict[str, Any] | None, path: Path, rank: int) -> None:
    """Every rank must resume from the same step, or none: a rank that starts afresh beside others that resume
    would train a different model in silence (a run folder not on a disk that every node shares)."""
    import torch.distributed as dist

    mine = -1 if resumed is None else int(resumed["step"])
    steps: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(steps, mine)
    if len(set(steps)) > 1:
        found = ", ".join(f"rank {r}: {'none' if s < 0 else f'step {s}'}" for r, s in enumerate(steps))
        raise RuntimeError(
            f"The ranks disagree on the checkpoint to resume from ({path}; {found}). Each rank reads it from its "
            "own disk: across machines the run folder must be on a filesystem they all share."
        )
