"""The torchrun entry point: ``torchrun --nproc_per_node N launch/train.py --config X key=value ...``
(the same as ``pmss-train``; see pmss_dist.cli.train)."""

import sys

from pmss_dist.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
