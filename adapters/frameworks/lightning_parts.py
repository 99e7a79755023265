"""The parts of framework=lightning that import Lightning: the strategy that carries the policy, the cluster
environment of a rank our launcher (or torchrun) started, and the built-in demo module and data.

Imported only in a rank (or by a user's own script through ``adapters.api.Policy.lightning_strategy``), never
by ``explain`` or the launcher.

``PolicyDDPStrategy`` is Lightning's own ``DDPStrategy`` (every DDP keyword it does not know goes to
``DistributedDataParallel`` unchanged) with three additions, each at a point Lightning itself defines:

* ``_setup_model``: the DDP wrapper Lightning builds is handed to the engine (the policy applied to it in place:
  ``ddp=auto`` decides from the first real steps of ``Trainer.fit``, with the Trainer attached and its counters
  real; its settings logged, its steps counted, what was left out guarded), with what Lightning knows: gradient
  accumulation and manual optimization.
* ``post_backward``: after the first backward, the rank's garbage collector freeze (``first_step_done``).
* ``on_exception``: Lightning replaces DDP's "Expected to have finished reduction" text with a hint of its own
  and drops the parameter indices; here DDP's own text stays, with the parameters' names and the fix added.
"""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.environments import ClusterEnvironment
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader

from ..demo import DeepSupervisionNet, SyntheticBlobs
from ..diagnose import REDUCTION_MARKER, reducer_parameter_names, unused_indices


class PolicyDDPStrategy(DDPStrategy):
    """Lightning's ``DDPStrategy`` with the DDP policy applied at Lightning's own points (see the module doc).

    ``hooks``: what applies the policy in this rank (``WorkerContext`` in ``train.py``, ``adapters.api.Policy``
    in a user's script): ``track_ddp``, ``training_facts``, ``first_step_done``. None: a plain
    DDPStrategy with the given keywords, plus the named parameters on failure.
    """

    strategy_name = "ddp_policy"

    def __init__(self, *, hooks: Any = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._hooks = hooks

    @property
    def ddp_kwargs(self) -> dict[str, Any]:
        """The keywords this strategy hands to ``DistributedDataParallel`` (Lightning's own record of them)."""
        return dict(self._ddp_kwargs)

    def _setup_model(self, model: torch.nn.Module) -> Any:
        ddp = super()._setup_model(model)
        hooks = self._hooks
        if hooks is not None:
            trainer = getattr(self.lightning_module, "_trainer", None)
            accumulate = getattr(trainer, "accumulate_grad_batches", 1) if trainer is not None else 1
            facts = getattr(hooks, "training_facts", None)
            if facts is not None:
                facts(accumulation=accumulate > 1, manual_optimization=not self.lightning_module.automatic_optimization)
            hooks.track_ddp(ddp)
        return ddp

    def post_backward(self, closure_loss: torch.Tensor) -> None:
        super().post_backward(closure_loss)
        if self._hooks is not None:
            self._hooks.first_step_done()

    def on_exception(self, exception: BaseException) -> None:
        """Keep DDP's own message (its parameter indices), name the parameters and say the fix; Lightning's own
        handler would replace the whole text with a hint that names none."""
        text = exception.args[0] if exception.args and isinstance(exception.args[0], str) else ""
        if REDUCTION_MARKER not in text or not isinstance(self.model, torch.nn.parallel.DistributedDataParallel):
            return super().on_exception(exception)
        if getattr(exception, "torch_text", None):  # the engine's own error: names and fixes are in it already
            return None
        indices = unused_indices(text).get(self.global_rank, [])
        engine = getattr(self._hooks, "engine", None)
        order = list(getattr(engine, "order", None) or [])  # the reducer's parameters as it was built
        if not order:
            order = reducer_parameter_names(self.model.module, getattr(self.model, "parameters_to_ignore", ()))
        names = [order[i] for i in indices if i < len(order)]
        if names:
            exception.args = (
                f"{text}\nParameters that got no gradient on rank {self.global_rank}: {', '.join(names)}.\n"
                "Fix: ddp=auto (decides from the first steps), ddp=safe (any pattern; by hand: "
                "strategy='ddp_find_unused_parameters_true'), or ddp=static if the same parameters are unused in "
                "every step (DDPStrategy(static_graph=True)).",
                *exception.args[1:],
            )
        return None


class ProgressLog(pl.Callback):
    """Step, loss and throughput in the run's log, every ``every`` steps, from rank 0 (Lightning's own progress
    bar shows on rank 0's console as well)."""

    def __init__(self, log: Any, every: int, total: int) -> None:
        self.out, self.every, self.total = log, every, total
        self.started = 0.0
        self.samples = 0

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        import time

        self.started = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        import time

        first = next(iter(batch.values())) if isinstance(batch, dict) else batch
        first = first[0] if isinstance(first, (list, tuple)) else first
        self.samples += len(first) * trainer.world_size
        step = trainer.global_step
        if trainer.is_global_zero and (step % self.every == 0 or step == self.total):  # total None: by epochs
            # manual optimization returns {}; a training_step may return None (the step skipped)
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            shown = "n/a" if loss is None else f"{float(loss):.4f}"
            rate = self.samples / max(time.perf_counter() - self.started, 1e-9)
            self.out.info("step %d/%s loss %s (%.0f samples/s)", step, self.total or "?", shown, rate)


class RankEnvironment(ClusterEnvironment):
    """A rank whose process was started outside Lightning (our launcher, or torchrun) with the process group
    already created: Lightning starts no process and creates no group."""

    def __init__(self, rank: int, local_rank: int, world_size: int, local_world_size: int) -> None:
        super().__init__()
        self._rank, self._local_rank = rank, local_rank
        self._world_size, self._local_world_size = world_size, local_world_size

    @property
    def creates_processes_externally(self) -> bool:
        return True

    @property
    def main_address(self) -> str:
        return os.environ.get("MASTER_ADDR", "127.0.0.1")

    @property
    def main_port(self) -> int:
        return int(os.environ.get("MASTER_PORT", "0"))

    @staticmethod
    def detect() -> bool:
        return True

    def world_size(self) -> int:
        return self._world_size

    def set_world_size(self, size: int) -> None:
        pass  # fixed by the launcher

    def global_rank(self) -> int:
        return self._rank

    def set_global_rank(self, rank: int) -> None:
        pass

    def local_rank(self) -> int:
        return self._local_rank

    def node_rank(self) -> int:
        return self._rank // self._local_world_size


class DemoSegmenter(pl.LightningModule):
    """The built-in demo as a LightningModule: the deep-supervision segmentation net; with
    ``deep_supervision=False`` its coarser heads get no gradient (the DDP error under Lightning's default)."""

    def __init__(self, deep_supervision: bool = True, lr: float = 0.05, width: int = 8, depth: int = 3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = DeepSupervisionNet(width=width, depth=depth, deep_supervision=deep_supervision)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.net(**batch)["loss"]
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


class DemoData(pl.LightningDataModule):
    """Synthetic blobs to segment; Lightning adds the distributed sampler itself."""

    def __init__(self, batch_size: int = 16, size: int = 512, image_size: int = 32, num_workers: int = 0,
                 pin_memory: bool = False, seed: int = 0) -> None:  # fmt: skip
        super().__init__()
        self.batch_size, self.size, self.image_size = batch_size, size, image_size
        self.num_workers, self.pin_memory, self.seed = num_workers, pin_memory, seed

    def setup(self, stage: str) -> None:
        self.train_set = SyntheticBlobs(self.size, self.image_size, seed=self.seed)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True,
                          num_workers=self.num_workers, pin_memory=self.pin_memory)  # fmt: skip
