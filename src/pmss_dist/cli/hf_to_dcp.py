"""Convert a Hugging Face checkpoint directory into a torch.distributed.checkpoint (DCP) directory.

    pmss-hf-to-dcp --hf ckpt/Llama-2-7b-hf --out ckpt/llama2-7b-dcp

The DCP holds the base weights under torchtune parameter names (``layers.0.attn.q_proj.weight``,
q/k rows in torchtune's RoPE layout, dtypes as in the safetensors files), plus config.json and the
tokenizer files. Any number of ranks can ``dcp.load`` their FSDP2 shards from it. Runs on one
process, one tensor in memory at a time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pmss_dist.hf.load import hf_to_dcp


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Convert an HF checkpoint (config.json + model.safetensors or sharded "
                    "model-*.safetensors with model.safetensors.index.json) into a DCP directory "
                    "of torchtune-keyed base weights.",
        epilog="Architectures: Llama, Mistral, Qwen2, Gemma. Every tensor of the checkpoint must map "
               "onto the model config.json describes; the tool stops on any that does not.")
    parser.add_argument("--hf", required=True, type=Path, help="HF checkpoint directory")
    parser.add_argument("--out", required=True, type=Path, help="output DCP directory (created)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    try:
        pairs = hf_to_dcp(args.hf, args.out, progress=not args.quiet)
    except (FileNotFoundError, KeyError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"done in {time.perf_counter() - start:.1f}s: {len(pairs)} tensors in {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
