"""Score a model on GSM8K-style data (generate, compare final numbers) or multiple choice
(log-likelihood of each choice), on 1..N processes.

    pmss-eval --model runs/tiny/base_model --adapter runs/tiny/adapter \\
        --data builtin:arithmetic --out runs/tiny/eval.json --tensorboard runs/tiny/tensorboard
    torchrun --nproc_per_node 8 -m pmss_dist.cli.evaluate --model merged/ --task choice --data arc.jsonl --out arc.json

--model is an HF checkpoint directory (a base, or a merged export); --adapter a pmss_dist adapter
directory (adapter.json + adapter.safetensors) applied on top. With several processes each rank
scores a contiguous slice and the model's frozen weights are sharded with FSDP2 (--replicate
keeps a whole copy per process instead). Rank 0 writes the summary and every row's record to
--out (JSON) and the accuracies to TensorBoard (--tensorboard).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from pmss_dist.errors import ConfigError
from pmss_dist.data import examples as data_lib
from pmss_dist.data import rows as datasets
from pmss_dist.data.tokenizers import TokenizerError, load_tokenizer
from pmss_dist.eval.model import load_eval_model
from pmss_dist.eval.scoring import score_choices, score_generations, summarize
from pmss_dist.files import OutputPathError, atomic_write, check_not_over_inputs, check_output_file
from pmss_dist.console import print_main
from pmss_dist.parallel.env import DistEnv, init_distributed, shutdown
from pmss_dist.parallel.mesh import ParallelDims


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Evaluate a pmss_dist model (exact match / multiple choice).")
    p.add_argument("--model", required=True, type=Path, help="HF checkpoint directory (base or merged)")
    p.add_argument("--adapter", type=Path, help="pmss_dist adapter directory to apply on --model")
    p.add_argument("--task", choices=("gsm8k", "choice"), default="gsm8k",
                   help="gsm8k: generate and match the final number; choice: multiple choice by log-likelihood")
    p.add_argument("--data", required=True,
                   help="file or directory (.jsonl/.json/.parquet/.csv), or builtin:arithmetic")
    p.add_argument("--out", required=True, type=Path, help="JSON file for the summary and per-row records")
    p.add_argument("--tensorboard", type=Path, help="TensorBoard log directory for the accuracies")
    p.add_argument("--step", type=int, default=0, help="global step to log the accuracies at")
    p.add_argument("--format", default="auto", choices=("auto",) + datasets.FORMATS, help="row format (gsm8k task)")
    p.add_argument("--columns", nargs="*", default=[], metavar="FIELD=COLUMN",
                   help="file column names for canonical fields, e.g. question=problem answer=solution")
    p.add_argument("--prompt-template", help="prompt template (default: the format's, as in training)")
    p.add_argument("--use-chat-template", action="store_true", help="prompt through the tokenizer's chat template")
    p.add_argument("--on-bad-row", choices=("error", "skip"), default="error")
    p.add_argument("--limit", type=int, default=0, help="score only the first N rows (0: all)")
    p.add_argument("--batch-size", type=int, default=16, help="rows per forward on each process")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (each row draws from (seed, row))")
    p.add_argument("--builtin-num-samples", type=int, default=4096,
                   help="builtin:arithmetic: the training run's data.num_samples (held-out rows avoid them)")
    p.add_argument("--builtin-seed", type=int, default=0, help="builtin:arithmetic: the training run's seed")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="compute dtype (auto: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--replicate", action="store_true", help="a whole model per process instead of FSDP2 shards")
    args = p.parse_args(argv)
    if args.batch_size <= 0 or args.max_new_tokens <= 0 or args.limit < 0:
        p.error("--batch-size and --max-new-tokens must be positive, --limit >= 0")
    for item in args.columns:
        if "=" not in item:
            p.error(f"--columns {item!r}: expected FIELD=COLUMN")
    return args


def _load_rows(args, bad: datasets.BadRows) -> list[dict]:
    columns = dict(item.split("=", 1) for item in args.columns)
    if args.task == "choice":
        return datasets.load_choice_rows(args.data, columns, bad)
    if args.data == data_lib.BUILTIN_ARITHMETIC:
        rows = data_lib.arithmetic_rows(args.builtin_num_samples, args.builtin_seed, held_out=True)
        return data_lib.arithmetic_examples(rows, args.prompt_template)
    examples = datasets.load_examples(args.data, args.format, columns, args.prompt_template,
                                      args.use_chat_template, bad)
    if data_lib.is_pair(examples[0]):
        raise datasets.DataError(f"{args.data} holds preference pairs (chosen/rejected): pmss-eval generates answers to "
                                 "prompts; a dpo run's eval (data.eval_source) reports the pairs' rewards/accuracies")
    return examples


def run(args: argparse.Namespace) -> dict | None:
    """Evaluate on this process's slice; rank 0 returns (and writes) the full result. Inside an
    existing process group (a driver evaluating several tasks) it uses that group and leaves it
    up: tearing a group down and starting another on the same rendezvous store can hang."""
    owns_group = not dist.is_initialized()
    env = init_distributed()
    try:
        return _evaluate(args, env)
    finally:  # after _evaluate's frame, and the model in it, is gone: shutdown frees the groups it held
        if owns_group:
            shutdown()


def _evaluate(args: argparse.Namespace, env: DistEnv) -> dict | None:
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else (
        torch.bfloat16 if env.device.type == "cuda" else torch.float32)
    bad = datasets.BadRows(args.on_bad_row)
    rows = _load_rows(args, bad)
    if args.limit:
        rows = rows[:args.limit]
    if bad.skipped:
        print_main(f"evaluate: {args.data}: {bad.summary()}")
    tokenizer = load_tokenizer(args.model)
    mesh = None if args.replicate else ParallelDims.flat(env.world_size).build_mesh(env.device.type)
    model = load_eval_model(args.model, args.adapter, device=env.device, dtype=dtype, mesh=mesh)
    if args.task == "choice":
        template = args.prompt_template or datasets.QA_TEMPLATE
        records = score_choices(model, tokenizer, rows, batch_size=args.batch_size, prompt_template=template)
    else:
        records = score_generations(model, tokenizer, rows, batch_size=args.batch_size,
                                    max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                    top_k=args.top_k, seed=args.seed, cache_dtype=dtype)
    summary = summarize(args.task, records, rows)
    result = {"summary": summary, "model": str(args.model), "adapter": str(args.adapter) if args.adapter else None,
              "data": args.data, "world_size": env.world_size, "skipped_rows": bad.skipped, "records": records}
    if not env.is_main:
        return None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, lambda p: Path(p).write_text(json.dumps(result, indent=2)))
    if args.tensorboard is not None:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(log_dir=str(args.tensorboard)) as writer:
            for key in ("accuracy", "accuracy_norm"):
                if key in summary:
                    writer.add_scalar(f"eval/{args.task}/{key}", summary[key], args.step)
    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()}
    print_main(f"evaluate: {shown} -> {args.out}")
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        inputs = {"--model": args.model, "--adapter": args.adapter, "--data": args.data}
        check_not_over_inputs(args.out, {k: v for k, v in inputs.items() if v and v != data_lib.BUILTIN_ARITHMETIC},
                              "--out")
        check_output_file(args.out)
        run(args)
    except (ConfigError, datasets.DataError, TokenizerError, FileNotFoundError, OutputPathError) as err:
        # Every rank reads the same files and fails the same way, before any collective.
        print(f"evaluate: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
