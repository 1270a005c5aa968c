"""Training throughput and peak memory per rank of our trainer (issue 3), on CPU with gloo.

For each model (tiny built-in, ~100M Llama-shaped), process count N, torch.compile on/off and
activation checkpointing (AC, ``full``) on/off, runs the real trainer (``launch/train.py`` under
torchrun, through bench/trainer_worker.py) three ways on the same data:

  frozen  the same model, no adapters, loss back-propagated to the input embeddings (one trainable
          scalar gain on the embedding output): the frozen base's forward+backward, the floor of
          any PEFT method (see trainer_worker.py)
  lora    LoRA r=8 on all seven projections
  pmss    PMSS with k at LoRA-r8's trainable-parameter budget (7·L·k² ≈ LoRA-r8's count), DEIM

and prints tokens/s and peak RSS per rank as ratios to frozen-only measured in the same
invocation. Repetitions run interleaved (frozen, lora, pmss, frozen, lora, pmss, ...; the order
rotates per repetition). Every process runs one intra-op thread (OMP_NUM_THREADS=1), so N=2
uses both cores and the CPU time of a step is not inflated by OpenMP spinning.

    python bench/bench_train.py --quick                 # tiny, N=2, compile off, AC off (~1 min)
    python bench/bench_train.py --models tiny           # tiny: N=1,2 x compile x AC
    python bench/bench_train.py --models 100m --nprocs 2 --compile off --ac off,on

The machine these numbers come from is shared: wall-clock tokens/s is reported, and beside it
tokens per CPU-second (CPU time of a step summed over ranks), which other jobs do not inflate.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
from pathlib import Path

import benchlib
from benchlib import BENCH, REPO, RunResult, print_markdown
from pmss_dist.train.run_dir import RunDir

VARIANTS = ("frozen", "lora", "pmss")


def trainer_overrides(model: str, paths: dict, variant: str, nproc: int, compile_on: bool, ac_on: bool,
                      steps: int, out: Path) -> list[str]:
    seq_len, batch = benchlib.SHAPES[model]
    if variant == "pmss":
        kind, rank = "pmss", benchlib.pmss_rank_for_budget(model, 8)
    else:  # frozen-only ignores the adapter settings (trainer_worker replaces the adapters)
        kind, rank = "lora", 8
    return [f"output_dir={out}", f"max_steps={steps}", f"model.path={paths['ckpt']}", "model.dtype=float32",
            f"adapter.kind={kind}", f"adapter.rank={rank}", f"adapter.alpha={rank}",
            f"data.source={paths['data']}", "data.format=instruction", "data.train_on_prompt=true",
            f"data.seq_len={seq_len}", f"data.batch_size={batch}", f"data.micro_batch_size={batch // nproc}",
            "log.log_every=1", "checkpoint.resume=none", "optim.warmup_steps=1", "export_merged=false",
            f"parallel.compile={str(compile_on).lower()}",
            f"parallel.activation_checkpointing={'full' if ac_on else 'none'}"]


def run_ours(model: str, paths: dict, variant: str, nproc: int, compile_on: bool, ac_on: bool, steps: int,
             work: Path, timeout: float) -> RunResult:
    """One run of our real trainer; ``variant`` is frozen, lora or pmss."""
    name = f"{model}-n{nproc}-{variant}-c{int(compile_on)}-ac{int(ac_on)}"
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = {"BENCH_RECORD_DIR": str(out / "records"), "BENCH_FROZEN_ONLY": "1" if variant == "frozen" else "0",
           "OMP_NUM_THREADS": "1"}
    args = ["--config", str(REPO / "configs" / "tiny.yaml"),
            *trainer_overrides(model, paths, variant, nproc, compile_on, ac_on, steps, out)]
    launched = benchlib.torchrun(nproc, BENCH / "trainer_worker.py", args, env, out / "log.txt", timeout)
    seq_len, batch = benchlib.SHAPES[model]
    summary = RunDir(out).read_summary()
    return benchlib.result_from_records(name, benchlib.read_records(out / "records"), launched, seq_len * batch,
                                        trainable=summary["trainable_params"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, N=2, compile off, AC off, 12 steps")
    parser.add_argument("--models", default="tiny,100m", help="comma-separated: tiny, 100m")
    parser.add_argument("--nprocs", default="1,2")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--compile", default="off,on", help="off, on or off,on")
    parser.add_argument("--ac", default="off,on", help="off, on or off,on")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (tiny 30, 100m 4)")
    parser.add_argument("--skip", type=int, default=None,
                        help="measured steps to leave out after step 1 (warm-up; default tiny 5, 100m 0)")
    parser.add_argument("--reps", type=int, default=1, help="interleaved repetitions of every configuration")
    parser.add_argument("--workdir", default=None, help="keep inputs, runs and logs here (default: a temporary "
                        "directory, removed at the end)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per run")
    args = parser.parse_args()
    if args.quick:
        args.models, args.nprocs, args.compile, args.ac = "tiny", "2", "off", "off"
        args.steps = args.steps or 12
    with benchlib.workdir(args.workdir, "bench_train_") as work:
        run_all(args, work)


def run_all(args, work: Path) -> None:
    on_off = {"off": False, "on": True}
    combos = [(on_off[c], on_off[a]) for c in args.compile.split(",") for a in args.ac.split(",")]
    variants = args.variants.split(",")
    print(f"workdir {work}; every process OMP_NUM_THREADS=1; fp32; AC = full")
    for model in args.models.split(","):
        paths = benchlib.prepare_workspace(work / "inputs", model)
        steps = args.steps or (30 if model == "tiny" else 4)
        skip = args.skip if args.skip is not None else (5 if model == "tiny" else 0)
        seq_len, batch = benchlib.SHAPES[model]
        for nproc in (int(n) for n in args.nprocs.split(",")):
            results: dict[tuple, list[RunResult]] = {}
            for rep in range(args.reps):
                for compile_on, ac_on in combos:
                    order = variants[rep % len(variants):] + variants[:rep % len(variants)]
                    for variant in order:
                        r = run_ours(model, paths, variant, nproc, compile_on, ac_on, steps, work / "runs", args.timeout)
                        results.setdefault((compile_on, ac_on, variant), []).append(r)
                        print(f"  {r.name}: {r.tokens_per_s(skip):.0f} tok/s, {r.tokens_per_cpu_s(skip):.0f} tok/CPU-s, "
                              f"first step {r.first_step_s:.1f}s, peak RSS {max(r.rss_mib):.0f} MiB", flush=True)
            rows = []
            for compile_on, ac_on in combos:
                base = results.get((compile_on, ac_on, "frozen"))
                for variant in variants:
                    runs = results[(compile_on, ac_on, variant)]
                    def ratio(f):  # median over repetitions of (variant / frozen in the same repetition)
                        return statistics.median(f(r) / f(b) for r, b in zip(runs, base)) if base else float("nan")
                    tps = statistics.median(r.tokens_per_s(skip) for r in runs)
                    tpc = statistics.median(r.tokens_per_cpu_s(skip) for r in runs)
                    rows.append([variant, "on" if compile_on else "off", "on" if ac_on else "off",
                                 f"{runs[0].extra['trainable']:,}", f"{tps:.0f}", f"{ratio(lambda r: r.tokens_per_s(skip)):.2f}",
                                 f"{tpc:.0f}", f"{ratio(lambda r: r.tokens_per_cpu_s(skip)):.2f}",
                                 f"{statistics.median(r.first_step_s for r in runs):.1f}",
                                 " / ".join(f"{m:.0f}" for m in runs[0].rss_mib), f"{ratio(lambda r: max(r.rss_mib)):.2f}"])
            print_markdown(["variant", "compile", "AC", "trainable", "tokens/s", "x frozen", "tokens/CPU-s", "x frozen",
                            "first step s", "peak RSS MiB per rank", "x frozen"], rows,
                           title=f"### {model} ({benchlib.parameter_count(model):,} params), N={nproc}, "
                                 f"seq_len={seq_len}, global batch={batch}, {steps} steps "
                                 f"(steps {skip + 2}-{steps} measured), {args.reps} rep(s)")


if __name__ == "__main__":
    main()
