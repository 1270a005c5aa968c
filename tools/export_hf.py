#!/usr/bin/env python
"""Export a trained adapter as a Hugging Face checkpoint (merged) or as a PEFT LoRA adapter.

    python tools/export_hf.py --run runs/tiny --out exports/tiny-merged
    python tools/export_hf.py --run runs/tiny --out exports/tiny-peft --peft
    python tools/export_hf.py --adapter runs/tiny/adapter --base ckpt/llama --out exports/merged

Merged: the base checkpoint with W + s·C·U·R (or W + s·B·A) folded into every adapted weight,
in the base's file layout, index and dtypes, config and tokenizer files copied. Streams one
tensor at a time from the base files. PEFT: adapter_config.json + adapter_model.safetensors
for ``PeftModel.from_pretrained(base, out)``; keep it in its own directory. A full fine-tuning
run (``adapter.kind: full``) has no adapter: its newest checkpoint's weights are written in the
base's layout instead, one base file at a time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

try:
    import pmss_dist  # noqa: F401
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from pmss_dist.adapters import FULL
from pmss_dist.checkpoint import CheckpointError, CheckpointManager, extract_adapter, verify
from pmss_dist.hf_export import export_full, export_merged, export_peft

BUILTIN_TINY = "builtin:tiny"  # train.py writes that base to <run>/base_model


def _base_dir(run_dir: Path, model_path: str) -> Path:
    return run_dir / "base_model" if model_path == BUILTIN_TINY else Path(model_path)


def run_inputs(run_dir: Path, scratch: Path) -> tuple[Path, Path, bool]:
    """``(weights, base_dir, full)`` of a run. An adapter run gives its final adapter when it
    finished (summary.json is written last), else the adapter of its newest complete step
    checkpoint, extracted to ``scratch``. A full fine-tuning run gives that checkpoint itself."""
    config_path, adapter_dir = run_dir / "config.json", run_dir / "adapter"
    finished = (run_dir / "summary.json").is_file() and config_path.is_file()
    if finished:
        try:
            config = json.loads(config_path.read_text())
            model_path, kind = config["model"]["path"], config["adapter"]["kind"]
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{config_path} has no model.path or adapter.kind: not a pmss_dist run config "
                             f"({err})") from err
        if kind != FULL and adapter_dir.is_dir():
            return adapter_dir, _base_dir(run_dir, model_path), False
    newest = CheckpointManager(run_dir / "checkpoints", keep_last=1, rank=0).newest_valid()
    if newest is None:
        raise FileNotFoundError(f"{run_dir} is neither a finished run (summary.json, adapter/) nor has a "
                                "complete checkpoint under checkpoints/: nothing to export")
    config = verify(newest)["extra"].get("config")
    if config is None:
        raise CheckpointError(f"{newest} predates configs in checkpoints: export the finished run instead")
    base_dir = _base_dir(run_dir, config["model"]["path"])
    if not finished:
        print(f"{run_dir} has not finished: exporting its checkpoint {newest.name}", file=sys.stderr, flush=True)
    if config["adapter"]["kind"] == FULL:
        return newest, base_dir, True
    return extract_adapter(newest, scratch / "adapter"), base_dir, False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Export a pmss_dist adapter (PMSS or LoRA) as a merged Hugging Face checkpoint, "
                    "or with --peft as a PEFT LoRA adapter.",
        epilog="Either --run, or both --adapter and --base. Any adapter tensor that cannot be mapped "
               "onto an HF weight stops the export; nothing is dropped.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", type=Path, help="a run's output_dir: its final adapter, or its newest "
                        "complete step checkpoint if it has not finished")
    source.add_argument("--adapter", type=Path, help="adapter directory (adapter.safetensors + adapter.json)")
    parser.add_argument("--base", type=Path, help="base HF checkpoint directory (with --adapter)")
    parser.add_argument("--out", required=True, type=Path, help="output directory (created)")
    parser.add_argument("--peft", action="store_true", help="write a PEFT LoRA adapter instead of merged weights")
    parser.add_argument("--skip-base-check", action="store_true",
                        help="merge even if the base's fingerprint differs from the one the adapter was "
                             "trained on (e.g. the base was re-saved in another dtype)")
    args = parser.parse_args(argv)
    if args.adapter is not None and args.base is None:
        parser.error("--adapter needs --base")
    if args.run is not None and args.base is not None:
        parser.error("--base goes with --adapter; a run names its own base")

    start = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="pmss-export-"))
    try:
        weights, base_dir, full = run_inputs(args.run, scratch) if args.run else (args.adapter, args.base, False)
        print(f"{'checkpoint' if full else 'adapter'} {weights}, base {base_dir}", file=sys.stderr, flush=True)
        if full:
            if args.peft:
                raise ValueError(f"{args.run} is a full fine-tuning run (adapter.kind: full): it has no adapter "
                                 "to write as PEFT; export it without --peft")
            export_full(weights, base_dir, args.out, progress=True, check_base=not args.skip_base_check)
        elif args.peft:
            export_peft(weights, base_dir, args.out, progress=True, check_base=not args.skip_base_check)
        else:
            export_merged(weights, base_dir, args.out, progress=True, check_base=not args.skip_base_check)
    except (FileNotFoundError, KeyError, ValueError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"done in {time.perf_counter() - start:.1f}s: {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
