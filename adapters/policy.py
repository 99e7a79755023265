"""The DDP policy: one schema that every framework adapter translates into its own settings.

The dataclasses here are registered in Hydra's ConfigStore (see ``adapters.config``), so every
``conf/ddp/*.yaml`` is checked against them when the config is composed: a misspelt key or a value
outside an Enum fails before anything runs.

OmegaConf matches Enum values by member *name*, so each member's name equals its value.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

from .errors import ConfigError, close_matches


class UnusedParams(enum.Enum):
    """What DDP does about parameters that get no gradient in a step."""

    strict = "strict"  # DDP's default: fastest; stops with "Expected to have finished reduction" if any are unused
    find = "find"  # find_unused_parameters=True: walks the autograd graph after every forward; always works
    static = "static"  # static_graph=True: learns the used set in step 1; the set must not change afterwards
    ignore = "ignore"  # leave parameters out of DDP's reduction (named, or unused in the first steps everywhere)
    auto = "auto"  # decide from the run's own first steps: the cheapest of strict, ignore and find that holds


class OnIgnoredGrad(enum.Enum):
    """What happens when a parameter left out of DDP (by ddp=auto or ddp.ignore) gets a gradient on some rank."""

    sync = "sync"  # average its gradient across ranks before the optimizer step (as DDP would), log once, go on
    fail = "fail"  # stop the run on every rank before the optimizer step, naming the parameters


class DebugLevel(enum.Enum):
    """``TORCH_DISTRIBUTED_DEBUG`` for every rank."""

    off = "off"
    info = "info"  # adds parameter names to DDP's errors; cheap
    detail = "detail"  # adds collective checks; crashes in DDP's constructor on gloo, so gloo runs get info


class LauncherName(enum.Enum):
    """Who starts the worker processes."""

    local = "local"  # train.py spawns them on this machine
    torchrun = "torchrun"  # torchrun's agent, one per node (multi-node, restarts)


class Backend(enum.Enum):
    """torch.distributed backend."""

    auto = "auto"  # nccl when every local rank has its own GPU, else gloo
    gloo = "gloo"
    nccl = "nccl"


#: DDP keyword arguments the adapters set themselves; ``ddp.kwargs`` may not pass them.
OWNED_DDP_KWARGS = {
    "module": "the adapter passes the model",
    "device_ids": "set per rank by the adapter (the local GPU, or None on CPU)",
    "output_device": "set per rank by the adapter",
    "process_group": "the adapter uses the default process group",
    "find_unused_parameters": "use ddp.unused_params=find",
    "static_graph": "use ddp.unused_params=static",
    "broadcast_buffers": "use ddp.broadcast_buffers",
    "forward_sync_buffers": "use ddp.broadcast_buffers (passed as forward_sync_buffers where torch has it)",
    "bucket_cap_mb": "use ddp.bucket_cap_mb",
    "gradient_as_bucket_view": "use ddp.gradient_as_bucket_view",
}


@dataclass
class DDPPolicy:
    """The ``ddp`` node: one policy, mapped by each adapter onto its framework's own settings."""

    # strict | find | static | ignore | auto. See UnusedParams.
    unused_params: UnusedParams = UnusedParams.auto
    # off | info | detail: TORCH_DISTRIBUTED_DEBUG, set in every rank before the process group exists.
    debug: DebugLevel = DebugLevel.off
    # Pass-through DDP settings. None keeps the framework's own default (mmengine's broadcast_buffers
    # default is False, torch's is True), so only what the user sets is sent.
    broadcast_buffers: Optional[bool] = None
    bucket_cap_mb: Optional[float] = None
    gradient_as_bucket_view: Optional[bool] = None
    # Seconds a collective (and the start-up rendezvous) may wait for the other ranks before the process group
    # gives up and the run stops naming the ranks that never came. 10 minutes, NCCL's own default, leaves
    # room for a slow checkpoint or a rank-0-only evaluation; null: torch's default (30 minutes on gloo).
    timeout_s: Optional[int] = 600
    # Any other DistributedDataParallel keyword argument, checked against its signature before launch.
    kwargs: Dict[str, Any] = field(default_factory=dict)
    # With ignore: parameter or module names to leave out of DDP (globs allowed, e.g. "decoder.seg_layers.*").
    # Empty: the parameters that no rank used in the first ddp.probe_steps training steps.
    ignore: List[str] = field(default_factory=list)
    # auto, ignore without names, and `python -m adapters doctor`: how many of the run's own first training steps
    # decide (DDP's reducer stands aside in them, and their gradients are averaged as DDP averages them).
    probe_steps: int = 2
    # When a parameter left out of DDP (by auto, or named in ddp.ignore) gets a gradient on some
    # rank: sync averages it across ranks before clipping, GradScaler or the optimizer read it, and logs once;
    # fail stops every rank before the optimizer step. Either way no rank applies a gradient alone.
    on_ignored_grad: OnIgnoredGrad = OnIgnoredGrad.sync
    # Compare every rank's parameters with rank 0's at the end of the run; a difference fails the run.
    check_replicas: bool = True
    # Also compare them every this many optimizer steps (0: only at the end).
    check_replicas_every: int = 0


