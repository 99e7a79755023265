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
        late_from: int = 0,
        use_p: float = 0.0,
        seed: int = 0,
        perturb_on_rank: int = -1,
        perturb_at: int = 0,
        checkpoint: str = "none",
        unfreeze_at: int = 0,
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
        # "late": the aux branch runs from forward number late_from on (the probe's forwards count too);
        # "until": before it only.
        self.late_from = late_from
        # "random": the aux branch runs with probability use_p per forward, drawn from the model's own
        # generator seeded with seed + rank (as LayerDrop or expert routing would; the probe does not rewind it).
        self.use_p = use_p
        self.generator = torch.Generator().manual_seed(seed + int(os.environ.get("RANK", "0")))
        # A model that changes its own weights on one rank (forward number perturb_at): the replicas differ.
        self.perturb_on_rank, self.perturb_at = perturb_on_rank, perturb_at
        # "reentrant" / "plain": the inner blocks run under torch.utils.checkpoint(use_reentrant=True / False).
        self.checkpoint = checkpoint
        # The stem is frozen when the model is built (so when DDP wraps it) and trainable from forward number
        # unfreeze_at on (set at the end of the forward before: between two steps, as a fine-tuning callback does).
        self.unfreeze_at = unfreeze_at
        if unfreeze_at:
            self.stem.requires_grad_(False)
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
        if self.steps == self.perturb_at and rank == self.perturb_on_rank:
            with torch.no_grad():
                self.head.weight.add_(1e-3)
        h = self.stem(x) + self.frozen
        if self.checkpoint == "none":
            h = self.blocks["inner"](h)
        else:
            from torch.utils.checkpoint import checkpoint

            h = checkpoint(self.blocks["inner"], h, use_reentrant=self.checkpoint == "reentrant")
        h = nn.functional.dropout(self.reuse(h), 0.1, self.training)  # draws from torch's random stream
        loss = ((self.head(h).squeeze(-1) * self.scale - y) ** 2).mean()
        # "none": everything in the loss; "aux": the aux branch never is; "alternate": only in odd steps;
        # "some_ranks": only on rank 0; "some_ranks_late": everywhere but on rank 1 from forward late_from on;
        # "late" and "random": see __init__.
        if (
            self.unused == "none"
            or (self.unused == "alternate" and self.steps % 2)
            or (self.unused == "some_ranks" and rank == 0)
            or (self.unused == "some_ranks_late" and (rank == 0 or self.steps < self.late_from))
            or (self.unused == "late" and self.steps >= self.late_from)
            or (self.unused == "until" and self.steps < self.late_from)
            or (self.unused == "random" and float(torch.rand((), generator=self.generator)) < self.use_p)
        ):
            p = self.aux["proj"](h)
            loss = loss + (self.aux["out"](p) + self.aux_tied(p)).pow(2).mean() * 1e-3
        if self.unfreeze_at and self.steps == self.unfreeze_at - 1:
            self.stem.requires_grad_(True)
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


def random_use_seed(use_p: float, probe_steps: int = 2, ranks: int = 2, within: int = 8) -> int:
    """A seed for TrickyNet(unused="random") whose draws skip the aux branch in every probe step on every
    rank, and use it in a training step within the first ``within`` steps on some rank."""
    for seed in range(10_000):
        draws = [torch.rand(probe_steps + within, generator=torch.Generator().manual_seed(seed + r)) for r in
                 range(ranks)]  # fmt: skip
        if all((d[:probe_steps] >= use_p).all() for d in draws) and any((d[probe_steps:] < use_p).any() for d in draws):
            return seed
    raise AssertionError("no such seed")


class PairData(Regression):
    """Breaks the contract: items are (x, y) tuples, as many datasets return them."""

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class TupleOutput(nn.Module):
    """Breaks the contract: returns (loss, prediction)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 1)

    def forward(self, x, y):
        pred = self.lin(x).squeeze(-1)
        return ((pred - y) ** 2).mean(), pred


class Logits(nn.Module):
    """Breaks the contract: returns its predictions, not a loss."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x, y):
        return self.lin(x)


class ThreadsSeen(nn.Module):
    """Writes ``torch.get_num_threads()`` as this rank sees it while training, to
    ``$MY_PKG_THREADS_DIR/threads_rank<N>.txt``, at its first forward."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 1)
        self.seen = False

    def forward(self, x, y):
        if not self.seen:
            import torch.distributed as dist

            rank = dist.get_rank() if dist.is_initialized() else 0
            folder = os.environ.get("MY_PKG_THREADS_DIR", ".")
            with open(os.path.join(folder, f"threads_rank{rank}.txt"), "w") as f:
                f.write(str(torch.get_num_threads()))
            self.seen = True
        return ((self.lin(x).squeeze(-1) - y) ** 2).mean()
