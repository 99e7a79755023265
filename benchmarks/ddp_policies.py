"""Steps per second for strict, find, static, ignore and auto, measured side by side in one run.

Two ranks (gloo on CPU; nccl when there is a GPU per rank) train two models:

* ``deep MLP, all used``: a deep, narrow MLP, every parameter in the loss: many small autograd nodes,
  where find_unused_parameters' extra graph walk weighs most;
* ``deep MLP + unused head``: the same with an auxiliary head left out of the loss (strict cannot run).

Each setting gets its own identically initialised copy and DDP wrapper; ``auto`` goes through the same
code the adapters use (``WorkerContext.track_ddp``: its first steps decide, its reducer is rebuilt with the
decision, the step counter and, when parameters are left out, the guard that keeps them in sync). ``auto, no
guard`` is the wrapper auto decided on, built by hand, without the engine's hooks: the difference between
the two is what the guard costs. Where the installed torch has DDP's ``skip_all_reduce_unused_params``
(2.8 and later), ``static + skip_all_reduce_unused_params`` runs next to ``static``: whether skipping the
reduction of the never-used parameters pays. The settings take turns in short timed blocks in a rotating order, so
drift on the machine falls on all of them alike. The table gives each setting's median step time, the
spread of its blocks (25th to 75th percentile), its ratio to the best hand-picked setting (the fastest of
strict, find, static and ignore that works), the guard's cost, and what deciding cost, in training steps.

    python benchmarks/ddp_policies.py [--rounds 60] [--steps 10] [--layers 96] [--width 64]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

NO_GUARD = "auto, no guard"
CONTROL = "auto, no guard, a second copy"  # the noise floor: two identical wrappers, paired like the guard
SKIP = "static + skip_all_reduce_unused_params"  # torch >= 2.8: the never-used parameters are not reduced
COLLECTIVE = "auto, guard by collective"
HAND_PICKED = {"strict": {}, "find": {"find_unused_parameters": True}, "static": {"static_graph": True},
               "ignore": None}  # fmt: skip


def _model(layers: int, width: int, unused_head: bool):
    import torch
    from torch import nn

    class DeepMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
            self.head = nn.Linear(width, 1)
            self.aux_head = nn.Sequential(nn.Linear(width, width), nn.Linear(width, 1))  # left out of the loss

        def forward(self, x, y):
            for layer in self.layers:
                x = torch.tanh(layer(x))
            loss = ((self.head(x).squeeze(-1) - y) ** 2).mean()
            if not unused_head:
                loss = loss + self.aux_head(x).pow(2).mean() * 1e-3
            return loss

    return DeepMLP()


def _timed(ddp, opt, inputs, steps: int, cuda: bool) -> float:
    """Seconds per step over ``steps`` steps, as slow as the slowest rank."""
    import torch
    import torch.distributed as dist

    if cuda:
        torch.cuda.synchronize()
    dist.barrier()
    start = time.perf_counter()
    for s in range(steps):
        loss = ddp(**inputs[s % len(inputs)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if cuda:
        torch.cuda.synchronize()
    elapsed = torch.tensor([time.perf_counter() - start])
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return elapsed.item() / steps


def _auto(ddp, rank: int, world: int, cuda: bool, device) -> Any:
    """ddp=auto through the adapters' own code: the wrapper handed to the engine (``WorkerContext.track_ddp``), which
    decides from its first steps (run in the warm-up) and rebuilds its reducer. Returns the context."""
    from adapters.base import WorkerContext
    from adapters.native import NativeSettings
    from adapters.policy import Backend, DDPPolicy, UnusedParams

    backend = Backend.nccl if cuda else Backend.gloo
    policy = DDPPolicy(unused_params=UnusedParams.auto)
    ctx = WorkerContext(rank, rank, world, backend, str(device), Path("."), None, policy, NativeSettings("torch", {}),
                        logging.getLogger("bench"))  # fmt: skip
    ctx.track_ddp(ddp)
    return ctx


def _collective_guard(ddp, ctx) -> None:
    """The guard as nccl runs have it: its flags in one small all-reduce of their own (on gloo, auto's guard
    lets them ride on DDP's last bucket instead)."""
    from adapters.guard import IgnoredGradGuard, StepCounter

    IgnoredGradGuard(ddp, ctx.engine.left_out, StepCounter(ddp), on_grad=ctx.policy.on_ignored_grad, why="", advice="",
                     log=ctx.log, exchange="collective")  # fmt: skip


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, queue) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from adapters.ignorelist import set_ignored

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= world
    if cuda:
        torch.cuda.set_device(rank)
    device = torch.device(f"cuda:{rank}" if cuda else "cpu")
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    from adapters import threads

    threads.apply(threads.plan(0, world, os.environ)[0])  # as the launcher does
    g = torch.Generator().manual_seed(rank)
    inputs = [{"x": torch.randn(args.batch, args.width, generator=g).to(device),
               "y": torch.randn(args.batch, generator=g).to(device)} for _ in range(4)]  # fmt: skip
    results = {}
    for scenario, unused_head in (("deep MLP, all used", False), ("deep MLP + unused head", True)):
        models, observed_steps, auto_choice, ctx = {}, 0.0, "", None
        for name in [*HAND_PICKED, SKIP, "auto", NO_GUARD, CONTROL, COLLECTIVE]:
            if (name == "strict" and unused_head) or (name in (COLLECTIVE, SKIP, CONTROL) and not unused_head):
                continue
            if name == SKIP and not _has_skip():
                continue
            torch.manual_seed(0)
            net = _model(args.layers, args.width, unused_head).to(device)
            kwargs = HAND_PICKED.get(name) or {}
            if name == SKIP:
                kwargs = {"static_graph": True, "skip_all_reduce_unused_params": True}
            if name == "ignore" and unused_head:
                set_ignored(net, [n for n, _ in net.named_parameters() if n.startswith("aux_head.")])
            if name in (NO_GUARD, CONTROL, COLLECTIVE):  # what auto decided, built by hand: the same wrapper
                decision = ctx.engine.decision
                kwargs = {"find_unused_parameters": True} if decision.choice.name == "find" else {}
                if decision.leave_out:
                    set_ignored(net, list(decision.leave_out))
            ddp = DistributedDataParallel(net, device_ids=[rank] if cuda else None, **kwargs)
            opt = torch.optim.SGD(ddp.parameters(), lr=1e-3)
            if name == "auto":
                ctx = _auto(ddp, rank, world, cuda, device)
                # The first steps decide (probe_steps of them, with DDP's reducer standing aside), then one more
                # rebuilds the reducer: their time over as many steady steps is what deciding costs.
                first = _timed(ddp, opt, inputs, ctx.policy.probe_steps + 1, cuda) * (ctx.policy.probe_steps + 1)
                steady = min(_timed(ddp, opt, inputs, 5, cuda) for _ in range(3))
                observed_steps = first / steady - (ctx.policy.probe_steps + 1)
                auto_choice = ctx.engine.decision.choice.name
            if name == COLLECTIVE:
                _collective_guard(ddp, ctx)
            models[name] = (ddp, opt)
        names = list(models)
        for name in names:  # warm up every wrapper (static_graph records its graph in step 1)
            _timed(*models[name], inputs, 3, cuda)
        times: dict[str, list[float]] = {n: [] for n in names}
        for r in range(args.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                times[name].append(_timed(*models[name], inputs, args.steps, cuda))
        results[scenario] = {"ms": {n: statistics.median(t) * 1000 for n, t in times.items()},
                             "spread": {n: _quartiles(t) for n, t in times.items()},
                             "guard": _paired_cost(times["auto"], times[NO_GUARD]),
                             "collective": _paired_cost(times[COLLECTIVE], times[NO_GUARD]) if unused_head else None,
                             "control": _paired_cost(times[CONTROL], times[NO_GUARD]) if unused_head else None,
                             "skip": _paired_cost(times[SKIP], times["static"]) if SKIP in times else None,
                             "observed_extra": observed_steps, "auto_choice": auto_choice}  # fmt: skip
        models.clear()
    if rank == 0:
        queue.put(results)
    dist.barrier()
    dist.destroy_process_group()


def _has_skip() -> bool:
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    return "skip_all_reduce_unused_params" in inspect.signature(DistributedDataParallel).parameters


def _quartiles(values: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0] * 1000, q[2] * 1000


def _paired_cost(guarded: list[float], bare: list[float]) -> tuple[float, float, float]:
    """The guard's cost from blocks timed next to each other in the same round: median and quartiles of
    guarded / bare - 1, in percent (pairs cancel the drift that separate medians would carry)."""
    ratios = [(g / b - 1) * 100 for g, b in zip(guarded, bare, strict=True)]
    q = statistics.quantiles(ratios, n=4, method="inclusive")
    return statistics.median(ratios), q[0], q[2]


def table(results: dict, args: argparse.Namespace) -> str:
    lines = [
        f"2 ranks, {'nccl' if args.cuda else 'gloo (CPU)'}, MLP {args.layers} layers x {args.width}, "
        f"batch {args.batch}/rank, median of {args.rounds} rounds x {args.steps} steps, side by side in one run.",
        "",
        "| model | setting | ms/step (25-75%) | steps/s | vs best hand-picked |",
        "|-------|---------|------------------|---------|---------------------|",
    ]
    for scenario, row in results.items():
        ms = row["ms"]
        hand = [n for n in ms if n in HAND_PICKED]
        best = min(ms[n] for n in hand)
        best_name = min(hand, key=ms.get)
        for name, value in ms.items():
            label = {"auto": f"auto (chose {row['auto_choice']})", NO_GUARD: f"{NO_GUARD} (same wrapper)",
                     COLLECTIVE: f"{COLLECTIVE} (as on nccl)"}.get(name, name)  # fmt: skip
            mark = " (best)" if name == best_name else ""
            low, high = row["spread"][name]
            lines.append(f"| {scenario} | {label} | {value:.2f} ({low:.2f}-{high:.2f}) | {1000 / value:.1f} | "
                         f"{best / value:.3f}x{mark} |")  # fmt: skip
        median, low, high = row["guard"]
        what = "guard" if row["auto_choice"] == "ignore" else "step counter (nothing left out: no guard)"
        lines.append(f"| {scenario} | cost of the {what}: auto vs {NO_GUARD}, paired per round | {median:+.2f}% "
                     f"({low:+.2f}% to {high:+.2f}%) | | |")  # fmt: skip
        if row.get("control"):
            median, low, high = row["control"]
            lines.append(f"| {scenario} | control: {CONTROL} against {NO_GUARD}, paired per round | {median:+.2f}% "
                         f"({low:+.2f}% to {high:+.2f}%) | | |")  # fmt: skip
        if row["collective"]:
            median, low, high = row["collective"]
            lines.append(f"| {scenario} | cost of the guard by collective, paired per round | {median:+.2f}% "
                         f"({low:+.2f}% to {high:+.2f}%) | | |")  # fmt: skip
        if row.get("skip"):
            median, low, high = row["skip"]
            lines.append(f"| {scenario} | step time of {SKIP} against static, paired per round | {median:+.2f}% "
                         f"({low:+.2f}% to {high:+.2f}%) | | |")  # fmt: skip
        lines.append(f"| {scenario} | deciding: the first steps and the rebuild, over as many steady steps | | | "
                     f"{row['observed_extra']:+.2f} training steps |")  # fmt: skip
    lines.append("")
    lines.append("vs best hand-picked: steps/s of the setting divided by steps/s of the fastest of strict, find, "
                 "static, ignore (1.000x = as fast; below 1 = slower). The guard's cost: step time of auto over "
                 "the same wrapper without the guard's hooks, per round, in percent (median, quartiles).")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed block")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--layers", type=int, default=96)
    parser.add_argument("--width", type=int, default=64)
    args = parser.parse_args()

    import torch
    import torch.multiprocessing as mp

    from adapters.launch import free_port

    args.cuda = torch.cuda.is_available() and torch.cuda.device_count() >= 2
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = mp.start_processes(_worker, args=(2, free_port("127.0.0.1"), args, queue), nprocs=2,
                               start_method="spawn", join=False)  # fmt: skip
    results = queue.get()  # before joining: a result larger than the pipe's buffer would block rank 0
    procs.join()
    print(table(results, args))


if __name__ == "__main__":
    main()
