"""nnU-Net trainers that take this project's DDP policy, for ``nnUNetv2_train`` itself.

nnU-Net finds trainer classes by name in its own package and in the folders named by ``nnUNet_extTrainer``;
this folder is one of those. The policy comes from the environment, as overrides or a team preset:

    export nnUNet_extTrainer=$(python -m adapters nnunet-trainers)
    export ADAPTERS_NNUNET="preset=team-seg hydra.searchpath=[file:///shared/team-presets]"   # or "ddp=static"
    nnUNetv2_train 1 2d 0 -tr nnUNetTrainerPolicy -num_gpus 2

``nnUNetTrainerPolicy`` is nnUNetTrainer with the policy; ``nnUNetTrainerNoDeepSupervisionPolicy`` the variant
without deep supervision. Each keeps the name of the trainer it extends in its checkpoints and output folder
(``nnUNetTrainer__<plans>__<configuration>``), so ``nnUNetv2_predict -tr nnUNetTrainer`` loads the result.
``framework.*`` keys in ADAPTERS_NNUNET (framework.epochs, framework.deep_supervision ...) apply as in train.py.
"""

import os
import shlex

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.training.nnUNetTrainer.variants.network_architecture.nnUNetTrainerNoDeepSupervision import (
    nnUNetTrainerNoDeepSupervision,
)

from adapters.api import Policy

_policy = Policy(shlex.split(os.environ.get("ADAPTERS_NNUNET", "")), framework="nnunet")

nnUNetTrainerPolicy = _policy.nnunet_trainer(nnUNetTrainer)  # noqa: N816 - nnU-Net's naming
nnUNetTrainerNoDeepSupervisionPolicy = _policy.nnunet_trainer(nnUNetTrainerNoDeepSupervision)  # noqa: N816
