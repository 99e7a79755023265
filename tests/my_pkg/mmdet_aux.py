"""A user's own MMDetection detector, registered through ``custom_imports``: RetinaNet with an auxiliary head
that ddp=auto's observed first steps see unused, and later training steps use.

``mode="late"``: the head's loss joins from the ``late_from``-th training step on (a warm-up schedule).
``mode="random"``: it joins with probability ``use_p`` per forward, drawn from the detector's own generator
seeded with ``seed + rank`` (as LayerDrop or expert routing would draw). The head's output convolution is
tied to a second module (``aux_alias``), so its weight is one tensor under two names. Imported only in the
mmdet environment.
"""

import os

import torch
from mmdet.models.detectors import RetinaNet
from mmdet.registry import MODELS
from torch import nn


@MODELS.register_module()
class RetinaNetWithLateAux(RetinaNet):
    def __init__(self, *args, mode: str = "late", late_from: int = 5, use_p: float = 0.0, seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        channels = self.neck.fpn_convs[0].conv.out_channels
        self.aux_head = nn.Sequential(nn.Conv2d(channels, 8, 1), nn.ReLU(), nn.Conv2d(8, 1, 1))
        self.aux_alias = nn.Conv2d(8, 1, 1)
        self.aux_alias.weight = self.aux_head[2].weight  # tied: one tensor, two names
        self.mode, self.late_from, self.use_p = mode, late_from, use_p
        self.generator = torch.Generator().manual_seed(seed + int(os.environ.get("RANK", "0")))
        self.calls = 0

    def loss(self, batch_inputs, batch_data_samples):
        x = self.extract_feat(batch_inputs)
        losses = self.bbox_head.loss(x, batch_data_samples)
        self.calls += 1
        if self.mode == "late":
            use = self.calls >= self.late_from
        else:
            use = float(torch.rand((), generator=self.generator)) < self.use_p
        if use:
            losses["loss_aux"] = self.aux_head(x[0]).pow(2).mean() * 1e-3
        return losses
