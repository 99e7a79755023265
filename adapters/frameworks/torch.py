"""framework=torch: plain PyTorch DistributedDataParallel, with a training loop of our own.

The policy becomes DDP keyword arguments. The model and data are any callables named by ``_target_``
(the built-in demo by default), under one contract: the dataset yields dicts of tensors; the model is
called as ``model(**batch)`` and returns the loss, or a dict with a ``"loss"`` key.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Any, Dict

from ..base import Adapter, NativeSettings, WorkerContext, ddp_kwargs, debug_env, policy_notes
from ..errors import ConfigError
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

    def translate(self, policy: DDPPolicy, *, backend: Backend) -> NativeSettings:
        kwargs = ddp_kwargs(policy)
        env, notes = debug_env(policy, backend)
        device_ids = "[local_rank]" if backend is Backend.nccl else "None"
        args = "".join(f", {k}={v!r}" for k, v in kwargs.items())
        return NativeSettings(
            framework=self.name,
            settings={"ddp_kwargs": kwargs},
            env=env,
            notes=(*_COST.get(policy.unused_params, ()), *policy_notes(policy), *notes),
            snippet=f"torch.nn.parallel.DistributedDataParallel(model, device_ids={device_ids}{args})",
        )

    def memory_settings(self, memory: MemoryPolicy, framework_cfg: Any, *, backend: Backend,
                        world_size: int) -> dict[str, Any]:  # fmt: skip
        def pick(key: str, default: Any) -> Any:
            value = getattr(memory, key)
            return default if value is None else value

        amp = ("float16 + GradScaler" if backend is Backend.nccl else "bfloat16") if memory.amp else "off"
        return {
            "DataLoader.batch_size": pick("batch_size", framework_cfg["batch_size"]),
            "DataLoader.num_workers": pick("num_workers", framework_cfg["num_workers"]),
            "DataLoader.pin_memory": pick("pin_memory", backend is Backend.nccl),
            "torch.autocast": amp,
            "on out of memory": f"{memory.on_oom.name}" + (f" (down to batch size {memory.min_batch_size})"
                                                           if memory.on_oom is OnOOM.halve else ""),
        }  # fmt: skip

    def validate(self, framework_cfg: Any) -> None:
        for key in ("model", "data"):
            _check_target(f"framework.{key}", dict(framework_cfg[key]))
        targets = (framework_cfg["model"].get("_target_"), framework_cfg["data"].get("_target_"))
        if targets != (DEMO_MODEL, DEMO_DATA):  # the built-in pair meets it (about 2 s of torch's lazy set-up saved)
            check_contract(framework_cfg)
        fw = framework_cfg
        if fw["checkpoint_every"] < 0:
            raise out_of_range("framework.checkpoint_every", fw["checkpoint_every"], "it must be 0 (never) or more",
                               "framework.checkpoint_every=10")  # fmt: skip
        for key in ("steps", "batch_size", "log_every"):
            if fw[key] < 1:
                raise out_of_range(f"framework.{key}", fw[key], "it must be at least 1", f"framework.{key}=1 or more")
        if not fw["lr"] > 0:
            raise out_of_range("framework.lr", fw["lr"], "the learning rate must be above 0", "framework.lr=0.05")
        if fw["num_workers"] < 0:
            raise out_of_range("framework.num_workers", fw["num_workers"], "DataLoader workers per rank must be 0 "
                               "(load in the training process) or more", "framework.num_workers=0")  # fmt: skip

    def run(self, ctx: WorkerContext) -> dict[str, Any]:
        import torch
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel
        from torch.utils.data import DataLoader, DistributedSampler, Subset

        from .. import checkpoint
        from ..memory import OOMGuard, inject_test_oom
        from ..testhooks import die_for_test, freeze_for_test
        from ..world import World

        fw = ctx.cfg["framework"]
        torch.manual_seed(fw["seed"])
        device = torch.device(ctx.device)
        model = build("framework.model", fw["model"], deep_supervision=fw["deep_supervision"]).to(device)
        dataset = build("framework.data", fw["data"])
        memory = self.memory_settings(ctx.memory, fw, backend=ctx.backend, world_size=ctx.world_size)
        batch_size = memory["DataLoader.batch_size"]
        if len(dataset) < batch_size * ctx.world_size:
            raise ConfigError(
                f"framework.data has {len(dataset)} samples, fewer than one step needs "
                f"(batch size {batch_size} x {ctx.world_size} processes)."
            )
        sampler = DistributedSampler(dataset, ctx.world_size, ctx.rank, shuffle=True, seed=fw["seed"], drop_last=True)

        def loader_over(indices: list[int], size: int) -> DataLoader:
            # A generator of its own: the loader never draws from the global RNG, which checkpoints restore.
            return DataLoader(Subset(dataset, indices), batch_size=size, drop_last=True,
                              num_workers=memory["DataLoader.num_workers"],
                              pin_memory=memory["DataLoader.pin_memory"],
                              generator=torch.Generator().manual_seed(fw["seed"]))  # fmt: skip

        def to_device(batch: dict) -> dict:
            return {k: v.to(device, non_blocking=True) for k, v in batch.items()}

        def probe_step(batch: dict) -> None:
            _loss(model(**to_device(batch))).backward()

        decided = ctx.resolve_unused_params(model, cycle(loader_over(list(sampler), batch_size)), probe_step) or {}
        kwargs = {**ctx.native.settings["ddp_kwargs"], **decided}

        def wrap() -> Any:
            return ctx.track_ddp(DistributedDataParallel(model, device_ids=ctx.device_ids, **kwargs))

        ddp = wrap()
        optimizer = torch.optim.SGD(model.parameters(), lr=fw["lr"], momentum=0.9)
        amp = memory["torch.autocast"] != "off"
        scaler = torch.amp.GradScaler("cuda") if amp and device.type == "cuda" else None
        guard = OOMGuard(ctx, batch_size)
        inject_test_oom(model, guard)

        steps, log_every = fw["steps"], fw["log_every"]
        ctx.log.info(
            "training %s on %d process(es), %s: %d steps of %d samples per process%s",
            type(model).__name__, ctx.world_size, ctx.device if ctx.world_size == 1 else ctx.backend.name,
            steps, batch_size, f", autocast {memory['torch.autocast']}" if amp else "",
        )  # fmt: skip
        step, epoch, position = 0, 0, 0
        checkpoint_path = ctx.run_dir / "checkpoints" / "last.pt"
        # Only on request: resume=<this folder>, or torchrun restarting its workers in the same run.
        restart = World.detect().restart
        wanted = ctx.cfg.get("resume") is not None or restart > 0
        resumed = checkpoint.load(checkpoint_path) if wanted else None
        checkpoint.agree(resumed, checkpoint_path, ctx.rank)
        if resumed is not None:
            model.load_state_dict(resumed["model"])
            optimizer.load_state_dict(resumed["optimizer"])
            if scaler and resumed.get("scaler"):
                scaler.load_state_dict(resumed["scaler"])
            step, epoch, position, guard.batch_size = (resumed[k] for k in ("step", "epoch", "position", "batch_size"))
            checkpoint.restore_rng(resumed["rng"][ctx.rank])
            ctx.set_step(step)
            why = f"torchrun restart {restart}" if restart and ctx.cfg.get("resume") is None else "resume="
            ctx.log.info(
                "resuming from step %d of %s (%s)",
                step,
                checkpoint_path,
                why + (str(ctx.cfg["resume"]) if why == "resume=" else ""),
            )

        def save_checkpoint() -> None:
            rng = checkpoint.all_rng_states()  # every rank takes part
            if ctx.is_main:
                checkpoint.save_atomic({
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict() if scaler else None, "step": step, "epoch": epoch,
                    "position": position, "batch_size": guard.batch_size, "rng": rng,
                }, checkpoint_path)  # fmt: skip

        loss_sum, window_start = torch.zeros((), device=device), time.perf_counter()
        started = window_start
        last_loss = float("nan")
        first_done: tuple[int, float] | None = None  # (step, time) after this process's first step
        while step < steps:
            sampler.set_epoch(epoch)
            indices = list(sampler)
            while step < steps and position + guard.batch_size <= len(indices):
                for batch in loader_over(indices[position:], guard.batch_size):
                    with torch.autocast(device.type, dtype=torch.bfloat16 if device.type == "cpu" else torch.float16,
                                        enabled=amp):  # fmt: skip
                        loss = guard.forward(lambda b=batch, wrapped=ddp: _loss(wrapped(**to_device(b))))
                    if loss is None:  # every rank dropped this step; go on from the same samples, smaller
                        ddp = guard.halve(wrap)
                        break
                    optimizer.zero_grad(set_to_none=True)
                    (scaler.scale(loss) if scaler else loss).backward()
                    if step == 0:
                        ctx.first_step_done()
                    if scaler:
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        optimizer.step()
                    step += 1
                    if first_done is None:
                        first_done = (step, time.perf_counter())
                    position += guard.batch_size
                    loss_sum += loss.detach().float()
                    die_for_test(step, ctx.rank)
                    freeze_for_test(step, ctx.rank)
                    if fw["checkpoint_every"] and step % fw["checkpoint_every"] == 0 and step < steps:
                        save_checkpoint()
                    if step % log_every == 0 or step == steps:
                        n = log_every if step % log_every == 0 else step % log_every
                        dist.all_reduce(loss_sum)  # every rank takes part; only rank 0 prints
                        last_loss = loss_sum.item() / (n * ctx.world_size)
                        now = time.perf_counter()
                        rate = n / (now - window_start)
                        ctx.log.info(
                            "step %d/%d | loss %.4f | %.1f steps/s | %.0f samples/s",
                            step, steps, last_loss, rate, rate * guard.batch_size * ctx.world_size,
                        )  # fmt: skip
                        loss_sum.zero_()
                        window_start = now
                    if step >= steps:
                        break
                else:
                    break  # the epoch's samples are used up
            epoch, position = epoch + 1, 0
        ended = time.perf_counter()
        seconds = ended - started
        summary = {"steps": step, "loss": round(last_loss, 4), "seconds": round(seconds, 2),
                   "steps_per_s": round(step / seconds, 2)}  # fmt: skip
        if first_done is not None and step > first_done[0]:
            # Without the first step's one-off costs (lazy initialisation, DDP's first reduction).
            summary["steady_steps_per_s"] = round((step - first_done[0]) / (ended - first_done[1]), 3)
        if guard.tried:
            summary["batch_size"] = guard.batch_size
        if fw["save"] and ctx.is_main:
            path = ctx.run_dir / "model.pt"
            torch.save(ddp.module.state_dict(), path)
            summary["weights"] = str(path)
        return summary


def cycle(iterable: Any) -> Any:
    """Batches without end (the probe may want more steps than one pass has)."""
    while True:
        yield from iterable


CONTRACT = (
    "The contract: the dataset's items are dicts of tensors, the model is called as model(**batch) and "
    "returns the loss (a tensor with one value) or a dict with a 'loss' key."
)


def _loss(output: Any) -> Any:
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


def check_contract(framework_cfg: Any) -> None:
    """Dataset items and model output meet the contract: checked before any process starts, on two samples,
    with the model built on the meta device (no memory used, no real arithmetic). A model that cannot run on
    the meta device (data-dependent code) is checked by its first training step instead."""
    import torch
    from torch.utils.data import default_collate

    data_target = framework_cfg["data"].get("_target_")
    try:
        dataset = build("framework.data", dict(framework_cfg["data"]))
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
    model_node = dict(framework_cfg["model"])
    try:
        with torch.device("meta"):
            model = build("framework.model", model_node, deep_supervision=framework_cfg["deep_supervision"])
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
    _loss(output)


def _split(node: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    node = dict(node)
    target = node.pop("_target_", None)
    return target, node


def locate(target: str) -> Any:
    """The object a dotted path names (module attribute, or nested attribute)."""
    import importlib

    parts = target.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError as exc:
            if exc.name and not ".".join(parts[:cut]).startswith(exc.name):
                raise  # the module exists but something it imports does not
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(f"no module found in '{target}'")


def _check_target(path: str, node: dict[str, Any]) -> None:
    """The target imports and accepts the arguments given: checked once, before any process starts."""
    target, args = _split(node)
    if not target:
        raise ConfigError(f"{path}._target_ is missing: name the class or function to build, e.g. {DEMO_MODEL}.")
    try:
        obj = locate(target)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(
            f"{path}._target_={target} cannot be imported: {exc}\n"
            "Fix: make the module importable (installed, or on PYTHONPATH) and check the spelling."
        ) from None
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    for key in args:
        if key not in params:
            raise ConfigError(
                f"{path}.{key}: {target} takes no argument '{key}'. It takes: {', '.join(params) or 'none'}.\n"
                f"Fix: remove it (~{path}.{key}) or name the whole node: {path}='{{_target_: {target}, ...}}'."
            )


def build(path: str, node: dict[str, Any], **offered: Any) -> Any:
    """Instantiate ``node`` (nested ``_target_`` nodes too). ``offered`` arguments go only where taken."""
    from hydra.utils import instantiate

    target, args = _split(node)
    try:
        params = inspect.signature(locate(target)).parameters
    except (TypeError, ValueError):
        params = {}
    extra = {k: v for k, v in offered.items() if k in params and k not in args}
    return instantiate({"_target_": target, **args, **extra}, _convert_="all")


ADAPTER = TorchAdapter()
