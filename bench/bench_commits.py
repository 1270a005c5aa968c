"""Our trainer at this checkout against itself at another commit, side by side: did a change make
any configuration slower?

``--rev`` is exported (``git archive``) into the workdir; every configuration below then runs
from both source trees, each with its own ``bench/trainer_worker.py``, ``configs/tiny.yaml`` and
``src/``, on the same model, data and shapes as bench_peers.py (~100M Llama-shaped, seq_len 128,
global batch 4, N=2, gloo, OMP_NUM_THREADS=1, compile and AC off unless the configuration says):

  pmss        PMSS at LoRA-r8's trainable budget, sharded base (the default)
  pmss-repl   the same, replicated base (parallel.dp_shard=1)
  pmss-k8     PMSS k=8 (LoRA r8's rank)
  lora        LoRA r8, sharded base
  lora-repl   LoRA r8, replicated base
  full        full fine-tuning (optim.lr=1e-4)
  pmss-ac     pmss with activation checkpointing (full)
  pmss-bf16   pmss, model.dtype=bfloat16
  pmss-nf4    pmss-bf16 with model.quantize=nf4
  pmss-int8   pmss-bf16 with model.quantize=int8
  pmss-compile  pmss with torch.compile (not in the default list: minutes of compiling per run)

Repetitions are interleaved: within a repetition every configuration runs from both trees back
to back, the trees' order alternating, the configurations' order rotating. Printed per
configuration: tokens/s, tokens per CPU-second and time to first step of each tree (medians), and
"x rev", the median over repetitions of (this tree / the other tree in the same repetition).
Each tree keeps its own user cache (``PMSS_CACHE_DIR``), empty at the start: a tree that caches
skeleton selections reuses them after its first PMSS run, as a user's second run does. Beside
the runs, /proc/loadavg is read before each one and its range printed.

    python bench/bench_commits.py --rev 2df2a24 --reps 3
    python bench/bench_commits.py --rev HEAD~1 --models tiny --configs pmss,lora --reps 2   # ~2 min
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
from pathlib import Path

import benchlib
from bench_peers import LORA_RANK, run_ours
from benchlib import REPO, RunResult, print_markdown
from pmss_dist.checkpoints.fingerprint import CACHE_ENV

BF16 = ("model.dtype=bfloat16",)
# name: (adapter kind, rank: "budget" or a number, extra overrides, compile, AC)
CONFIGS = {
    "pmss": ("pmss", "budget", (), False, False),
    "pmss-repl": ("pmss", "budget", ("parallel.dp_shard=1",), False, False),
    "pmss-k8": ("pmss", LORA_RANK, (), False, False),
    "lora": ("lora", LORA_RANK, (), False, False),
    "lora-repl": ("lora", LORA_RANK, ("parallel.dp_shard=1",), False, False),
    "full": ("full", LORA_RANK, ("optim.lr=1e-4",), False, False),
    "pmss-ac": ("pmss", "budget", (), False, True),
    "pmss-bf16": ("pmss", "budget", BF16, False, False),
    "pmss-nf4": ("pmss", "budget", (*BF16, "model.quantize=nf4"), False, False),
    "pmss-int8": ("pmss", "budget", (*BF16, "model.quantize=int8"), False, False),
    "pmss-compile": ("pmss", "budget", (), True, False),
}
DEFAULT = [name for name in CONFIGS if name != "pmss-compile"]


def export_tree(rev: str, into: Path) -> str:
    """``rev``'s files under ``into``; returns its short hash."""
    sha = subprocess.run(["git", "rev-parse", "--short", rev], cwd=REPO, check=True, capture_output=True,
                         text=True).stdout.strip()
    shutil.rmtree(into, ignore_errors=True)
    into.mkdir(parents=True)
    archive = subprocess.Popen(["git", "archive", sha], cwd=REPO, stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(into)], stdin=archive.stdout, check=True)
    if archive.wait() != 0:
        raise SystemExit(f"git archive {sha} failed")
    return sha


