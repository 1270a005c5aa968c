"""Write a Hugging Face checkpoint (a merged export, or any base of a supported family) as a GGUF
file that llama.cpp runs.

    pmss-hf-to-gguf --hf exports/merged --out model-f16.gguf --type f16

Weights in f32, f16, bf16 or q8_0 (norms and biases in f32), the tokenizer from tokenizer.json and
the chat template from tokenizer_config.json, as llama.cpp's convert_hf_to_gguf.py writes them.
``pmss-export --run RUN --gguf OUT.gguf`` does the merge and this in one command. docs/GGUF.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pmss_dist.gguf.from_hf import OUT_TYPES, convert_hf_to_gguf


def add_type_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--type", choices=list(OUT_TYPES), default="f16",
                        help="how 2-D weights are stored (default f16; q8_0 is llama.cpp's 8-bit blocks)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a Hugging Face checkpoint directory as a llama.cpp GGUF file.")
    parser.add_argument("--hf", required=True, type=Path, help="HF checkpoint directory (config.json, safetensors)")
    parser.add_argument("--out", required=True, type=Path, help="the .gguf file to write")
    add_type_argument(parser)
    parser.add_argument("--no-tokenizer", action="store_true",
                        help="write no vocabulary (llama.cpp then runs token ids only)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        convert_hf_to_gguf(args.hf, args.out, out_type=args.type, tokenizer=not args.no_tokenizer,
                           progress=lambda line: print(line, file=sys.stderr, flush=True))
    except ImportError as err:
        print(f"error: {err} (the GGUF writer needs: pip install gguf)", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"done in {time.perf_counter() - start:.1f}s: {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
