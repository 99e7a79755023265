"""A team's own Accelerate training loop, started with torchrun: a small BERT for masked-language modelling (its
output layer tied to the word embeddings, and a pooler its loss never uses), the DDP policy from the team's
preset through adapters.api.Policy.

    torchrun --standalone --nproc_per_node 2 accelerate_own_script.py <team preset folder> <output folder> [plain]

"plain" builds the Accelerator the way many scripts do, Accelerator() without cpu=True: on a machine without a
GPU that is no DDP at all, and check_accelerator must refuse it.
"""

import itertools
import logging
import sys
import types
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import default_data_collator

from adapters.api import Policy
from adapters.frameworks.hf_parts import SyntheticMLM, tiny_bert


def main(presets: str, out: str, plain: bool) -> None:
    policy = Policy(["preset=team-all", f"hydra.searchpath=[file://{presets}]"], framework="accelerate",
                    backend="gloo")  # fmt: skip
    if plain:
        accelerator = Accelerator(kwargs_handlers=[policy.accelerate_kwargs_handler()])
        policy.check_accelerator(accelerator)  # raises: Accelerate set up no DDP here
        return
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING)
    torch.manual_seed(0)
    model = tiny_bert(pooler=True)
    loader = DataLoader(SyntheticMLM(128), batch_size=8, shuffle=True, collate_fn=default_data_collator)
    kwargs = policy.ddp_kwargs()  # the team preset says ddp=auto: decided from the loop's first steps
    accelerator = Accelerator(cpu=True, kwargs_handlers=[policy.accelerate_kwargs_handler(kwargs)])
    policy.check_accelerator(accelerator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ddp, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    policy.track(ddp)
    for batch in itertools.islice(loader, 6):
        loss = ddp(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    policy.finish()
    from adapters.worker import save_replica_for_test  # the test suite's own digests (armed by its environment)

    save_replica_for_test(types.SimpleNamespace(ddp_model=ddp, run_dir=Path(out), rank=rank))
    if rank == 0:
        print(f"own script done: kwargs={kwargs}, ignored={sorted(ddp.parameters_to_ignore)}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], plain=sys.argv[3:] == ["plain"])
