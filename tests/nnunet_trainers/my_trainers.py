"""A team's own nnU-Net trainer, as users write them: a subclass of nnUNetTrainer in their own code.

nnU-Net finds it by name through nnUNet_extTrainer=<this folder>; train.py also takes its dotted path
(framework.trainer=my_trainers.nnUNetTrainerTeamShort, with this folder on PYTHONPATH).
"""

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainerTeamShort(nnUNetTrainer):  # noqa: N801 - nnU-Net's naming
    """Deep supervision off and a short schedule, set in __init__ as nnU-Net's own variants do."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # fmt: skip
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.enable_deep_supervision = False
        self.num_epochs = 1
        self.num_iterations_per_epoch = 2
        self.num_val_iterations_per_epoch = 1
