"""A team's own Lightning script, as users keep them: its own LightningModule (a classifier whose pooler the loss
never uses) and Trainer call, started with torchrun. The strategy comes from the team's preset through one
library call (adapters.api.Policy.lightning_strategy).

    torchrun --standalone --nproc_per_node 2 lightning_own_script.py <team preset folder> <output folder>
"""

import logging
import sys
import types
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adapters.api import Policy


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.pooler = nn.Linear(16, 16)  # kept for a downstream task; this loss does not use it
        self.head = nn.Linear(16, 2)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.head(self.encoder(x)), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(256, 8, generator=g)
        return DataLoader(TensorDataset(x, (x.sum(1) > 0).long()), batch_size=16, shuffle=True)


def main(presets: str, out: str) -> None:
    policy = Policy(["preset=team-all", f"hydra.searchpath=[file://{presets}]"], framework="lightning",
                    backend="gloo")  # fmt: skip
    torch.manual_seed(0)
    strategy = policy.lightning_strategy()
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=6, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, default_root_dir=out)  # fmt: skip
    model = Classifier()
    logging.basicConfig(level=logging.INFO if trainer.global_rank == 0 else logging.WARNING)
    trainer.fit(model)
    policy.finish()
    from adapters.worker import save_replica_for_test  # the test suite's own digests (armed by its environment)

    save_replica_for_test(types.SimpleNamespace(ddp_model=strategy.model, run_dir=Path(out), rank=trainer.global_rank))
    if trainer.global_rank == 0:
        print(f"own script done: ddp_kwargs={strategy.ddp_kwargs}, ignored={sorted(policy.engine.left_out)}",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
