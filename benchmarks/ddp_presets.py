"""Per-step cost of each ddp preset, measured side by side in one run.

Two ranks (gloo on CPU, nccl when there is a GPU per rank) train the built-in deep-supervision demo.
Each preset gets its own DDP wrapper around an identical copy of the model; the presets take turns in
short timed blocks, in a rotating order, so that drift on the machine falls on all of them alike.

* all heads in the loss (deep supervision on): strict works, so safe and static are compared with it;
* coarse heads left out (deep supervision off): strict cannot run; safe and static are compared;
* a deep, narrow MLP (many small autograd nodes, little compute each): where find_unused_parameters'
  extra graph walk weighs most.

    python benchmarks/ddp_presets.py [--rounds 8] [--steps 10] [--width 16] [--image-size 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PRESETS = {"strict": {}, "safe": {"find_unused_parameters": True}, "static": {"static_graph": True}}


def _deep_mlp(layers: int, width: int):
    import torch
    from torch import nn

    class DeepMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))

        def forward(self, x, y):
            for layer in self.layers:
                x = torch.tanh(layer(x))
            return {"loss": ((x.sum(-1) - y) ** 2).mean()}

    return DeepMLP()


def _timed_block(ddp, opt, inputs, steps: int, cuda: bool) -> float:
    """Seconds per step over ``steps`` steps, as slow as the slowest rank."""
    import torch
    import torch.distributed as dist

    if cuda:
        torch.cuda.synchronize()
    dist.barrier()
    start = time.perf_counter()
    for s in range(steps):
        loss = ddp(**inputs[s % len(inputs)])["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if cuda:
        torch.cuda.synchronize()
    elapsed = torch.tensor([time.perf_counter() - start])
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return elapsed.item() / steps


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, queue) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from adapters.demo import DeepSupervisionNet, SyntheticBlobs

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= world
    if cuda:
        torch.cuda.set_device(rank)
    device = torch.device(f"cuda:{rank}" if cuda else "cpu")
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    data = SyntheticBlobs(size=args.batch * 4, image_size=args.image_size, seed=rank)
    batches = [
        {k: torch.stack([data[i][k] for i in range(j, j + args.batch)]).to(device) for k in ("image", "target")}
        for j in range(0, len(data), args.batch)
    ]
    mlp_batches = [{"x": torch.randn(args.batch, 64, device=device), "y": torch.randn(args.batch, device=device)}]
    results = {}
    scenarios = {
        "demo, all heads used": (True, batches),
        "demo, coarse heads unused": (False, batches),
        "deep MLP, all used": (None, mlp_batches),
    }
    for scenario, (deep_supervision, inputs) in scenarios.items():
        names = [p for p in PRESETS if deep_supervision is not False or p != "strict"]
        models = {}
        for name in names:
            torch.manual_seed(0)
            if deep_supervision is None:
                net = _deep_mlp(args.mlp_layers, 64).to(device)
            else:
                net = DeepSupervisionNet(width=args.width, depth=4, deep_supervision=deep_supervision).to(device)
            ddp = DistributedDataParallel(net, device_ids=[rank] if cuda else None, **PRESETS[name])
            models[name] = (ddp, torch.optim.SGD(ddp.parameters(), lr=0.01))

        for name in names:  # warm up every wrapper (static_graph records its graph in step 1)
            _timed_block(*models[name], inputs, 3, cuda)
        times: dict[str, list[float]] = {n: [] for n in names}
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                times[name].append(_timed_block(*models[name], inputs, args.steps, cuda))
        results[scenario] = {n: statistics.median(t) * 1000 for n, t in times.items()}
        models.clear()
    if rank == 0:
        queue.put(results)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed block")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--mlp-layers", type=int, default=96)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    import torch.multiprocessing as mp

    from adapters.launch import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(2, free_port("127.0.0.1"), args, queue), nprocs=2, start_method="spawn")
    results = queue.get()
    print(f"median ms per step, 2 ranks, demo width={args.width} depth=4 image={args.image_size} "
          f"batch={args.batch}/rank, {args.rounds} rounds x {args.steps} steps")  # fmt: skip
    for scenario, row in results.items():
        base = row.get("strict", row["safe"])
        base_name = "strict" if "strict" in row else "safe"
        cells = ", ".join(f"{n} {ms:.1f} ms ({ms / base:.2f}x {base_name})" for n, ms in row.items())
        print(f"  {scenario:26s} {cells}")
    if args.json:
        args.json.write_text(
            json.dumps({"args": vars(args) | {"json": str(args.json)}, "ms_per_step": results}, indent=2)
        )


if __name__ == "__main__":
    main()