def load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rev", required=True, help="the commit to compare against (anything git rev-parse reads)")
    parser.add_argument("--configs", default=",".join(DEFAULT), help=f"any of {', '.join(CONFIGS)}")
    parser.add_argument("--models", default="100m", help="tiny or 100m")
    benchlib.add_run_arguments(parser, steps=6)
    args = parser.parse_args()
    configs = args.configs.split(",")
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown configuration(s) {', '.join(unknown)}; known: {', '.join(CONFIGS)}")
    with benchlib.workdir(args.workdir, "bench_commits_") as work:
        sha = export_tree(args.rev, work / "rev")
        trees = {"this tree": REPO, sha: work / "rev"}
        caches = {name: work / f"cache-{i}" for i, name in enumerate(trees)}
        for cache in caches.values():
            shutil.rmtree(cache, ignore_errors=True)
        print(f"workdir {work}; this tree ({REPO}) against {sha}; N={args.nproc}, OMP_NUM_THREADS=1", flush=True)
        for model in args.models.split(","):
            run_model(args, model, configs, trees, caches, work)


def run_model(args, model: str, configs: list[str], trees: dict[str, Path], caches: dict[str, Path],
              work: Path) -> None:
    paths = benchlib.prepare_workspace(work / "inputs", model)
    k_budget = benchlib.pmss_rank_for_budget(model, LORA_RANK)
    results: dict[tuple[str, str], dict[int, RunResult]] = {}
    loads = []
    names = list(trees)
    for rep in range(args.reps):
        for config in configs[rep % len(configs):] + configs[:rep % len(configs)]:
            kind, rank, extra, compile_on, ac_on = CONFIGS[config]
            rank = k_budget if rank == "budget" else rank
            for tree_name in (names if rep % 2 == 0 else names[::-1]):
                out = work / "runs" / f"{model}-{config}-{tree_name.replace(' ', '_')}-rep{rep}"
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir(parents=True)
                loads.append(load_average())
                os.environ[CACHE_ENV] = str(caches[tree_name])  # the run inherits it
                r = run_ours(model, paths, kind, rank, args.nproc, args.steps, compile_on, ac_on, out, args.timeout,
                             None, extra, trees[tree_name])
                results.setdefault((config, tree_name), {})[rep] = r
                print(f"  {out.name}: {r.tokens_per_s(args.skip):.0f} tok/s, {r.tokens_per_cpu_s(args.skip):.0f} "
                      f"tok/CPU-s, first step {r.first_step_s:.1f}s (load {loads[-1]:.1f})", flush=True)
    this, rev = names

    def ratio(config: str, f) -> str:
        ours, theirs = results[(config, this)], results[(config, rev)]
        return f"{statistics.median(f(ours[i]) / f(theirs[i]) for i in ours if i in theirs):.3f}"

    def median(config: str, tree_name: str, f) -> str:
        return f"{statistics.median(f(r) for r in results[(config, tree_name)].values()):.1f}"

    tok_s = lambda r: r.tokens_per_s(args.skip)  # noqa: E731
    tok_cpu = lambda r: r.tokens_per_cpu_s(args.skip)  # noqa: E731
    first = lambda r: r.first_step_s  # noqa: E731
    rows = [[config, median(config, this, tok_s), median(config, rev, tok_s), ratio(config, tok_s),
             median(config, this, tok_cpu), median(config, rev, tok_cpu), ratio(config, tok_cpu),
             median(config, this, first), median(config, rev, first), ratio(config, first)]
            for config in configs]
    seq_len, batch = benchlib.SHAPES[model]
    print_markdown(["configuration", "tokens/s", f"tokens/s {rev}", f"x {rev}", "tokens/CPU-s",
                    f"tokens/CPU-s {rev}", f"x {rev}", "first step s", f"first step s {rev}", f"x {rev}"], rows,
                   title=f"### {model} ({benchlib.parameter_count(model):,} params), N={args.nproc}, "
                         f"seq_len={seq_len}, global batch={batch}, {args.steps} steps (steps {args.skip + 2}-"
                         f"{args.steps} measured), {args.reps} interleaved rep(s), medians; this tree against {rev}")
    print(f"load average before each run: {min(loads):.1f}-{max(loads):.1f}")


if __name__ == "__main__":
    main()
