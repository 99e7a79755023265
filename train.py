#!/usr/bin/env python
"""Train with one DDP policy on any supported framework.

    python train.py                                   # the built-in demo: framework=torch, 2 processes
    python train.py framework.deep_supervision=false ddp=strict   # reproduce the unused-parameters error
    python train.py framework.deep_supervision=false ddp=safe     # ... and fix it
    torchrun --nproc_per_node=2 train.py ddp=safe     # torchrun starts the ranks instead

Any key of the composed config can be overridden (see `python train.py --cfg job`).
"""

import sys

from adapters.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
