"""A DPO step against an SFT step on the same rows (our trainer) and against TRL + peft DPO, in one
invocation, on the same model, pairs, sequence length, global batch and process count:

  ours-sft-lora      our trainer, SFT with LoRA r=8 on the pairs' rows (each pair's chosen and
                     rejected row as two samples: the same rows and tokens as a DPO step)
  ours-dpo-lora      our trainer, objective.kind=dpo, LoRA r=8 (the reference: the adapter off)
  ours-dpo-lora-pre  the same with objective.precompute_reference=true (no reference forward in
                     the step; a start-up pass over the pairs instead)
  ours-sft-pmss, ours-dpo-pmss, ours-dpo-pmss-pre   the same with PMSS at LoRA-r8's budget
  trl-dpo-lora       TRL's DPOTrainer + peft LoRA r=8, no ref_model, on accelerate's CPU DDP
                     (bench/trl_worker.py; only with --peft-python), gradient checkpointing off
                     like our runs
  trl-dpo-lora-gc    the same as TRL ships it: gradient checkpointing on (DPOConfig's default)

Our runs use a replicated base (parallel.dp_shard=1), as DDP does, unless --ours-set says otherwise.
Every row is cut to seq_len (the responses are longer), so every step holds exactly
2 x pairs x seq_len tokens in every trainer. Reported: pairs/s (wall clock, median step), pairs per
CPU-second (summed over ranks), time to first step (launch to the end of step 1: for a -pre run
the reference pass included), peak RSS per rank, each as a ratio to TRL's and to our SFT step with
the same adapter, medians over interleaved repetitions whose order rotates. For the -pre runs, the
reference pass's time from the run's log, and the epochs after which it has paid for itself:
pass time / (step-time saved x steps per epoch). fp32, AdamW, grad clip 1.0, compile and
activation checkpointing off unless a run's name says otherwise, one intra-op thread per process.

    python bench/bench_dpo.py --quick                                    # tiny, N=2, no TRL (~1 min)
    python bench/bench_dpo.py --models 100m --nprocs 2 --reps 3 --peft-python .venv-peft/bin/python

Targets (CPU, N=2, ~100M): our DPO >= 1.0x TRL's pairs/s; peak memory <= our SFT step's plus the
reference forward's activations (no reference copy of the model).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
from pathlib import Path

import benchlib
from benchlib import BENCH, REPO, RunResult, print_markdown
from bench_train import trainer_overrides
from pmss_dist.checkpoints.fingerprint import CACHE_ENV

LORA_RANK = 8
RUNS = ("ours-sft-lora", "ours-dpo-lora", "ours-dpo-lora-pre", "ours-sft-pmss", "ours-dpo-pmss", "ours-dpo-pmss-pre",
        "trl-dpo-lora", "trl-dpo-lora-gc")
PASS_LINE = re.compile(r"reference log-probs of (\d+) pairs computed in ([\d.]+)s")


def write_pairs(paths: dict, work: Path, num_pairs: int) -> dict[str, Path]:
    """The benchmark's long addition texts as pairs (rejected: every sum one off), as our
    preference file and as the same rows for SFT (question: the prompt, answer: a response)."""
    rows = json.loads(paths["data"].read_text())[:num_pairs]
    pairs, sft = work / f"pairs_{num_pairs}.jsonl", work / f"pairs_sft_{num_pairs}.jsonl"
    if not pairs.is_file():
        def wrong(text: str) -> str:
            return re.sub(r"is (\d+)\.", lambda m: f"is {int(m.group(1)) + 1}.", text)
        lines = [{"prompt": r["instruction"], "chosen": r["output"], "rejected": wrong(r["output"])} for r in rows]
        pairs.write_text("".join(json.dumps(p) + "\n" for p in lines))
        sft.write_text("".join(json.dumps({"question": p["prompt"], "answer": p[side]}) + "\n"
                               for p in lines for side in ("chosen", "rejected")))
    return {"pairs": pairs, "sft": sft}


def trl_pairs(paths: dict, pairs: Path, seq_len: int, work: Path) -> Path:
    """The pairs as our trainer tokenises them, cut to seq_len, in TRL's collator format (the
    peft venv has no pmss_dist): prompt_ids, then each side's tokens after the prompt."""
    from pmss_dist.config import DataConfig
    from pmss_dist.data import examples as data_lib
    from pmss_dist.data.tokenizers import load_tokenizer

    out = work / f"trl_{pairs.stem}_{seq_len}.json"
    if not out.is_file():
        tok = load_tokenizer(paths["ckpt"])
        cfg = DataConfig(source=str(pairs), format="preference", seq_len=seq_len)
        rows = []
        for sample in data_lib.build_dataset(cfg, tok, seed=0, pairs=True):
            sides = {}
            for side in ("chosen", "rejected"):
                tokens, labels = sample[side]["tokens"][:seq_len], sample[side]["labels"]
                start = next(t for t, label in enumerate(labels) if label != data_lib.IGNORE_INDEX) + 1
                sides[side] = (tokens[:start], tokens[start:])
            assert sides["chosen"][0] == sides["rejected"][0], "the two sides share their prompt"
            assert len(sample["chosen"]["tokens"]) >= seq_len, "every row must be longer than seq_len"
            rows.append({"prompt_ids": sides["chosen"][0], "chosen_ids": sides["chosen"][1],
                         "rejected_ids": sides["rejected"][1]})
        out.write_text(json.dumps(rows))
    return out


