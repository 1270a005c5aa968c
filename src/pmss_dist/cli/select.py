"""Select PMSS skeletons for an HF checkpoint and write a selection file, before training.

    torchrun --nproc_per_node 8 -m pmss_dist.cli.select --hf ckpt/Llama-2-7b-hf --k 256 --out sel.json
    # then: launch/train.py ... adapter.selection_file=sel.json (same rank, method, seed, targets)

Same code as the trainer: the base is built on meta, sharded with FSDP2, each rank reads its own
rows, and whole matrices are dealt round-robin to ranks for selection (docs/SELECTION.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from pmss_dist.adapters.layers import TARGET_ALIASES, AdapterSpec, adapter_layers, assign_skeletons
from pmss_dist.adapters.selection import save_selection
from pmss_dist.build import build_model
from pmss_dist.config import SELECTION_METHODS, SVD_MODES
from pmss_dist.hf.load import base_fingerprint, read_hf_config
from pmss_dist.parallel.env import init_distributed, print_main, shutdown


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", required=True, type=Path, help="HF checkpoint directory")
    parser.add_argument("--out", required=True, type=Path, help="selection file to write (JSON)")
    parser.add_argument("--k", required=True, type=int, help="PMSS k (skeleton size), as the run's adapter.rank")
    parser.add_argument("--method", default="deim", choices=SELECTION_METHODS)
    parser.add_argument("--svd", default="auto", choices=SVD_MODES)
    parser.add_argument("--seed", type=int, default=0, help="the training run's seed")
    parser.add_argument("--targets", nargs="+", default=list(TARGET_ALIASES), choices=list(TARGET_ALIASES))
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                        help="as model.dtype of the run (selection itself is float64)")
    args = parser.parse_args(argv)
    try:
        hf_config = read_hf_config(args.hf)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    env = init_distributed()
    model = build_model(hf_config, adapter=AdapterSpec("pmss", tuple(args.targets), args.k, float(args.k)),
                        mesh=env.mesh, device=env.device, dtype=getattr(torch, args.dtype), weights=args.hf)
    selections = assign_skeletons(model, args.method, seed=args.seed, svd=args.svd, progress=env.is_main)
    if env.is_main:
        shapes = {n: (m.out_features, m.in_features) for n, m in adapter_layers(model).items()}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        save_selection(args.out, selections, method=args.method, k=args.k, seed=args.seed,
                       base_fingerprint=base_fingerprint(args.hf), shapes=shapes)
        print_main(f"wrote {len(selections)} layers to {args.out}")
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
