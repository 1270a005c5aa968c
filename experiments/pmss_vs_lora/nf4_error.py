#!/usr/bin/env python
"""NF4's relative error ||Q(W) - W|| / ||W|| on a checkpoint's adapted projections, against its
error on Gaussian weights of the same shape and standard deviation (seeded): does NF4 cost a
model more than its error on generic weights would (docs/RESULTS.md, the NF4 section)?

  python experiments/pmss_vs_lora/nf4_error.py runs/smollm2/base

Q is the trainer's own NF4 round trip (`adapters.quantize.as_stored`: blocks of 64,
double-quantized scales, whole tensor at once), in fp32. One process, one weight in memory at a time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from pmss_dist.adapters.quantize import as_stored

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def nf4_relative_error(weight: torch.Tensor) -> float:
    return ((as_stored("nf4", weight, torch.float32) - weight).norm() / weight.norm()).item()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="HF checkpoint directory (*.safetensors)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    model, gaussian = [], []
    for path in sorted(args.checkpoint.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            for key in sorted(k for k in f.keys() if k.rsplit(".", 2)[-2] in PROJECTIONS):
                weight = f.get_tensor(key).float()
                model.append(nf4_relative_error(weight))
                gaussian.append(nf4_relative_error(torch.randn_like(weight) * weight.std()))
    if not model:
        print(f"{args.checkpoint}: no {'/'.join(PROJECTIONS)} weights in *.safetensors", file=sys.stderr)
        return 2
    for name, errors in (("the checkpoint's weights", model), ("Gaussian, same shapes and std", gaussian)):
        print(f"{name}: NF4 relative error mean {statistics.mean(errors):.2%}, max {max(errors):.2%} "
              f"({len(errors)} weights)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
