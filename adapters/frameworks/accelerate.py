"""framework=accelerate: a training loop written the Hugging Face Accelerate way, the policy in its DDP handler.

Accelerate takes DDP settings only in code, ``Accelerator(kwargs_handlers=[DistributedDataParallelKwargs(...)])``
(its config file from ``accelerate config`` has no place for them), and sends only the fields that differ from
its defaults. Two traps it sets on a machine without a GPU, both refused here: ``accelerate launch --cpu
--num_processes 2`` runs one process without DDP, and torchrun with a plain ``Accelerator()`` gives every rank
``DistributedType.NO``: two unsynchronised trainings that exit 0.

The model and data are any callables named by ``_target_`` under framework=torch's contract (dict batches;
``model(**batch)`` returns the loss or a dict with ``"loss"``, which a Hugging Face output is). The wrapper
``accelerator.prepare`` builds is handed to the engine before the first step: auto decides from the loop's own
first steps, with Accelerate's own sharding, accumulation and mixed precision.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict

from ..base import Adapter, WorkerContext
from ..building import check_target
from ..native import MemorySettings, Setting, Translation, call_args
from ..policy import Backend, DDPPolicy, MemoryPolicy, out_of_range
from .hf_parts import HANDLER_FIELDS, buffer_note, handler_kwargs, refuse_unsupported

DEMO_MODEL = "adapters.demo.DeepSupervisionNet"
DEMO_DATA = "adapters.demo.SyntheticBlobs"


@dataclass
class AccelerateConfig:
    """The ``framework`` node for framework=accelerate."""

    name: str = "accelerate"
    # Optimizer steps.
    steps: int = 20
    # Samples per process per step (the DataLoader's; Accelerate shards the data across the processes).
    batch_size: int = 16
    lr: float = 0.05
    seed: int = 0
    # Rank 0 logs step, loss and throughput every this many steps.
    log_every: int = 5
    # Accelerator(gradient_accumulation_steps=...): DDP syncs gradients only on the last micro-step.
    gradient_accumulation_steps: int = 1
    # Handed to the model's constructor when it takes ``deep_supervision`` and the model node does not set it.
    # False leaves the demo's coarser heads out of the loss: parameters that get no gradient.
    deep_supervision: bool = True
    # The model: ``_target_`` plus its constructor arguments.
    model: Dict[str, Any] = field(default_factory=lambda: {"_target_": DEMO_MODEL})
    # The dataset (items are dicts of tensors): ``_target_`` plus its constructor arguments.
    data: Dict[str, Any] = field(default_factory=lambda: {"_target_": DEMO_DATA})


class AccelerateAdapter(Adapter):
    name = "accelerate"
    schema = AccelerateConfig

    def _translate(self, kwargs: dict[str, Any], policy: DDPPolicy, backend: Backend) -> Translation:
        handler = handler_kwargs(kwargs)
        cpu = backend is not Backend.nccl
        snippet = (f"Accelerator({'cpu=True, ' if cpu else ''}kwargs_handlers=[DistributedDataParallelKwargs("
                   f"{call_args(handler).removeprefix(', ')})])")  # fmt: skip
        notes = (
            "Accelerate takes DDP settings only in code, through this handler; its config file (accelerate config) "
            "has no place for them. Fields left at Accelerate's defaults are not sent to DDP.",
            "The run is refused unless Accelerate really set up DDP over every rank (MULTI_CPU/MULTI_GPU and a "
            "DistributedDataParallel wrapper): on a machine without a GPU, torchrun with a plain Accelerator() and "
            "accelerate launch --cpu both train without DDP and exit 0.",
        )
        settings = {"cpu": cpu, "kwargs_handlers": {"DistributedDataParallelKwargs": handler}}
        return Translation(settings, snippet, (*notes, *buffer_note(policy, "Accelerate's handler")))

    def check_policy(self, policy: DDPPolicy) -> None:
        refuse_unsupported(policy, self.name, HANDLER_FIELDS, "DistributedDataParallelKwargs")

    def memory_settings(self, memory: MemoryPolicy, fw: AccelerateConfig, *, backend: Backend,
                        world_size: int) -> MemorySettings:  # fmt: skip
        out = [Setting("DataLoader.batch_size", memory.batch_size or fw.batch_size, note="per process")]
        for key in ("num_workers", "pin_memory"):
            if getattr(memory, key) is not None:
                out.append(Setting(f"DataLoader.{key}", getattr(memory, key)))
        if memory.amp is not None:
            precision = ("fp16" if backend is Backend.nccl else "bf16") if memory.amp else "no"
            out.append(Setting("Accelerator.mixed_precision", precision))
        return MemorySettings(tuple(out))

    def validate(self, fw: AccelerateConfig) -> None:
        for key in ("steps", "batch_size", "log_every", "gradient_accumulation_steps"):
            if getattr(fw, key) < 1:
                raise out_of_range(f"framework.{key}", getattr(fw, key), "it must be at least 1",
                                   f"framework.{key}=1 or more")  # fmt: skip
        if not fw.lr > 0:
            raise out_of_range("framework.lr", fw.lr, "the learning rate must be above 0", "framework.lr=0.05")
        check_target("framework.model", dict(fw.model), DEMO_MODEL)
        check_target("framework.data", dict(fw.data), DEMO_DATA)

    def run(self, ctx: WorkerContext) -> dict[str, Any]:
        import time

        import torch
        from torch.utils.data import DataLoader

        from ..building import build, cycle
        from ..loop import loss_of
        from .hf_parts import check_distributed, check_wrapped, set_rank_environment

        set_rank_environment(ctx)
        from accelerate import Accelerator, DistributedDataParallelKwargs

        fw = ctx.framework
        memory = ctx.memory_applied
        torch.manual_seed(fw.seed)
        model = build("framework.model", fw.model, deep_supervision=fw.deep_supervision).to(ctx.device)
        data = build("framework.data", fw.data)
        loader = DataLoader(data, batch_size=memory["DataLoader.batch_size"], shuffle=True, drop_last=True,
                            num_workers=memory.get("DataLoader.num_workers", 0),
                            pin_memory=memory.get("DataLoader.pin_memory", False))  # fmt: skip

        settings = ctx.native.settings
        handler = DistributedDataParallelKwargs(**settings["kwargs_handlers"]["DistributedDataParallelKwargs"])
        ctx.training_facts(accumulation=fw.gradient_accumulation_steps > 1)
        accelerator = Accelerator(cpu=settings["cpu"], kwargs_handlers=[handler],
                                  gradient_accumulation_steps=fw.gradient_accumulation_steps,
                                  mixed_precision=memory.get("Accelerator.mixed_precision"))  # fmt: skip
        check_distributed(accelerator.state, ctx.world_size, "Accelerate")
        optimizer = torch.optim.SGD(model.parameters(), lr=fw.lr, momentum=0.9)
        wrapped, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        check_wrapped(wrapped, ctx.world_size, "accelerator.prepare")
        ctx.track_ddp(wrapped)
        batches = cycle(loader)
        started, samples, loss = time.perf_counter(), 0, None
        for step in range(1, fw.steps + 1):
            for _ in range(fw.gradient_accumulation_steps):
                batch = next(batches)
                with accelerator.accumulate(wrapped):
                    loss = loss_of(wrapped(**batch))
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        ctx.first_step_done()
                    optimizer.step()
                    optimizer.zero_grad()
                samples += len(next(iter(batch.values()))) * ctx.world_size
            if ctx.is_main and (step % fw.log_every == 0 or step == fw.steps):
                rate = samples / max(time.perf_counter() - started, 1e-9)
                ctx.log.info("step %d/%d | loss %.4f | %.0f samples/s", step, fw.steps, loss.item(), rate)
        return {"steps": fw.steps, "loss": round(loss.item(), 4)}


ADAPTER = AccelerateAdapter()
