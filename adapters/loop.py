"""Our own training loop (framework=torch): plain DistributedDataParallel on any model and dataset.

The contract: the dataset yields dicts of tensors; the model is called as ``model(**batch)`` and returns the
loss, or a dict with a ``"loss"`` key. The loop owns what a framework would: the sampler and its epochs, the
optimizer, autocast, ``memory.on_oom=halve``, checkpoints and resuming, and rank 0's progress lines.
"""

from __future__ import annotations

import inspect
import time
from typing import Any

from .base import WorkerContext
from .building import build
from .errors import ConfigError

CONTRACT = (
    "The contract: the dataset's items are dicts of tensors, the model is called as model(**batch) and "
    "returns the loss (a tensor with one value) or a dict with a 'loss' key."
)


class Loop:
    """One rank's training: built in ``__init__`` (model, data, DDP), run by ``run()``."""

    def __init__(self, ctx: WorkerContext):
        import torch
        from torch.utils.data import DistributedSampler

        from .memory import OOMGuard, inject_test_oom

        self.ctx = ctx
        fw = self.fw = ctx.framework
        torch.manual_seed(fw.seed)
        self.device = torch.device(ctx.device)
        self.model = build("framework.model", fw.model, deep_supervision=fw.deep_supervision).to(self.device)
        self.dataset = build("framework.data", fw.data)
        memory = ctx.memory_applied
        batch_size = memory["DataLoader.batch_size"]
        if len(self.dataset) < batch_size * ctx.world_size:
            raise ConfigError(
                f"framework.data has {len(self.dataset)} samples, fewer than one step needs "
                f"(batch size {batch_size} x {ctx.world_size} processes)."
            )
        self.sampler = DistributedSampler(self.dataset, ctx.world_size, ctx.rank, shuffle=True, seed=fw.seed,
                                          drop_last=True)  # fmt: skip
        self.ddp_kwargs = dict(ctx.native.settings["ddp_kwargs"])
        self.ddp = self.wrap()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=fw.lr, momentum=0.9)
        self.amp = memory["torch.autocast"] != "off"
        self.scaler = torch.amp.GradScaler("cuda") if self.amp and self.device.type == "cuda" else None
        self.oom = OOMGuard(ctx, batch_size)
        inject_test_oom(self.model, self.oom)
        self.step, self.epoch, self.position = 0, 0, 0
        self.checkpoint_path = ctx.run_dir / "checkpoints" / "last.pt"

    def loader(self, indices: list[int], size: int) -> Any:
        import torch
        from torch.utils.data import DataLoader, Subset

        # A generator of its own: the loader never draws from the global RNG, which checkpoints restore.
        memory = self.ctx.memory_applied
        return DataLoader(Subset(self.dataset, indices), batch_size=size, drop_last=True,
                          num_workers=memory["DataLoader.num_workers"], pin_memory=memory["DataLoader.pin_memory"],
                          generator=torch.Generator().manual_seed(self.fw.seed))  # fmt: skip

    def to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def wrap(self) -> Any:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(self.model, device_ids=self.ctx.device_ids, **self.ddp_kwargs)
        return self.ctx.track_ddp(ddp)

    def resume(self) -> None:
        """Only on request: resume=<this folder>, or torchrun restarting its workers in the same run."""
        from . import checkpoint
        from .world import World

        ctx = self.ctx
        restart = World.detect().restart
        resumed = checkpoint.load(self.checkpoint_path) if ctx.resume is not None or restart > 0 else None
        checkpoint.agree(resumed, self.checkpoint_path, ctx.rank)
        if resumed is None:
            return
        self.model.load_state_dict(resumed["model"])
        self.optimizer.load_state_dict(resumed["optimizer"])
        if self.scaler and resumed.get("scaler"):
            self.scaler.load_state_dict(resumed["scaler"])
        self.step, self.epoch, self.position, self.oom.batch_size = (
            resumed[k] for k in ("step", "epoch", "position", "batch_size")
        )
        checkpoint.restore_rng(resumed["rng"][ctx.rank])
        ctx.set_step(self.step)
        why = f"torchrun restart {restart}" if restart and ctx.resume is None else f"resume={ctx.resume}"
        ctx.log.info("resuming from step %d of %s (%s)", self.step, self.checkpoint_path, why)

    def save_checkpoint(self) -> None:
        from . import checkpoint

        rng = checkpoint.all_rng_states()  # every rank takes part
        if self.ctx.is_main:
            checkpoint.save_atomic({
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None, "step": self.step, "epoch": self.epoch,
                "position": self.position, "batch_size": self.oom.batch_size, "rng": rng,
            }, self.checkpoint_path)  # fmt: skip

    def train_step(self, batch: dict) -> Any:
        """One optimizer step on ``batch``; None when memory.on_oom=halve dropped it on every rank."""
        import torch

        ctx = self.ctx
        dtype = torch.bfloat16 if self.device.type == "cpu" else torch.float16
        with torch.autocast(self.device.type, dtype=dtype, enabled=self.amp):
            loss = self.oom.forward(lambda: loss_of(self.ddp(**self.to_device(batch))))
        if loss is None:
            return None
        self.optimizer.zero_grad(set_to_none=True)
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        if self.step == 0:
            ctx.first_step_done()
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        return loss

    def run(self) -> dict[str, Any]:
        import torch
        import torch.distributed as dist

        from .testhooks import die_for_test, freeze_for_test

        ctx, fw = self.ctx, self.fw
        ctx.log.info(
            "training %s on %d process(es), %s: %d steps of %d samples per process%s",
            type(self.model).__name__, ctx.world_size, ctx.device if ctx.world_size == 1 else ctx.backend.name,
            fw.steps, self.oom.batch_size,
            f", autocast {ctx.memory_applied['torch.autocast']}" if self.amp else "",
        )  # fmt: skip
        self.resume()
        loss_sum, window_start = torch.zeros((), device=self.device), time.perf_counter()
        started = window_start
        last_loss = float("nan")
        first_done: tuple[int, float] | None = None  # (step, time) after this process's first step
        while self.step < fw.steps:
            self.sampler.set_epoch(self.epoch)
            indices = list(self.sampler)
            while self.step < fw.steps and self.position + self.oom.batch_size <= len(indices):
                for batch in self.loader(indices[self.position :], self.oom.batch_size):
                    loss = self.train_step(batch)
                    if loss is None:  # every rank dropped this step; go on from the same samples, smaller
                        self.ddp = self.oom.halve(self.wrap)
                        break
                    self.step += 1
                    if first_done is None:
                        first_done = (self.step, time.perf_counter())
                    self.position += self.oom.batch_size
                    loss_sum += loss.detach().float()
                    die_for_test(self.step, ctx.rank)
                    freeze_for_test(self.step, ctx.rank)
                    if fw.checkpoint_every and self.step % fw.checkpoint_every == 0 and self.step < fw.steps:
                        self.save_checkpoint()
                    if self.step % fw.log_every == 0 or self.step == fw.steps:
                        n = fw.log_every if self.step % fw.log_every == 0 else self.step % fw.log_every
                        dist.all_reduce(loss_sum)  # every rank takes part; only rank 0 prints
                        last_loss = loss_sum.item() / (n * ctx.world_size)
                        now = time.perf_counter()
                        rate = n / (now - window_start)
                        ctx.log.info(
                            "step %d/%d | loss %.4f | %.1f steps/s | %.0f samples/s",
                            self.step, fw.steps, last_loss, rate, rate * self.oom.batch_size * ctx.world_size,
                        )  # fmt: skip
                        loss_sum.zero_()
                        window_start = now
                    if self.step >= fw.steps:
                        break
                else:
                    break  # the epoch's samples are used up
            self.epoch, self.position = self.epoch + 1, 0
        ended = time.perf_counter()
        seconds = ended - started
        summary = {"steps": self.step, "loss": round(last_loss, 4), "seconds": round(seconds, 2),
                   "steps_per_s": round(self.step / seconds, 2)}  # fmt: skip
        if first_done is not None and self.step > first_done[0]:
            # Without the first step's one-off costs (lazy initialisation, DDP's first reduction).
            summary["steady_steps_per_s"] = round((self.step - first_done[0]) / (ended - first_done[1]), 3)
        if self.oom.tried:
            summary["batch_size"] = self.oom.batch_size
        if fw.save and ctx.is_main:
            path = ctx.run_dir / "model.pt"
            torch.save(self.ddp.module.state_dict(), path)
            summary["weights"] = str(path)
        return summary


