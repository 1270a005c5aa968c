"""Select PMSS skeletons for an HF checkpoint and write a selection file, before training.

    torchrun --nproc_per_node 8 -m pmss_dist.cli.select --hf ckpt/Llama-2-7b-hf --k 256 --out sel.json
    # then: launch/train.py ... adapter.selection_file=sel.json (same rank, method, seed, targets)

Same code as the trainer: the base is built on meta, sharded with FSDP2, each rank reads its own
rows, and whole matrices are dealt round-robin to ranks for selection (docs/SELECTION.md).

Bad input (a checkpoint that cannot be read, a --k the model cannot take, non-finite weights, an
--out that cannot be written) is one line on stderr from rank 0 and exit code 2, as for the trainer.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from pmss_dist.adapters.layers import TARGET_ALIASES, AdapterSpec, adapter_layers, assign_skeletons
from pmss_dist.adapters.selection import SelectionError, save_selection
from pmss_dist.build import build_model, sharded_meta_model
from pmss_dist.checkpoints.fingerprint import base_fingerprint
from pmss_dist.config import SELECTION_METHODS, SVD_MODES
from pmss_dist.console import launcher_rank, print_main
from pmss_dist.files import OutputPathError, check_not_over_inputs, check_output_file
from pmss_dist.hf.load import read_model_spec
from pmss_dist.models.spec import ModelSpec
from pmss_dist.parallel.env import init_distributed, shutdown
from pmss_dist.parallel.mesh import ParallelDims

EXIT_USER_ERROR = 2


class _UserError(Exception):
    """Bad input, reported in one line."""


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
        select(args)
    except _UserError as err:
        # Raised on every rank alike (the same arguments and files; selection errors are gathered),
        # so rank 0's line says it all. No barrier on the way out: a peer may be elsewhere.
        if launcher_rank() == 0:
            print(f"error: {' '.join(str(err).split())}", file=sys.stderr, flush=True)
        shutdown(meet_peers=False)
        return EXIT_USER_ERROR
    shutdown()
    return 0


def select(args: argparse.Namespace) -> None:
    try:  # before any work: the selection file never lands in, on or around the checkpoint
        check_not_over_inputs(args.out, {"the checkpoint --hf": args.hf}, "--out")
        check_output_file(args.out)
    except OutputPathError as err:
        raise _UserError(str(err)) from None
    model_spec = _read_checkpoint(args.hf, read_model_spec, args.hf)
    spec = AdapterSpec("pmss", tuple(args.targets), args.k, float(args.k))
    check_k(args.k, *_read_checkpoint(args.hf, smallest_target, model_spec, spec.targets))
    env = init_distributed()
    mesh = ParallelDims.flat(env.world_size).build_mesh(env.device.type)
    model = _read_checkpoint(args.hf, build_model, model_spec, adapter=spec, mesh=mesh, device=env.device,
                             dtype=getattr(torch, args.dtype), weights=args.hf)
    try:
        selections = assign_skeletons(model, args.method, seed=args.seed, svd=args.svd, progress=env.is_main)
    except SelectionError as err:
        raise _UserError(f"--hf {args.hf}: {err}") from None
    if env.is_main:
        shapes = {n: (m.out_features, m.in_features) for n, m in adapter_layers(model).items()}
        try:
            save_selection(args.out, selections, method=args.method, k=args.k, seed=args.seed,
                           base_fingerprint=base_fingerprint(args.hf), shapes=shapes)
        except OSError as err:
            raise _UserError(f"--out {args.out}: cannot write it ({err.strerror or err})") from None
        print_main(f"wrote {len(selections)} layers to {args.out}")


def _read_checkpoint(hf: Path, read, *args, **kwargs):
    """``read(*args, **kwargs)``, with what the checkpoint's files make it refuse (missing or
    unreadable files, config.json not JSON, lacking a field or naming an unsupported model, weights
    of the wrong shape) as one line."""
    try:
        return read(*args, **kwargs)
    except json.JSONDecodeError as err:
        raise _UserError(f"--hf {hf}: {hf / 'config.json'} is not valid JSON ({err})") from None
    except KeyError as err:  # a field the model's build reads
        raise _UserError(f"--hf {hf}: config.json has no {err}") from None
    except (OSError, ValueError) as err:  # what hf.load and models raise for the checkpoint's files
        detail = f"{err.filename}: {err.strerror}" if isinstance(err, OSError) and err.strerror else str(err)
        raise _UserError(f"--hf {hf}: {detail}") from None


def smallest_target(model_spec: ModelSpec, targets: tuple[str, ...]) -> tuple[str, int, int]:
    """``(name, d_out, d_in)`` of the targeted matrix with the smallest side, from a build on the
    meta device (no memory, no weights read)."""
    model = sharded_meta_model(model_spec, adapter=AdapterSpec("pmss", targets, 1, 1.0), mesh=None,
                               device=torch.device("cpu"), dtype=torch.float32)
    name, layer = min(adapter_layers(model).items(), key=lambda item: min(item[1].out_features, item[1].in_features))
    return name, layer.out_features, layer.in_features


def check_k(k: int, name: str, d_out: int, d_in: int) -> None:
    """PMSS picks k rows and k columns: 1 <= k <= the smallest targeted matrix's smaller side."""
    limit = min(d_out, d_in)
    if not 1 <= k <= limit:
        raise _UserError(f"--k {k} is out of range for this model: k must be in [1, {limit}] ({name} is "
                         f"{d_out}x{d_in}); choose --k in that range")


if __name__ == "__main__":
    sys.exit(main())
