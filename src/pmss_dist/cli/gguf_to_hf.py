"""Convert a llama.cpp GGUF file (llama, qwen2, qwen3, gemma2, phi3) into a Hugging Face
checkpoint directory.

    pmss-gguf-to-hf --gguf SmolLM2-135M-Instruct.Q4_1.gguf --out ckpt/smollm2-135m

The directory (config.json naming the HF class, float32 model.safetensors, tokenizer.json,
tokenizer_config.json) can be used as ``model.path`` for training or loaded with transformers.
Needs ``pip install gguf``. Supported architectures and what is undone per architecture:
docs/GGUF.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pmss_dist.gguf.to_hf import (ARCHITECTURES, SUPPORTED_ARCHITECTURES, SUPPORTED_TENSOR_TYPES,
                                convert_gguf_to_hf)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Convert a GGUF model file into a Hugging Face checkpoint directory (weights "
                    "dequantised to float32 under HF names and layout, config.json for the "
                    "architecture's HF class, tokenizer rebuilt).",
        epilog=f"Architectures: {', '.join(f'{a} ({ARCHITECTURES[a].hf_class})' for a in SUPPORTED_ARCHITECTURES)}. "
               f"Tensor types: {', '.join(SUPPORTED_TENSOR_TYPES)}.")
    parser.add_argument("--gguf", required=True, type=Path, help="input .gguf file")
    parser.add_argument("--out", required=True, type=Path, help="output directory (created)")
    parser.add_argument("--no-tokenizer", action="store_true",
                        help="write config.json and weights only (for GGUFs whose tokenizer "
                             "type is not supported)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    try:
        convert_gguf_to_hf(args.gguf, args.out, tokenizer=not args.no_tokenizer,
                           progress=lambda line: print(line, flush=True))
    except ImportError as e:
        print(f"error: {e} (install the GGUF reader: pip install gguf)", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"done in {time.perf_counter() - start:.1f}s: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