@dataclass
class LauncherConfig:
    """The ``launcher`` node: how the worker processes are started."""

    # local: this process spawns nproc workers and watches them. torchrun: this process hands the run to
    # torchrun (one agent per node: rendezvous, restarts). Either way, a process started by torchrun runs
    # as one rank, taking the world from torchrun's environment.
    name: LauncherName = LauncherName.local
    # Worker processes on this machine (one GPU each when the backend is nccl).
    nproc: int = 2
    backend: Backend = Backend.auto
    master_addr: str = "127.0.0.1"
    # 0 picks a free port.
    master_port: int = 0
    # Intra-op threads per rank. 0: OMP_NUM_THREADS when the environment sets it, else this machine's CPUs
    # divided by its ranks, so ranks never fight for the cores.
    threads_per_rank: int = 0
    # After one rank fails, how long the others get to report their own error before they are stopped.
    grace_s: float = 3.0
    # launcher=local: a rank whose heartbeat (a thread writing the time every second) is this many seconds
    # old is named and every rank stopped: frozen (SIGSTOP, a debugger) or stuck in native code holding the
    # GIL. 0: not watched. Deadlocks that still beat are bounded by ddp.timeout_s.
    heartbeat_s: float = 60.0
    # torchrun only: machines taking part, this machine's index, and where the agents meet.
    nnodes: int = 1
    node_rank: int = 0
    rdzv_backend: str = "c10d"
    rdzv_endpoint: str = "127.0.0.1:29400"
    # The same on every node of one run (and across restarts): names the rendezvous.
    rdzv_id: str = "adapters"
    # torchrun restarts all workers this many times after one fails; training resumes from the last checkpoint.
    max_restarts: int = 0


class OnOOM(enum.Enum):
    """What a training step that runs out of memory does."""

    fail = "fail"  # stop at once, naming the settings to lower
    halve = "halve"  # every rank drops the step, halves its batch size and goes on from the same samples


@dataclass
class MemoryPolicy:
    """The ``memory`` node: what decides memory use, mapped onto each framework's own settings.

    None keeps the framework's own value (or its ``framework.*`` option).
    """

    # Samples per process per step.
    batch_size: Optional[int] = None
    # Data-loading worker processes per rank (nnU-Net: data-augmentation processes, nnUNet_n_proc_DA).
    num_workers: Optional[int] = None
    # Page-locked host copies of each batch, for faster copies to the GPU (no effect on CPU).
    pin_memory: Optional[bool] = None
    # Mixed precision: autocast (bfloat16 on CPU, float16 with a GradScaler on GPU) where the framework has it.
    amp: Optional[bool] = None
    # fail | halve (framework=torch, whose loop is ours): see OnOOM.
    on_oom: OnOOM = OnOOM.fail
    # With halve: the smallest per-process batch size to try before giving up.
    min_batch_size: int = 1


@dataclass
class TrustConfig:
    """The ``trust`` node: what configs from shared presets (a folder or a pip package) may do."""

    # Module prefixes whose callables (``_target_``) a shared config may name. Ours are trusted as they are;
    # a shared config that sets ``trust`` itself is refused. Widen it on the command line for a team's models.
    allowed_targets: List[str] = field(
        default_factory=lambda: ["adapters.", "torch.nn.", "torch.optim.", "torch.utils.data."]
    )
    # An mmdet config named by a shared source is a Python file mmengine executes, and a checkpoint it names
    # (resume, framework.resume, framework.load_from, framework.resume_from, framework.ckpt_path,
    # framework.resume_from_checkpoint) is unpickled when loaded: both are refused unless this is set on the
    # command line (configs shipped with mmdet, mmdet::<path>, are allowed).
    allow_python_configs: bool = False


@dataclass
class RunConfig:
    """The root of the composed config. ``framework`` is typed by each framework's own schema."""

    framework: Any = MISSING
    ddp: DDPPolicy = field(default_factory=DDPPolicy)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    memory: MemoryPolicy = field(default_factory=MemoryPolicy)
    trust: TrustConfig = field(default_factory=TrustConfig)
    # Continue the run in this folder (outputs/<date>/<time>) from its checkpoints/last.pt, in that folder.
    # Without it every run starts afresh in a new folder of its own.
    resume: Optional[str] = None


