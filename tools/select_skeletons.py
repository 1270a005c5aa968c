#!/usr/bin/env python
"""Select PMSS skeletons for an HF checkpoint and write a selection file, before training.

    torchrun --nproc_per_node 8 tools/select_skeletons.py --hf ckpt/Llama-2-7b-hf --rank 256 --out sel.json
    # then: launch/train.py ... adapter.selection_file=sel.json (same rank, method, seed, targets)

Same code as the trainer: the base is built on meta, sharded with FSDP2, each rank reads its own
rows, and whole matrices are dealt round-robin to ranks for selection (docs/SELECTION.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

try:
    import pmss_dist  # noqa: F401
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from pmss_dist.adapters import TARGET_ALIASES, AdapterSpec, adapter_layers, apply_adapters, assign_skeletons
from pmss_dist.checkpoint import base_fingerprint
from pmss_dist.config import SELECTION_METHODS, SVD_MODES
from pmss_dist.dist_env import init_distributed, shutdown
from pmss_dist.hf_checkpoint import load_hf_weights, read_hf_config
from pmss_dist.models import build_model, init_rope_caches
from pmss_dist.parallelize import parallelize
from pmss_dist.selection import save_selection


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", required=True, type=Path, help="HF checkpoint directory")
    parser.add_argument("--out", required=True, type=Path, help="selection file to write (JSON)")
    parser.add_argument("--rank", required=True, type=int, help="k, as adapter.rank")
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
    with torch.device("meta"):
        model = build_model(hf_config).to(getattr(torch, args.dtype))
    apply_adapters(model, AdapterSpec("pmss", tuple(args.targets), args.rank, float(args.rank)))
    parallelize(model, env.mesh, param_dtype=getattr(torch, args.dtype), compile=False,
                activation_checkpointing="none", reshard_after_forward=True)
    model.to_empty(device=env.device)
    init_rope_caches(model, env.device)
    load_hf_weights(model, args.hf, hf_config)
    selections = assign_skeletons(model, args.method, seed=args.seed, svd=args.svd, progress=env.is_main)
    if env.is_main:
        shapes = {n: (m.out_features, m.in_features) for n, m in adapter_layers(model).items()}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        save_selection(args.out, selections, method=args.method, rank=args.rank, seed=args.seed,
                       base_fingerprint=base_fingerprint(args.hf), shapes=shapes)
        print(f"wrote {len(selections)} layers to {args.out}", file=sys.stderr)
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
