"""Models and data for the benchmarks, following framework=torch's contract (dict items, model(**batch) -> loss)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset


class DeepMLP(nn.Module):
    """Many small autograd nodes and little compute each: where find_unused_parameters' walk weighs most.
    ``aux_head`` is left out of the loss unless ``unused_head`` is false."""

    def __init__(self, layers: int = 96, width: int = 64, unused_head: bool = True):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
        self.head = nn.Linear(width, 1)
        self.aux_head = nn.Sequential(nn.Linear(width, width), nn.Linear(width, 1))
        self.unused_head = unused_head

    def forward(self, x, y):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        loss = ((self.head(x).squeeze(-1) - y) ** 2).mean()
        if not self.unused_head:
            loss = loss + self.aux_head(x).pow(2).mean() * 1e-3
        return loss


class Vectors(Dataset):
    def __init__(self, size: int = 4096, width: int = 64):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(size, width, generator=g)
        self.y = torch.randn(size, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}