def run_ours(model: str, paths: dict, files: dict, run: str, nproc: int, steps: int, pairs_per_step: int,
             out: Path, timeout: float, extra: tuple[str, ...]) -> RunResult:
    seq_len, _ = benchlib.SHAPES[model]
    kind, objective = run.split("-")[2], run.split("-")[1]
    rank = LORA_RANK if kind == "lora" else benchlib.pmss_rank_for_budget(model, LORA_RANK)
    overrides = trainer_overrides(model, paths, kind, nproc, False, False, steps, out)
    rows = 2 * pairs_per_step
    if objective == "sft":
        overrides += [f"data.source={files['sft']}", "data.format=qa", "data.train_on_prompt=false",
                      f"data.batch_size={rows}", f"data.micro_batch_size={rows // nproc}"]
    else:
        overrides += [f"data.source={files['pairs']}", "data.format=preference", "data.train_on_prompt=false",
                      "objective.kind=dpo", f"data.batch_size={pairs_per_step}",
                      f"data.micro_batch_size={pairs_per_step // nproc}",
                      f"objective.precompute_reference={str(run.endswith('-pre')).lower()}"]
    overrides += [f"adapter.rank={rank}", f"adapter.alpha={rank}", "parallel.dp_shard=1", *extra]  # later keys win
    env = {"BENCH_RECORD_DIR": str(out / "records"), "OMP_NUM_THREADS": "1"}
    launched = benchlib.torchrun(nproc, BENCH / "trainer_worker.py",
                                 ["--config", str(REPO / "configs" / "tiny.yaml"), *overrides], env,
                                 out / "log.txt", timeout)
    found = PASS_LINE.search((out / "log.txt").read_text())
    return benchlib.result_from_records(out.name, benchlib.read_records(out / "records"), launched, rows * seq_len,
                                        reference_pass_s=float(found.group(2)) if found else None)


