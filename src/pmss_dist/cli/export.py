"""Export a trained adapter as a Hugging Face checkpoint (merged) or as a PEFT LoRA adapter.

    pmss-export --run runs/tiny --out exports/tiny-merged
    pmss-export --run runs/tiny --out exports/tiny-peft --peft
    pmss-export --adapter runs/tiny/adapter --base ckpt/llama --out exports/merged
    pmss-export --run runs/qlora --out exports/original --into-original-weights   # a quantized base's run
    pmss-export --run runs/tiny --out exports/tiny-merged --gguf exports/tiny-f16.gguf --type f16

Merged: the base checkpoint with W + s·C·U·R (or W + s·B·A) folded into every adapted weight,
in the base's file layout, index and dtypes, config and tokenizer files copied, and
``pmss_export.json`` saying what it was made from. Streams one tensor at a time from the base
files. PEFT: adapter_config.json + adapter_model.safetensors for ``PeftModel.from_pretrained(base,
out)``; keep it in its own directory. ``--gguf`` also writes the merged export as a llama.cpp
GGUF file (`pmss_dist.gguf.from_hf`, docs/GGUF.md). A full fine-tuning run (``adapter.kind: full``) has no
adapter: its newest checkpoint's weights are written in the base's layout instead, one base file
at a time.

A run on a quantized base (``model.quantize``) trained its update on the dequantized weights. Its
merged export is that model: the update merged into each adapted weight quantized and dequantized
as the run stored it (skeletons cut from that), in the base's dtype. ``--into-original-weights``
folds the update into the original weights instead, which the update was not trained with; on
SmolLM2 that cost 8-16 points of exact match (docs/HF.md).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from pmss_dist.adapters.layers import FULL
from pmss_dist.cli.hf_to_gguf import add_type_argument
from pmss_dist.files import check_not_over_inputs
from pmss_dist.gguf.from_hf import convert_hf_to_gguf
from pmss_dist.hf.export import TrainedBase, export_full, export_merged, export_peft
from pmss_dist.checkpoints.record import CheckpointError, extract_adapter, newest_valid, read_record
from pmss_dist.train.run_dir import RunDir


def run_inputs(run_dir: RunDir, scratch: Path) -> tuple[Path, Path, bool, dict]:
    """``(weights, base_dir, full, config)`` of a run. An adapter run gives its final adapter when
    it finished (summary.json is written last), else the adapter of its newest complete step
    checkpoint, extracted to ``scratch``. A full fine-tuning run gives that checkpoint itself."""
    finished = run_dir.finished()
    if finished:
        config = run_dir.read_config()
        if config["adapter"]["kind"] != FULL and run_dir.adapter.is_dir():
            return run_dir.adapter, run_dir.base_dir(config["model"]["path"]), False, config
    newest = newest_valid(run_dir.checkpoints)
    if newest is None:
        raise FileNotFoundError(f"{run_dir.root} is neither a finished run (summary.json, adapter/) nor has a "
                                "complete checkpoint under checkpoints/: nothing to export")
    config = read_record(newest).config
    if config is None:
        raise CheckpointError(f"{newest} predates configs in checkpoints: export the finished run instead")
    base_dir = run_dir.base_dir(config["model"]["path"])
    if not finished:
        print(f"{run_dir.root} has not finished: exporting its checkpoint {newest.name}", file=sys.stderr, flush=True)
    if config["adapter"]["kind"] == FULL:
        return newest, base_dir, True, config
    return extract_adapter(newest, scratch / "adapter"), base_dir, False, config


def merge_base(config: dict | None, into_original: bool, run: Path | None) -> TrainedBase | None:
    """What a merged export folds the update into: the base as the run stored it (quantized runs),
    or the original weights (``--into-original-weights``, unquantized runs, a bare ``--adapter``)."""
    as_trained = TrainedBase.of_run(config["model"]) if config is not None else None
    if into_original and as_trained is None and run is not None:
        raise ValueError(f"{run} trained on its base's original weights (model.quantize: none): its merged "
                         "export is already merged into them; export it without --into-original-weights")
    return None if into_original else as_trained


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
    parser.add_argument("--gguf", type=Path, help="also write the merged export as this llama.cpp GGUF file")
    add_type_argument(parser)
    parser.add_argument("--peft", action="store_true", help="write a PEFT LoRA adapter instead of merged weights")
    parser.add_argument("--into-original-weights", action="store_true",
                        help="a run on a quantized base (model.quantize nf4/int8): merge the update into the "
                             "original weights instead of into the base as the run stored it (the default, the "
                             "model as trained)")
    parser.add_argument("--skip-base-check", action="store_true",
                        help="merge even if the base's fingerprint differs from the one the adapter was "
                             "trained on (e.g. the base was re-saved in another dtype)")
    args = parser.parse_args(argv)
    if args.adapter is not None and args.base is None:
        parser.error("--adapter needs --base")
    if args.run is not None and args.base is not None:
        parser.error("--base goes with --adapter; a run names its own base")
    if args.gguf is not None and args.peft:
        parser.error("--gguf writes the merged model; a PEFT adapter is served on its base instead")
    if args.into_original_weights and (args.run is None or args.peft):
        parser.error("--into-original-weights needs --run (its config says how the base was stored) and merged "
                     "weights (not --peft)")

    start = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="pmss-export-"))
    try:
        inputs = {"the run": args.run} if args.run is not None else {"the adapter": args.adapter, "the base": args.base}
        check_not_over_inputs(args.out, inputs, "--out")
        if args.gguf is not None:  # the export directory is replaced whole by the next export
            check_not_over_inputs(args.gguf, {**inputs, "--out": args.out}, "--gguf")
        weights, base_dir, full, config = (run_inputs(RunDir(args.run), scratch) if args.run
                                           else (args.adapter, args.base, False, None))
        as_trained = merge_base(config, args.into_original_weights, args.run)
        print(f"{'checkpoint' if full else 'adapter'} {weights}, base {base_dir}", file=sys.stderr, flush=True)
        if full:
            if args.peft:
                raise ValueError(f"{args.run} is a full fine-tuning run (adapter.kind: full): it has no adapter "
                                 "to write as PEFT; export it without --peft")
            export_full(weights, base_dir, args.out, progress=True, check_base=not args.skip_base_check)
        elif args.peft:
            export_peft(weights, base_dir, args.out, progress=True, check_base=not args.skip_base_check)
            if as_trained is not None:
                print(f"note: this adapter was trained against {as_trained.describe()}; applied to the original "
                      "weights it gives the --into-original-weights merge, not the model as trained",
                      file=sys.stderr)
        else:
            export_merged(weights, base_dir, args.out, progress=True, check_base=not args.skip_base_check,
                          as_trained=as_trained)
        if args.gguf is not None:
            convert_hf_to_gguf(args.out, args.gguf, out_type=args.type,
                               progress=lambda line: print(line, file=sys.stderr, flush=True))
    except (FileNotFoundError, KeyError, ValueError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2  # a user's error, as the trainer's
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"done in {time.perf_counter() - start:.1f}s: {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
