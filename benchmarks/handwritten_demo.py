"""A hand-written DDP script for the built-in demo, as a user would write it: the start-up reference for
``vs_handwritten.py --startup`` (two ranks on this machine, gloo, one share of the cores each).

    python benchmarks/handwritten_demo.py [--steps 2]
"""

from __future__ import annotations

import argparse
import os


def rank_main(rank: int, world: int, port: int, steps: int) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader, DistributedSampler

    from adapters.demo import DeepSupervisionNet, SyntheticBlobs

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = DistributedDataParallel(DeepSupervisionNet())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    dataset = SyntheticBlobs()
    sampler = DistributedSampler(dataset, world, rank, shuffle=True, seed=0, drop_last=True)
    step = 0
    while step < steps:
        for batch in DataLoader(dataset, batch_size=16, sampler=sampler, drop_last=True):
            out = model(**batch)
            loss = out["loss"] if isinstance(out, dict) else out
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step >= steps:
                break
    if rank == 0:
        print(f"loss {loss.item():.4f} after {step} steps")
    dist.destroy_process_group()


if __name__ == "__main__":
    import socket

    import torch.multiprocessing as mp

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(rank_main, args=(2, port, args.steps), nprocs=2, start_method="spawn")
