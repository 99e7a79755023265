"""Users' own LightningModules, by _target_: a text classifier with a pooler its loss never uses (as a model
loaded with a pooler for another task), logging in training_step, with its own train_dataloader (no DataModule);
and the demo module, killed on one rank."""

import os
import signal

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adapters.frameworks.lightning_parts import DemoSegmenter


class PoolerClassifier(pl.LightningModule):
    def __init__(self, vocab: int = 32, hidden: int = 16, lr: float = 0.1, samples: int = 128) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Embedding(vocab, hidden)
        self.pooler = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, 2)

    def training_step(self, batch, batch_idx):
        tokens, label = batch
        loss = nn.functional.cross_entropy(self.head(self.embed(tokens).mean(1)), label)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, self.hparams.vocab, (self.hparams.samples, 6), generator=g)
        return DataLoader(TensorDataset(tokens, (tokens[:, 0] % 2).long()), batch_size=8, shuffle=True)


class KilledOnOneRank(DemoSegmenter):
    """The demo module whose process is killed outright at one step on one rank, as the kernel's out-of-memory
    killer or a failing node would: no exception, no Lightning handler, nothing reported."""

    def __init__(self, deep_supervision: bool = True, lr: float = 0.05, rank: int = 1, step: int = 3) -> None:
        super().__init__(deep_supervision=deep_supervision, lr=lr)
        self.kill_rank, self.kill_step = rank, step

    def training_step(self, batch, batch_idx):
        if self.global_rank == self.kill_rank and self.global_step == self.kill_step:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().training_step(batch, batch_idx)
