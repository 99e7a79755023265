"""A team's own fastNLP training script, as users keep them: its own model, data and Trainer call, started with
torchrun. The DDP policy comes from the team's preset through one library call (adapters.api.Policy).

    torchrun --standalone --nproc_per_node 2 fastnlp_own_script.py <team preset folder> <output folder>
"""

import logging
import sys
import types
from pathlib import Path

import torch
import torch.distributed as dist
from fastNLP import Trainer
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from adapters.api import Policy
from adapters.demo import SyntheticTokens, TextClassifier


def main(presets: str, out: str) -> None:
    dist.init_process_group("gloo")  # CPU: fastNLP's "DDP initialised outside" mode
    rank = dist.get_rank()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING)  # progress from rank 0 only
    policy = Policy(["preset=team-all", f"hydra.searchpath=[file://{presets}]"], framework="fastnlp", backend="gloo")
    torch.manual_seed(0)
    model = TextClassifier(aux_loss=False)  # the auxiliary head is left out of the loss: no gradient
    loader = DataLoader(SyntheticTokens(128), batch_size=16, shuffle=True, drop_last=True)

    ddp_kwargs = policy.ddp_kwargs()
    ddp = policy.track(DistributedDataParallel(model, **ddp_kwargs))  # the team preset says ddp=auto
    trainer = Trainer(
        model=ddp,
        driver="torch",
        device=None,
        optimizers=torch.optim.SGD(model.parameters(), lr=0.05),
        train_dataloader=loader,
        n_epochs=1,
        progress_bar="raw",
        **policy.fastnlp_trainer_kwargs(),
    )
    trainer.driver._pids = None
    trainer.run()
    policy.finish()
    from adapters.worker import save_replica_for_test  # the test suite's own digests (armed by its environment)

    save_replica_for_test(types.SimpleNamespace(ddp_model=ddp, run_dir=Path(out), rank=rank))
    if rank == 0:
        print(f"own script done: ddp_kwargs={ddp_kwargs}, ignored={len(ddp.parameters_to_ignore)}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
