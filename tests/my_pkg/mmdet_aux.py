"""A user's own MMDetection detector, registered through ``custom_imports``: RetinaNet with an auxiliary head
whose loss joins only from the ``late_from``-th training forward on (a warm-up schedule), so a short probe
before training sees the head unused. Imported only in the mmdet environment."""

from mmdet.models.detectors import RetinaNet
from mmdet.registry import MODELS
from torch import nn


@MODELS.register_module()
class RetinaNetWithLateAux(RetinaNet):
    def __init__(self, *args, late_from: int = 5, **kwargs):
        super().__init__(*args, **kwargs)
        self.aux_head = nn.Conv2d(self.neck.fpn_convs[0].conv.out_channels, 1, 1)
        self.late_from = late_from
        self.calls = 0

    def loss(self, batch_inputs, batch_data_samples):
        x = self.extract_feat(batch_inputs)
        losses = self.bbox_head.loss(x, batch_data_samples)
        self.calls += 1
        if self.calls >= self.late_from:
            losses["loss_aux"] = self.aux_head(x[0]).pow(2).mean() * 1e-3
        return losses
