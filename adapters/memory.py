"""``memory.on_oom`` in a training loop of our own (framework=torch), and the test hook that injects OOM.

With ``halve``, every rank says after each forward whether it ran out of memory (one small all-gather);
when any did, all of them drop the step, halve the per-process batch size, rebuild the DDP wrapper (a step
that failed half-way leaves DDP's reducer mid-iteration) and go on from the same samples. One rank deciding
alone would desynchronise the collectives and hang the job.

Only an out-of-memory error in the forward pass is recovered: one raised during the backward pass, while
DDP's gradient reductions are in flight on the other ranks, cannot be abandoned without a hang, so it stops
the run like ``fail`` does, with the settings to lower.
"""

from __future__ import annotations

import gc
import os
from typing import Any, Callable

from .base import WorkerContext
from .policy import OnOOM
from .testhooks import armed


class OutOfMemoryAtEverySize(RuntimeError):
    """Halving reached memory.min_batch_size and the step still ran out of memory."""


class OOMGuard:
    def __init__(self, ctx: WorkerContext, batch_size: int):
        self.ctx = ctx
        self.batch_size = batch_size
        self.tried: list[int] = []
        self.halving = ctx.memory.on_oom is OnOOM.halve

    def forward(self, fn: Callable[[], Any]) -> Any:
        """``fn()``; with halve, None when any rank ran out of memory in it (every rank gets None then)."""
        if not self.halving:
            return fn()
        import torch
        import torch.distributed as dist

        try:
            out, failed = fn(), 0
        except torch.OutOfMemoryError:
            out, failed = None, 1
        flag = torch.tensor([failed], device=self.ctx.device)
        flags = [torch.zeros_like(flag) for _ in range(self.ctx.world_size)]
        dist.all_gather(flags, flag)
        self.failed_ranks = [rank for rank, f in enumerate(flags) if f.item()]
        return None if self.failed_ranks else out

    def halve(self, rewrap: Callable[[], Any]) -> Any:
        """Every rank: the next, smaller batch size and a fresh DDP wrapper. Raises below the minimum."""
        import torch

        self.tried.append(self.batch_size)
        smaller = self.batch_size // 2
        minimum = self.ctx.memory.min_batch_size
        ranks = ", ".join(map(str, self.failed_ranks))
        if smaller < minimum:
            sizes = ", ".join(map(str, self.tried))
            raise OutOfMemoryAtEverySize(
                f"out of memory at every batch size tried (per process: {sizes}; memory.min_batch_size={minimum}), "
                f"last on rank(s) {ranks}."
            )
        if self.ctx.is_main:
            self.ctx.log.warning(
                "out of memory on rank(s) %s at batch size %d per process: every rank dropped the step and goes "
                "on from the same samples at batch size %d (memory.on_oom=halve)", ranks, self.batch_size, smaller,
            )  # fmt: skip
        self.batch_size = smaller
        self.ctx.ddp_model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return rewrap()


def inject_test_oom(module: Any, guard: OOMGuard) -> None:
    """Test hook: ADAPTERS_TEST_OOM_ABOVE=N raises torch.OutOfMemoryError in the forward of every step whose
    per-process batch size is above N (on the ranks in ADAPTERS_TEST_OOM_RANKS, default all)."""
    limit = armed("ADAPTERS_TEST_OOM_ABOVE")
    if not limit:
        return
    import torch

    ranks = os.environ.get("ADAPTERS_TEST_OOM_RANKS")
    if ranks is not None and str(guard.ctx.rank) not in ranks.split(","):
        return

    def hook(*_: Any) -> None:
        if guard.batch_size > int(limit):
            raise torch.OutOfMemoryError(
                f"CUDA out of memory (injected for a test: batch size {guard.batch_size} > "
                f"ADAPTERS_TEST_OOM_ABOVE={limit})"
            )

    module.register_forward_pre_hook(hook)
