"""A user's own model and data, following the contract: dict batches, model(**batch) -> loss or {"loss": ...}.

``TrickyNet`` has what makes naming unused parameters hard: a parameter on the root module, tied
(shared) weights reachable under two names, a frozen parameter, a module reused at two places, and
deep nesting through ModuleDict and Sequential. ``unused`` picks what the loss leaves out.
"""

import os
import time

import torch
from torch import nn
from torch.utils.data import Dataset


class TrickyNet(nn.Module):
    def __init__(
        self,
        hidden: int = 8,
        unused: str = "aux",
        fail_on_rank: int = -1,
        fail_at_step: int = 0,
        fail_how: str = "exit",
        hang_on_rank: int = -1,
    ):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))  # on the root module
        self.frozen = nn.Parameter(torch.zeros(hidden), requires_grad=False)
        self.stem = nn.Linear(4, hidden)
        self.blocks = nn.ModuleDict(
            {"inner": nn.Sequential(nn.ReLU(), nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh()))}
        )
        self.shared = nn.Linear(hidden, hidden)
        self.reuse = self.shared  # the same module under a second name
        self.head = nn.Linear(hidden, 1)
        self.aux = nn.ModuleDict({"proj": nn.Linear(hidden, 4), "out": nn.Linear(4, 1)})
        self.aux_tied = nn.Linear(4, 1)
        self.aux_tied.weight = self.aux["out"].weight  # tied parameter, second name
        self.unused = unused
        self.fail_on_rank, self.fail_at_step, self.fail_how = fail_on_rank, fail_at_step, fail_how
        self.hang_on_rank = hang_on_rank
        self.steps = 0

    def forward(self, x, y):
        self.steps += 1
        rank = int(os.environ.get("RANK", "0"))
        if self.steps == self.fail_at_step and rank == self.fail_on_rank:
            if self.fail_how == "exit":
                os._exit(17)  # a rank dies outright, mid-run, while its peers wait in a collective
            raise ValueError(f"boom on rank {rank}")
        if self.steps == self.fail_at_step and rank == self.hang_on_rank:
            time.sleep(3600)  # stuck outside any collective: nothing in torch will ever notice
        h = self.blocks["inner"](self.stem(x) + self.frozen)
        h = self.reuse(h)
        loss = ((self.head(h).squeeze(-1) * self.scale - y) ** 2).mean()
        # "none": everything in the loss; "aux": the aux branch never is; "alternate": only in odd steps;
        # "some_ranks": only on rank 0.
        if (
            self.unused == "none"
            or (self.unused == "alternate" and self.steps % 2)
            or (self.unused == "some_ranks" and rank == 0)
        ):
            p = self.aux["proj"](h)
            loss = loss + (self.aux["out"](p) + self.aux_tied(p)).pow(2).mean() * 1e-3
        return {"loss": loss}


class Regression(Dataset):
    def __init__(self, size: int = 256):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(size, 4, generator=g)
        self.y = self.x.sum(-1)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}
