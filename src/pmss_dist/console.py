"""What a job prints, once: lines every rank would print alike come from rank 0 alone."""

from __future__ import annotations

import os
import sys

import torch.distributed as dist


def print_main(message: str) -> None:
    """Print to stderr from rank 0 only (from every process when no process group is up)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(message, file=sys.stderr, flush=True)


def launcher_rank() -> int:
    """This process's global rank from its launcher's environment (torchrun, else srun), for when
    the process group is gone or never came up."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
