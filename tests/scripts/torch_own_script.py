"""A team's own PyTorch DDP loop, started with torchrun, taking the policy from the team's preset.

torchrun --standalone --nproc_per_node 2 torch_own_script.py <team preset folder> <output folder> [overrides...]
"""

import itertools
import logging
import sys
import types
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from adapters.api import Policy
from adapters.demo import DeepSupervisionNet, SyntheticBlobs


def main(presets: str, out: str, *overrides: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING)
    policy = Policy(["preset=team-all", f"hydra.searchpath=[file://{presets}]", *overrides], backend="gloo")
    torch.manual_seed(0)
    model = DeepSupervisionNet(deep_supervision=False)  # the coarser heads get no gradient
    data = SyntheticBlobs()
    loader = DataLoader(data, batch_size=8, sampler=DistributedSampler(data, world, rank, seed=0), drop_last=True)

    kwargs = policy.ddp_kwargs()
    ddp = policy.track(DistributedDataParallel(model, **kwargs))  # the team preset says ddp=auto
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for step, batch in enumerate(itertools.islice(loader, 6), start=1):
        optimizer.zero_grad()
        ddp(**batch)["loss"].backward()
        optimizer.step()
        if rank == 0:
            print(f"own script step {step}", flush=True)
    policy.finish()  # the replicas compared, the engine's hooks taken off
    from adapters.worker import save_replica_for_test  # the test suite's own digests (armed by its environment)

    save_replica_for_test(types.SimpleNamespace(ddp_model=ddp, run_dir=Path(out), rank=rank))
    if rank == 0:
        print(f"own script done: kwargs={kwargs}, ignored={len(ddp.parameters_to_ignore)}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
