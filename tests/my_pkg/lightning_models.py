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


class StepAware(DemoSegmenter):
    """A module that reads its Trainer in training_step (``self.trainer`` exists only inside Lightning's loop) and
    branches on ``global_step``: the demo's coarser heads join the loss only in odd optimizer steps, so the unused
    set changes between steps. Run detached from the Trainer, ``self.trainer`` raises and ``global_step`` is 0."""

    def training_step(self, batch, batch_idx):
        assert self.trainer.max_steps > 0, "the Trainer is attached"
        self.net.deep_supervision = self.global_step % 2 == 1
        image = nn.functional.dropout(batch["image"], 0.1)  # draws from torch's random stream
        loss = self.net(image=image, target=batch["target"])["loss"]
        self.log("loss", loss)
        return loss


class ToggledGAN(pl.LightningModule):
    """A GAN with manual optimization and Lightning's own ``toggle_optimizer``: in each step the generator's
    backward leaves the discriminator's parameters without a gradient (they are frozen while it runs), then the
    discriminator's backward leaves the generator's."""

    def __init__(self, noise: int = 8, width: int = 16, lr: float = 0.05) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.generator = nn.Sequential(nn.Linear(noise, width), nn.ReLU(), nn.Linear(width, 4))
        self.discriminator = nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 1))
        self.noise, self.lr = noise, lr

    def training_step(self, batch, batch_idx):
        (real,) = batch
        opt_g, opt_d = self.optimizers()
        z = torch.randn(len(real), self.noise, generator=torch.Generator().manual_seed(batch_idx + self.global_rank))
        self.toggle_optimizer(opt_g)
        fake = self.generator(z)
        g_loss = nn.functional.softplus(-self.discriminator(fake)).mean()
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()
        self.untoggle_optimizer(opt_g)
        self.toggle_optimizer(opt_d)
        d_loss = (nn.functional.softplus(-self.discriminator(real)).mean()
                  + nn.functional.softplus(self.discriminator(self.generator(z).detach())).mean())  # fmt: skip
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        self.untoggle_optimizer(opt_d)

    def configure_optimizers(self):
        return (torch.optim.SGD(self.generator.parameters(), lr=self.lr),
                torch.optim.SGD(self.discriminator.parameters(), lr=self.lr))  # fmt: skip

    def train_dataloader(self):
        real = torch.randn(64, 4, generator=torch.Generator().manual_seed(0)) * 0.5 + 1.0
        return DataLoader(TensorDataset(real), batch_size=8, shuffle=True)


class FinetunedBackbone(DemoSegmenter):
    """Lightning's own fine-tuning pattern: ``BackboneFinetuning`` freezes ``self.backbone`` before training (so
    when DDP wraps the module) and unfreezes it at the start of epoch 1, adding it to the optimizer."""

    def __init__(self, deep_supervision: bool = True, lr: float = 0.05) -> None:
        super().__init__(deep_supervision=deep_supervision, lr=lr)
        self.backbone = self.net.encoder

    def configure_callbacks(self):
        from lightning.pytorch.callbacks import BackboneFinetuning

        return [BackboneFinetuning(unfreeze_backbone_at_epoch=1, lambda_func=lambda epoch: 1.0, verbose=False)]

    def configure_optimizers(self):
        trainable = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.SGD(trainable, lr=self.hparams.lr)
