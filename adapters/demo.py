"""The built-in demo: a tiny U-Net-like segmenter with deep-supervision heads, and synthetic blobs.

It reproduces nnU-Net's situation with deep supervision off: one segmentation head per decoder level. With deep
supervision on, every head's output is in the loss; with it off only the last (full-resolution) head is
run, so ``heads.0`` and ``heads.1`` get no gradient and DDP's default setting stops the run.

Both follow the contract for user models and data: the dataset yields dicts of tensors, and the model is
called as ``model(**batch)`` and returns the loss or a dict with a ``"loss"`` key.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(1, cout), nn.LeakyReLU(0.01))


class DeepSupervisionNet(nn.Module):
    """Encoder with ``depth`` stages, a decoder, and one 1x1 segmentation head per decoder level.

    ``heads[-1]`` is the full-resolution output; ``heads[0]`` the coarsest (nnU-Net's ``seg_layers``).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 2, width: int = 8, depth: int = 3,
                 deep_supervision: bool = True):  # fmt: skip
        super().__init__()
        self.deep_supervision = deep_supervision
        widths = [width * 2**i for i in range(depth)]
        self.encoder = nn.ModuleList()
        cin = in_channels
        for w in widths:
            self.encoder.append(_block(cin, w))
            cin = w
        self.decoder = nn.ModuleList(_block(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(depth - 1)))
        # heads[i] segments decoder level i (coarse to fine)
        self.heads = nn.ModuleList(nn.Conv2d(w, num_classes, 1) for w in [widths[-1]] + widths[-2::-1])

    def forward(self, image: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        skips = []
        x = image
        for i, stage in enumerate(self.encoder):
            x = stage(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        outputs = [self.heads[0](x)] if self.deep_supervision else []
        for level, stage in enumerate(self.decoder, start=1):
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            x = stage(torch.cat([x, skips[-1 - level]], dim=1))
            if self.deep_supervision or level == len(self.decoder):
                outputs.append(self.heads[level](x))
        # Deep supervision: every output against the target at its own scale, finer outputs weigh more.
        weights = [2.0**i for i in range(len(outputs))]
        loss = image.new_zeros(())
        for w, out in zip(weights, outputs, strict=True):
            t = F.interpolate(target[:, None].float(), size=out.shape[-2:], mode="nearest")[:, 0].long()
            loss = loss + w * F.cross_entropy(out, t)
        return {"loss": loss / sum(weights)}


class SyntheticBlobs(Dataset):
    """Images with one bright disc each, and its mask. Deterministic per index (same on every rank)."""

    def __init__(self, size: int = 512, image_size: int = 32, in_channels: int = 1, seed: int = 0):
        self.size, self.image_size, self.in_channels, self.seed = size, image_size, in_channels, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        n = self.image_size
        cy, cx = torch.randint(n // 4, 3 * n // 4, (2,), generator=g).tolist()
        r = int(torch.randint(n // 8, n // 4, (1,), generator=g))
        yy, xx = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).long()
        noise = 0.3 * torch.randn(self.in_channels, n, n, generator=g)
        return {"image": mask[None].float().expand(self.in_channels, n, n) + noise, "target": mask}


class TextClassifier(nn.Module):
    """Embedding, GRU encoder, a main head and an auxiliary head (the fastNLP demo).

    ``aux_loss=False`` leaves ``aux_head`` out of the loss, so its parameters get no gradient.
    """

    def __init__(self, vocab_size: int = 64, hidden: int = 32, num_classes: int = 2, aux_loss: bool = True):
        super().__init__()
        self.aux_loss = aux_loss
        self.embedding = nn.Embedding(vocab_size, hidden, padding_idx=0)
        self.encoder = nn.GRU(hidden, hidden, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)
        self.aux_head = nn.Linear(hidden, 1)  # predicts the share of "high" tokens

    def forward(self, tokens: torch.Tensor, target: torch.Tensor, high_share: torch.Tensor) -> dict[str, torch.Tensor]:
        states, _ = self.encoder(self.embedding(tokens))
        pooled = states.mean(dim=1)
        loss = F.cross_entropy(self.head(pooled), target)
        if self.aux_loss:
            loss = loss + 0.5 * F.mse_loss(self.aux_head(pooled).squeeze(-1), high_share)
        return {"loss": loss}

    def train_step(self, tokens, target, high_share):  # fastNLP's name for the training forward
        return self(tokens, target, high_share)


class SyntheticTokens(Dataset):
    """Token sequences labelled by whether most tokens are in the upper half of the vocabulary."""

    def __init__(self, size: int = 256, seq_len: int = 12, vocab_size: int = 64, seed: int = 0):
        self.size, self.seq_len, self.vocab_size, self.seed = size, seq_len, vocab_size, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        tokens = torch.randint(1, self.vocab_size, (self.seq_len,), generator=g)
        high = (tokens >= self.vocab_size // 2).float().mean()
        return {"tokens": tokens, "target": (high > 0.5).long(), "high_share": high}
