"""A quantized frozen base (issue 20): our trainer's ``model.quantize`` against torchtune's QLoRA, in
one invocation, on bench_peers' ~100M model, data, tokenizer, seq_len 128, global batch 4, N=2
processes (torchrun, gloo), all in bf16:

  tt-qlora-r8        torchtune 0.6.1 ``lora_finetune_distributed`` with ``lora_llama3(...,
                     quantize_base=True)`` (what its ``qlora_llama3_*`` builders are): LoRA r=8 on
                     all seven projections, their base weights in torchao NF4, dtype bf16 as in
                     torchtune's QLoRA configs; FSDP2 at its default ``fsdp_reshard_after_forward:
                     True``; run unmodified with bench/torchtune_worker.py's CPU shims
  tt-qlora-r8-ce-keep  the same at its fastest on CPU: ``fsdp_reshard_after_forward: False``
                     (what our ``parallel.reshard_after_forward: auto`` picks for this model) and
                     ``torch.nn.CrossEntropyLoss`` instead of its chunked loss, whose sequence chunks
                     are non-contiguous and send the 32000-wide output projection to a bf16 ``bmm``
                     that is ~100x slower on CPU than the one GEMM of the whole batch
  ours-pmss-kB-bf16  our trainer, PMSS at LoRA-r8's trainable budget, ``model.quantize=none``
  ours-pmss-kB-nf4   the same with ``model.quantize=nf4``
  ours-pmss-kB-int8  the same with ``model.quantize=int8``

Every run: ``model.dtype``/``dtype`` bf16 (our PMSS cores stay fp32; torchtune's LoRA factors are
bf16), AdamW, grad clip 1.0, compile and activation checkpointing off, OMP_NUM_THREADS=1 per
process. Repetitions are interleaved with their order rotated (A B C, B C A, ...); "x tt" is the
median over repetitions of (run / tt-qlora-r8 of the same repetition), "x ce-keep" the same
against tt-qlora-r8-ce-keep.

Per run: tokens/s (wall clock, median step of rank 0) and tokens per CPU-second (CPU time of a step
summed over ranks, which other jobs on a shared machine inflate much less); **frozen MiB per rank**,
the bytes of the frozen parameters each rank holds between steps, read off the live model after
step 1 (benchlib.frozen_parameter_bytes: the local FSDP2 shards, an NF4 tensor counted by its codes
and scales); peak RSS per rank and peak minus after-import RSS (benchlib).

Targets: ours-pmss-kB-nf4's frozen bytes per rank <= tt-qlora-r8's; our tokens/s >= 1.0x
tt-qlora-r8's at the same trainable budget (also shown against tt-qlora-r8-ce-keep).

    python bench/bench_quant.py --reps 3 --steps 5      # 27 min on 2 shared cores (docs/BENCHMARKS.md, "Against the peers")
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess

import benchlib
from bench_peers import LORA_RANK, run_ours, run_torchtune
from benchlib import RunResult, print_markdown

MODEL = "100m"
RUNS = ("tt-qlora", "tt-qlora-ce-keep", "ours-none", "ours-nf4", "ours-int8")


def label(run: str, k: int) -> str:
    if run.startswith("tt-"):
        return run.replace("qlora", f"qlora-r{LORA_RANK}")
    return f"ours-pmss-k{k}-{run.removeprefix('ours-').replace('none', 'bf16')}"


def one_run(run: str, k: int, paths: dict, nproc: int, steps: int, out, timeout: float) -> RunResult:
    if run.startswith("tt-"):
        tuned = run == "tt-qlora-ce-keep"
        return run_torchtune(MODEL, paths, nproc, steps, False, False, out, timeout,
                             reshard_after_forward=not tuned, qlora=True, plain_ce=tuned)
    quantize = run.removeprefix("ours-")
    return run_ours(MODEL, paths, "pmss", k, nproc, steps, False, False, out, timeout, None,
                    ("model.dtype=bfloat16", f"model.quantize={quantize}"))


def first_error(log) -> str | None:
    """The first exception line a rank printed (torchrun's own report only says that a rank failed)."""
    lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
    errors = [ln for ln in lines if re.match(r"(\[rank\d+\]: )?\w+(\.\w+)*(Error|Exception): ", ln)]
    return f"{errors[0]} (log {log})" if errors else None


def mib(values) -> str:
    return " / ".join("-" if v is None else f"{v / 2**20:.1f}" for v in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default=",".join(RUNS), help=f"any of {', '.join(RUNS)}")
    benchlib.add_run_arguments(parser, steps=5)
    args = parser.parse_args()
    runs = args.runs.split(",")
    os.environ["BENCH_FROZEN_BYTES"] = "1"  # every worker records its frozen bytes (benchlib.record_worker)
    seq_len, batch = benchlib.SHAPES[MODEL]
    k = benchlib.pmss_rank_for_budget(MODEL, LORA_RANK)
    with benchlib.workdir(args.workdir, "bench_quant_") as work:
        print(f"workdir {work}; {MODEL}, N={args.nproc}, bf16, compile off, AC off, OMP_NUM_THREADS=1; "
              f"PMSS k={k} at LoRA-r{LORA_RANK}'s budget", flush=True)
        paths = benchlib.prepare_workspace(work / "inputs", MODEL)
        results: dict[str, dict[int, RunResult]] = {label(r, k): {} for r in runs}
        failures: dict[str, list[str]] = {}
        for rep in range(args.reps):
            for run in runs[rep % len(runs):] + runs[:rep % len(runs)]:
                name = label(run, k)
                out = work / "runs" / f"{name}-rep{rep}"
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir(parents=True)
                try:
                    r = one_run(run, k, paths, args.nproc, args.steps, out, args.timeout)
                except (RuntimeError, subprocess.TimeoutExpired) as e:  # report it and go on with the others
                    failures.setdefault(name, []).append(first_error(out / "log.txt") or str(e))
                    print(f"  {out.name}: FAILED: {failures[name][-1]}", flush=True)
                    continue
                results[name][rep] = r
                print(f"  {out.name}: {r.tokens_per_s(args.skip):.0f} tok/s, {r.tokens_per_cpu_s(args.skip):.0f} "
                      f"tok/CPU-s, frozen {mib(r.frozen_bytes)} MiB, peak RSS "
                      f"{' / '.join(f'{m:.0f}' for m in r.rss_mib)} MiB, first step {r.first_step_s:.1f}s", flush=True)

        def ratio(rs: dict[int, RunResult], ref: str, f) -> float | None:
            """Median over repetitions of f(run) / f(reference run of the same repetition)."""
            base = results.get(ref, {})
            pairs = [f(r) / f(base[rep]) for rep, r in rs.items() if rep in base]
            return statistics.median(pairs) if pairs else None

        def cell(x: float | None) -> str:
            return "-" if x is None else f"{x:.2f}"

        tt, tt_ce = label("tt-qlora", k), label("tt-qlora-ce-keep", k)
        tok_s = lambda r: r.tokens_per_s(args.skip)  # noqa: E731
        tok_cpu = lambda r: r.tokens_per_cpu_s(args.skip)  # noqa: E731
        frozen = lambda r: max((b for b in r.frozen_bytes if b), default=float("nan"))  # noqa: E731
        peak = lambda r: max(r.rss_mib)  # noqa: E731
        rows = []
        for name, rs in results.items():
            if not rs:
                rows.append([name, "failed"] + ["-"] * 13)
                continue
            first = rs[min(rs)]
            rows.append([name, f"{first.extra['trainable']:,}", mib(first.frozen_bytes), cell(ratio(rs, tt, frozen)),
                         " / ".join(f"{m:.0f}" for m in first.rss_mib), cell(ratio(rs, tt, peak)),
                         " / ".join(f"{m - a:.0f}" for m, a in zip(first.rss_mib, first.rss_after_import_mib)),
                         f"{statistics.median(tok_s(r) for r in rs.values()):.0f}", cell(ratio(rs, tt, tok_s)),
                         cell(ratio(rs, tt_ce, tok_s)),
                         f"{statistics.median(tok_cpu(r) for r in rs.values()):.0f}", cell(ratio(rs, tt, tok_cpu)),
                         cell(ratio(rs, tt_ce, tok_cpu)),
                         f"{statistics.median(r.first_step_s for r in rs.values()):.1f}", str(len(rs))])
        print_markdown(["run", "trainable", "frozen MiB per rank", "x tt", "peak RSS MiB per rank", "x tt",
                        "peak - after-import RSS MiB", "tokens/s", "x tt", "x ce-keep", "tokens/CPU-s", "x tt",
                        "x ce-keep", "first step s", "reps"], rows,
                       title=f"### {MODEL} ({benchlib.parameter_count(MODEL):,} params), N={args.nproc}, bf16, "
                             f"seq_len={seq_len}, global batch={batch}, {args.steps} steps (steps {args.skip + 2}-"
                             f"{args.steps} measured), {args.reps} interleaved rep(s), medians")
        nf4 = results.get(label("ours-nf4", k), {})
        if results.get(tt) and nf4:
            r_frozen = ratio(nf4, tt, frozen)
            print(f"\ntarget: ours nf4 frozen bytes per rank <= tt QLoRA's: {r_frozen:.3f}x "
                  f"({'met' if r_frozen <= 1 else 'MISSED'})")
        for run in ("ours-none", "ours-nf4", "ours-int8"):
            rs = results.get(label(run, k), {})
            for ref in (tt, tt_ce):
                if results.get(ref) and rs:
                    r_wall, r_cpu = ratio(rs, ref, tok_s), ratio(rs, ref, tok_cpu)
                    print(f"target: {label(run, k)} >= 1.0x {ref}: tokens/s {r_wall:.2f}x "
                          f"({'met' if r_wall >= 1 else 'MISSED'}), tokens/CPU-s {r_cpu:.2f}x "
                          f"({'met' if r_cpu >= 1 else 'MISSED'})")
        for name, errors in failures.items():
            print(f"{name} FAILED in {len(errors)} of {args.reps} repetition(s): {errors[0]}")


if __name__ == "__main__":
    main()
