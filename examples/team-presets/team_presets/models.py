"""A model of the team's own, named by a preset: allowed only once `trust.allowed_targets` includes team_presets."""

import torch
from torch import nn


class TinySegNet(nn.Module):
    """Follows the ddp-adapters contract: model(**batch) -> {"loss": ...} for batches of image/target."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 2, 1))
        self.aux = nn.Conv2d(width, 2, 1)  # kept for a later experiment; not in the loss

    def forward(self, image: torch.Tensor, target: torch.Tensor) -> dict:
        return {"loss": nn.functional.cross_entropy(self.body(image), target)}
