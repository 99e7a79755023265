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

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