def run_trl(peft_python: str, model: str, paths: dict, tokens: Path, nproc: int, steps: int, pairs_per_step: int,
            out: Path, timeout: float, gradient_checkpointing: bool) -> RunResult:
    seq_len, _ = benchlib.SHAPES[model]
    env = {"BENCH_RECORD_DIR": str(out / "records"), "OMP_NUM_THREADS": "1"}
    cmd = [peft_python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(BENCH / "trl_worker.py"), "--model", str(paths["ckpt"]), "--pairs", str(tokens),
           "--rank", str(LORA_RANK), "--steps", str(steps), "--batch", str(pairs_per_step), "--out", str(out / "trl"),
           *(["--gradient-checkpointing"] if gradient_checkpointing else [])]
    launched = benchlib.run_command(cmd, env, out / "log.txt", timeout)
    return benchlib.result_from_records(out.name, benchlib.read_records(out / "records"), launched,
                                        2 * pairs_per_step * seq_len, reference_pass_s=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, N=2, 8 steps, no TRL")
    parser.add_argument("--models", default="100m")
    parser.add_argument("--nprocs", default="2")
    parser.add_argument("--runs", default=",".join(RUNS), help="which (trl-* need --peft-python)")
    parser.add_argument("--peft-python", default=None, help="python of the venv with transformers, peft and trl")
    parser.add_argument("--pairs-per-step", type=int, default=2, help="global batch in pairs")
    parser.add_argument("--num-pairs", type=int, default=16, help="pairs in the dataset (an epoch)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--ours-set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override for our runs (e.g. parallel.dp_shard=2 for a sharded base)")
    parser.add_argument("--workdir", default=None, help="keep inputs, runs and logs here (default: a temporary "
                        "directory, removed at the end)")
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args()
    if args.quick:
        args.models, args.nprocs, args.steps = "tiny", "2", 8
    runs = [r for r in args.runs.split(",") if not r.startswith("trl-") or args.peft_python]
    print(f"workdir: {args.workdir or 'temporary'}; every process OMP_NUM_THREADS=1; fp32; compile and AC off"
          + (f"; our runs also: {' '.join(args.ours_set)}" if args.ours_set else ""))
    with benchlib.workdir(args.workdir, "bench_dpo_") as work:
        shutil.rmtree(work / "cache", ignore_errors=True)
        os.environ[CACHE_ENV] = str(work / "cache")  # PMSS runs after the first reuse its selection
        for model in args.models.split(","):
            paths = benchlib.prepare_workspace(work / "inputs", model)
            files = write_pairs(paths, work / "inputs", args.num_pairs)
            seq_len, _ = benchlib.SHAPES[model]
            for nproc in (int(n) for n in args.nprocs.split(",")):
                results: dict[str, list[RunResult]] = {}
                for rep in range(args.reps):
                    for run in runs[rep % len(runs):] + runs[:rep % len(runs)]:
                        out = work / "runs" / f"{model}-n{nproc}-{run}-rep{rep}"
                        shutil.rmtree(out, ignore_errors=True)
                        out.mkdir(parents=True)
                        if run.startswith("trl-"):
                            tokens = trl_pairs(paths, files["pairs"], seq_len, work / "inputs")
                            r = run_trl(args.peft_python, model, paths, tokens, nproc, args.steps,
                                        args.pairs_per_step, out, args.timeout, run.endswith("-gc"))
                        else:
                            r = run_ours(model, paths, files, run, nproc, args.steps, args.pairs_per_step, out,
                                         args.timeout, tuple(args.ours_set))
                        results.setdefault(run, []).append(r)
                        print(f"  {out.name}: {pairs_per_s(r):.2f} pairs/s, first step {r.first_step_s:.1f}s, "
                              f"peak RSS {' / '.join(f'{m:.0f}' for m in r.rss_mib)} MiB", flush=True)
                report(results, model, nproc, seq_len, args)


def pairs_per_s(r: RunResult) -> float:
    return r.tokens_per_s(0) / (2 * benchlib.SHAPES[r.name.split("-")[0]][0])


def pairs_per_cpu_s(r: RunResult) -> float:
    return r.tokens_per_cpu_s(0) / (2 * benchlib.SHAPES[r.name.split("-")[0]][0])


def report(results: dict[str, list[RunResult]], model: str, nproc: int, seq_len: int, args) -> None:
    trl = results.get("trl-dpo-lora")

    def ratio(rs, base, f):  # median over repetitions of (run / base in the same repetition)
        return f"{statistics.median(f(r) / f(b) for r, b in zip(rs, base)):.2f}" if base else "-"

    rows = []
    for run, rs in results.items():
        sft = (results.get(re.sub(r"^ours-dpo-(\w+?)(-pre)?$", r"ours-sft-\1", run)) if run.startswith("ours-dpo")
               else None)
        rows.append([run, f"{statistics.median(pairs_per_s(r) for r in rs):.2f}", ratio(rs, trl, pairs_per_s),
                     ratio(rs, sft, pairs_per_s), f"{statistics.median(pairs_per_cpu_s(r) for r in rs):.2f}",
                     ratio(rs, trl, pairs_per_cpu_s), f"{statistics.median(r.first_step_s for r in rs):.1f}",
                     " / ".join(f"{statistics.median(r.rss_mib[i] for r in rs):.0f}" for i in range(nproc)),
                     ratio(rs, trl, lambda r: max(r.rss_mib)), ratio(rs, sft, lambda r: max(r.rss_mib))])
    print_markdown(["run", "pairs/s", "x trl", "x our sft", "pairs/CPU-s", "x trl", "first step s",
                    "peak RSS MiB per rank", "x trl", "x our sft"], rows,
                   title=f"### {model} ({benchlib.parameter_count(model):,} params), N={nproc}, seq_len={seq_len}, "
                         f"{args.pairs_per_step} pairs per step, {args.steps} steps (2-{args.steps} measured), "
                         f"{args.reps} rep(s)")
    steps_per_epoch = args.num_pairs // args.pairs_per_step
    for run, rs in results.items():
        if not run.endswith("-pre") or run.removesuffix("-pre") not in results:
            continue
        passes = [r.extra["reference_pass_s"] for r in rs]
        saved = statistics.median(b.tokens_per_step / b.tokens_per_s(0) - r.tokens_per_step / r.tokens_per_s(0)
                                  for r, b in zip(rs, results[run.removesuffix("-pre")]))
        pays = (f"pays for itself after {statistics.median(passes) / (saved * steps_per_epoch):.2f} epochs"
                if saved > 0 else "never pays: the step is no faster")
        print(f"{run}: reference pass over {args.num_pairs} pairs {statistics.median(passes):.1f}s, "
              f"step time saved {saved * 1e3:.0f} ms ({steps_per_epoch} steps per epoch): {pays}")


if __name__ == "__main__":
    main()