def out_of_range(key: str, value: Any, rule: str, fix: str) -> ConfigError:
    """The one form of a value outside its range: the key, the value, the range, the fix."""
    return ConfigError(f"{key}={value} is out of range: {rule}.\nFix: {fix}.")


def check_memory(memory: MemoryPolicy, framework: str, framework_batch_size: Optional[int] = None) -> None:
    for key in ("batch_size", "min_batch_size"):
        value = getattr(memory, key)
        if value is not None and value < 1:
            raise out_of_range(f"memory.{key}", value, "it must be at least 1", f"memory.{key}=1 or more")
    if memory.num_workers is not None and memory.num_workers < 0:
        raise out_of_range("memory.num_workers", memory.num_workers, "it must be 0 (load in the training process) "
                           "or more", "memory.num_workers=0")  # fmt: skip
    batch = memory.batch_size if memory.batch_size is not None else framework_batch_size
    if batch is not None and memory.min_batch_size > batch:
        raise out_of_range(
            "memory.min_batch_size", memory.min_batch_size,
            f"the smallest batch size to halve down to cannot exceed the batch size ({batch} per process)",
            f"memory.min_batch_size={batch} or less, or a larger memory.batch_size",
        )  # fmt: skip
    if memory.on_oom is OnOOM.halve and framework != "torch":
        raise ConfigError(
            f"memory.on_oom=halve needs a training loop that can drop a step and change its batch size: "
            f"framework=torch has one; framework={framework} runs its own loop.\n"
            "Fix: memory.on_oom=fail (stops with the settings to lower), or lower memory.batch_size."
        )


def check_policy(policy: DDPPolicy) -> None:
    """What the schema cannot check by itself."""
    if policy.probe_steps < 1:
        raise out_of_range("ddp.probe_steps", policy.probe_steps, "it must be at least 1 (2 tells a changing graph "
                           "apart)", "ddp.probe_steps=2")  # fmt: skip
    if policy.timeout_s is not None and policy.timeout_s < 1:
        raise out_of_range("ddp.timeout_s", policy.timeout_s, "seconds a collective may wait must be at least 1 "
                           "(null: torch's own default, 30 minutes)", "ddp.timeout_s=600 (the default)")  # fmt: skip
    if policy.bucket_cap_mb is not None and not policy.bucket_cap_mb > 0:
        raise out_of_range("ddp.bucket_cap_mb", policy.bucket_cap_mb, "DDP's gradient buckets need a size above 0 "
                           "MiB (null: DDP's own 25)", "ddp.bucket_cap_mb=25, or leave it out")  # fmt: skip
    if policy.check_replicas_every < 0:
        raise out_of_range("ddp.check_replicas_every", policy.check_replicas_every, "it must be 0 (only at the end "
                           "of the run) or more", "ddp.check_replicas_every=0")  # fmt: skip
    if policy.check_replicas_every and not policy.check_replicas:
        raise ConfigError(
            "ddp.check_replicas_every is set, but ddp.check_replicas=false turns the replica check off.\n"
            "Fix: drop one of them."
        )
    if policy.ignore and policy.unused_params is not UnusedParams.ignore:
        raise ConfigError(
            f"ddp.ignore is set, but ddp.unused_params={policy.unused_params.name}: the names are only used with "
            "ignore.\nFix: ddp=ignore (or ddp.unused_params=ignore), or drop ddp.ignore."
        )


def check_kwargs(policy: DDPPolicy) -> None:
    """Check ``ddp.kwargs`` against DistributedDataParallel's signature (imports torch only when used)."""
    if not policy.kwargs:
        return
    for key in policy.kwargs:
        if key in OWNED_DDP_KWARGS:
            raise ConfigError(f"ddp.kwargs.{key} cannot be passed through: {OWNED_DDP_KWARGS[key]}.")
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    accepted = sorted(set(inspect.signature(DistributedDataParallel.__init__).parameters) - {"self"})
    for key in policy.kwargs:
        if key not in accepted:
            close = close_matches(key, accepted)
            hint = f" Did you mean ddp.kwargs.{close[0]}?" if close else ""
            passable = ", ".join(k for k in accepted if k not in OWNED_DDP_KWARGS)
            raise ConfigError(
                f"ddp.kwargs.{key} is not a DistributedDataParallel argument.{hint}\n"
                f"Arguments that can be passed through: {passable}."
            )