def loss_of(output: Any) -> Any:
    """The loss in ``output``, or a ConfigError naming what the model returned instead."""
    import torch

    loss = output
    if isinstance(output, dict):
        if "loss" not in output:
            raise ConfigError(f"framework.model returned a dict without a 'loss' key (keys: {', '.join(output)}).\n"
                              f"{CONTRACT}\nFix: add the loss to the dict as 'loss'.")  # fmt: skip
        loss = output["loss"]
    if isinstance(loss, (tuple, list)):
        raise ConfigError(
            f"framework.model returned a {type(loss).__name__} of {len(loss)}, not the loss.\n{CONTRACT}\n"
            "Fix: return the loss, or {'loss': loss, ...} with the other outputs beside it."
        )
    if not isinstance(loss, torch.Tensor):
        raise ConfigError(f"framework.model returned a {type(loss).__name__}, not a tensor.\n{CONTRACT}")
    if loss.numel() != 1:
        raise ConfigError(
            f"framework.model returned a tensor of shape {list(loss.shape)}, not a loss with one value (logits?).\n"
            f"{CONTRACT}\nFix: compute the loss inside forward from the targets in the batch, and return it."
        )
    return loss


def check_contract(fw: Any) -> None:
    """Dataset items and model output meet the contract: checked before any process starts, on two samples,
    with the model built on the meta device (no memory used, no real arithmetic). A model that cannot run on
    the meta device (data-dependent code) is checked by its first training step instead."""
    import torch
    from torch.utils.data import default_collate

    data_target = fw.data.get("_target_")
    try:
        dataset = build("framework.data", dict(fw.data))
        items = [dataset[i] for i in range(min(2, len(dataset)))]
    except Exception:  # e.g. a dataset that needs its rank: built in every rank anyway, with its own error there
        return
    if not items:
        raise ConfigError(f"framework.data: {data_target} has no samples.")
    if not isinstance(items[0], dict):
        raise ConfigError(
            f"framework.data: the items of {data_target} are {type(items[0]).__name__}s, not dicts.\n{CONTRACT}\n"
            "Fix: return a dict from __getitem__, keyed by the model's forward arguments, e.g. "
            "{'image': image, 'target': label}."
        )
    model_node = dict(fw.model)
    try:
        with torch.device("meta"):
            model = build("framework.model", model_node, deep_supervision=fw.deep_supervision)
    except Exception:  # built for real in every rank anyway, with its own error there
        return
    keys = sorted(items[0])
    try:
        inspect.signature(model.forward).bind(**{k: None for k in keys})
    except TypeError as exc:
        raise ConfigError(
            f"framework.model: {model_node.get('_target_')}.forward cannot take the dataset's keys as arguments "
            f"({', '.join(keys)}): {exc}.\n{CONTRACT}\nFix: rename the dataset's keys or forward's arguments "
            "so they match."
        ) from None
    try:
        batch = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in default_collate(items).items()}
        output = model.train()(**batch)
    except Exception:  # not runnable on the meta device: the first training step checks the output
        return
    loss_of(output)
