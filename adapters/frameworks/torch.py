"""framework=torch: plain PyTorch DistributedDataParallel, with a training loop of our own (``adapters.loop``).

The policy becomes DDP keyword arguments. The model and data are any callables named by ``_target_``
(the built-in demo by default), under the loop's contract: the dataset yields dicts of tensors; the model is
called as ``model(**batch)`` and returns the loss, or a dict with a ``"loss"`` key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict

from ..base import Adapter, WorkerContext
from ..building import check_target
from ..native import MemorySettings, Setting, Translation, call_args
from ..policy import Backend, DDPPolicy, MemoryPolicy, OnOOM, UnusedParams, out_of_range

DEMO_MODEL = "adapters.demo.DeepSupervisionNet"
DEMO_DATA = "adapters.demo.SyntheticBlobs"


@dataclass
class TorchConfig:
    """The ``framework`` node for framework=torch."""

    name: str = "torch"
    # Optimizer steps (each one a forward/backward on every rank).
    steps: int = 40
    # Samples per process per step.
    batch_size: int = 16
    lr: float = 0.05
    seed: int = 0
    # Rank 0 logs step, loss and throughput every this many steps.
    log_every: int = 10
    # DataLoader worker processes per rank.
    num_workers: int = 0
    # Handed to the model's constructor when it takes a ``deep_supervision`` argument and the model node
    # does not set it. False leaves the demo's coarser heads out of the loss (the unused-parameters error).
    deep_supervision: bool = True
    # The model: ``_target_`` plus its constructor arguments.
    model: Dict[str, Any] = field(default_factory=lambda: {"_target_": DEMO_MODEL})
    # The dataset: ``_target_`` plus its constructor arguments.
    data: Dict[str, Any] = field(default_factory=lambda: {"_target_": DEMO_DATA})
    # Save the trained weights (unwrapped state_dict) to <run folder>/model.pt from rank 0.
    save: bool = True
    # Write <run folder>/checkpoints/last.pt (model, optimizer, step, data position, every rank's RNG) every
    # this many steps; a run restarted in the same folder (torchrun's max_restarts) resumes from it. 0: never.
    checkpoint_every: int = 10


_COST = {
    UnusedParams.strict: ("DDP's default: no extra work per step; stops if a parameter gets no gradient.",),
    UnusedParams.find: ("find_unused_parameters=True: one extra walk of the autograd graph after every forward.",),
    UnusedParams.static: ("static_graph=True: learns the used parameters in step 1; they must not change later.",),
}


class TorchAdapter(Adapter):
    name = "torch"
    schema = TorchConfig

    def _translate(self, kwargs: dict[str, Any], policy: DDPPolicy, backend: Backend) -> Translation:
        device_ids = "[local_rank]" if backend is Backend.nccl else "None"
        return Translation(
            settings={"ddp_kwargs": kwargs},
            snippet=f"torch.nn.parallel.DistributedDataParallel(model, device_ids={device_ids}{call_args(kwargs)})",
            notes=_COST.get(policy.unused_params, ()),
        )

    def memory_settings(self, memory: MemoryPolicy, fw: TorchConfig, *, backend: Backend,
                        world_size: int) -> MemorySettings:  # fmt: skip
        def pick(key: str, default: Any) -> Any:
            value = getattr(memory, key)
            return default if value is None else value

        amp = ("float16 + GradScaler" if backend is Backend.nccl else "bfloat16") if memory.amp else "off"
        halve = f" (down to batch size {memory.min_batch_size})" if memory.on_oom is OnOOM.halve else ""
        return MemorySettings((
            Setting("DataLoader.batch_size", pick("batch_size", fw.batch_size)),
            Setting("DataLoader.num_workers", pick("num_workers", fw.num_workers)),
            Setting("DataLoader.pin_memory", pick("pin_memory", backend is Backend.nccl)),
            Setting("torch.autocast", amp),
            Setting("on out of memory", f"{memory.on_oom.name}{halve}"),
        ))  # fmt: skip

    def validate(self, fw: TorchConfig) -> None:
        for key in ("model", "data"):
            check_target(f"framework.{key}", dict(getattr(fw, key)), DEMO_MODEL)
        if (fw.model.get("_target_"), fw.data.get("_target_")) != (DEMO_MODEL, DEMO_DATA):
            from ..loop import check_contract

            check_contract(fw)  # the built-in pair meets it (about 2 s of torch's lazy set-up saved)
        if fw.checkpoint_every < 0:
            raise out_of_range("framework.checkpoint_every", fw.checkpoint_every, "it must be 0 (never) or more",
                               "framework.checkpoint_every=10")  # fmt: skip
        for key in ("steps", "batch_size", "log_every"):
            if getattr(fw, key) < 1:
                raise out_of_range(f"framework.{key}", getattr(fw, key), "it must be at least 1",
                                   f"framework.{key}=1 or more")  # fmt: skip
        if not fw.lr > 0:
            raise out_of_range("framework.lr", fw.lr, "the learning rate must be above 0", "framework.lr=0.05")
        if fw.num_workers < 0:
            raise out_of_range("framework.num_workers", fw.num_workers, "DataLoader workers per rank must be 0 "
                               "(load in the training process) or more", "framework.num_workers=0")  # fmt: skip

    def run(self, ctx: WorkerContext) -> dict[str, Any]:
        from ..loop import Loop

        return Loop(ctx).run()


ADAPTER = TorchAdapter()
