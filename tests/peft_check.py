#!/usr/bin/env python
"""Check PEFT adapters exported by pmss_dist with stock peft + transformers, in their own venv.

    python tests/peft_check.py --base BASE_DIR --adapter PEFT_DIR --expected EXPECTED.safetensors \\
        [--adapter PEFT_DIR2 --expected EXPECTED2.safetensors ...] [--atol 1e-5] [--merged MERGED_DIR ...]
    python tests/peft_check.py --serve    (checks one after another, see `serve`)

peft refuses the torchao release torchtune needs, so this script imports neither torchtune nor
pmss_dist: tests/test_hf_export.py writes the files and runs it with the interpreter named by
PMSS_PEFT_PYTHON (a venv with torch, transformers, peft, safetensors). EXPECTED holds ``tokens``
and the ``logits`` our adapted model gave. For each adapter: every tensor in the file must be
loaded into the PEFT model as it is, and the logits of the PEFT model, unmerged and after
``merge_and_unload``, must equal the expected ones; with ``--merged`` (one per adapter), every
weight of PEFT's merged model must equal that tensor of our merged export. Exit status 0 only if
all hold.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import io
import json
import sys
import traceback

import torch
from peft import PeftModel
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def check(base: str, adapter: str, expected_file: str, atol: float, merged_dir: str | None) -> None:
    expected = load_file(expected_file)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(model, adapter).eval()
    saved = load_file(f"{adapter}/adapter_model.safetensors")
    loaded = {f"base_model.model.{k.removeprefix('base_model.model.')}": v
              for k, v in get_peft_model_state_dict(peft_model).items()}
    if set(saved) != set(loaded):
        raise AssertionError(f"{adapter}: peft loaded {sorted(set(loaded) ^ set(saved))[:4]} differently")
    for key, value in saved.items():
        torch.testing.assert_close(loaded[key].float(), value.float(), rtol=0, atol=0, msg=key)
    with torch.no_grad():
        logits = peft_model(expected["tokens"]).logits.float()
        torch.testing.assert_close(logits, expected["logits"], rtol=atol, atol=atol, msg=f"{adapter} unmerged")
        merged = peft_model.merge_and_unload()
        logits = merged(expected["tokens"]).logits.float()
        torch.testing.assert_close(logits, expected["logits"], rtol=atol, atol=atol, msg=f"{adapter} merged")
    if merged_dir is not None:
        weights = merged.state_dict()
        ours = {}
        for path in sorted(glob.glob(f"{merged_dir}/*.safetensors")):
            ours.update(load_file(path))
        if not ours or not set(ours) <= set(weights):
            raise AssertionError(f"{merged_dir}: tensors {sorted(set(ours) - set(weights))[:4]} are not in the model")
        for key, value in ours.items():  # the same sums in another order: fp32 rounding apart
            torch.testing.assert_close(weights[key], value, rtol=1e-5, atol=1e-6, msg=f"{merged_dir}: {key}")
    print(f"ok: {adapter} ({len(saved) // 2} LoRA layers)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="base HF checkpoint directory")
    parser.add_argument("--adapter", required=True, action="append", help="PEFT adapter directory (repeatable)")
    parser.add_argument("--expected", required=True, action="append",
                        help=".safetensors with 'tokens' and 'logits', one per --adapter")
    parser.add_argument("--atol", type=float, default=1e-5)
    parser.add_argument("--merged", action="append",
                        help="our merged export of the same adapter (repeatable: none, or one per --adapter)")
    args = parser.parse_args(argv)
    if len(args.adapter) != len(args.expected):
        parser.error("give one --expected per --adapter")
    if args.merged and len(args.merged) != len(args.adapter):
        parser.error("give one --merged per --adapter, or none")
    for adapter, expected, merged in zip(args.adapter, args.expected, args.merged or [None] * len(args.adapter)):
        check(args.base, adapter, expected, args.atol, merged)
    return 0


def serve() -> int:
    """Run checks until stdin ends: each line is the arguments of one (a JSON list), each answer one
    line on stdout, ``{"status": exit status, "output": what the check printed, or its error}``.
    The tests start one server (tests/conftest.py ``stock_peft``), so that torch, transformers and
    peft start up once."""
    for line in sys.stdin:
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed):
                status = main(json.loads(line))
        except SystemExit as err:  # argparse refusing the arguments
            status = err.code
        except Exception:  # a failed check: answered, and the next one runs
            status = 1
            printed.write(traceback.format_exc())
        print(json.dumps({"status": status, "output": printed.getvalue()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(serve() if sys.argv[1:] == ["--serve"] else main())
