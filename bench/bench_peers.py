"""Our trainer against its peers (issue 9), in one invocation, on the same model, data, sequence
length, global batch and process count:

  tt-lora-r8     torchtune 0.6.1 ``lora_finetune_distributed`` (FSDP2), LoRA r=8 on all seven
                 projections, run unmodified with CPU shims (bench/torchtune_worker.py)
  tt-lora-r8-keep  the same with ``fsdp_reshard_after_forward: False`` (its switch for what our
                 ``parallel.reshard_after_forward=auto`` picks on small models): like for like
  ours-lora-r8   our trainer, LoRA r=8 (same rank and same trainable parameters as tt-lora-r8)
  ours-pmss-kB   our trainer, PMSS with k at LoRA-r8's trainable-parameter budget (DEIM selection)
  ours-pmss-k8   our trainer, PMSS k=8 (same rank as tt-lora-r8)
  ours-pmss-kB-repl  ours-pmss-kB with a replicated base (parallel.dp_shard=1: no all-gather; the
                 cores' all-reduce is the only collective), against ours-pmss-kB's sharded base
  ours-lora-r8-repl  ours-lora-r8 with a replicated base: the same adapter as peft-lora-r8 on DDP
  peft-lora-r8   HF transformers + peft LoRA r=8, plain torch loop (DDP for N=2), in its own venv
                 (only with --peft-python)

Reported as ratios to tt-lora-r8 from the same invocation (tokens/s also to tt-lora-r8-keep and to
peft-lora-r8 when they ran): tokens/s (wall clock, median step), tokens per CPU-second (CPU time of a step summed over ranks: what other jobs on a shared machine do
not inflate), time to first step (launch to the end of optimizer step 1: imports, model build,
loading, skeleton selection and compilation included), peak RSS per rank, and the bytes rank 0's
collectives carry per step (benchlib.CollectiveCounter: every torch.distributed collective call,
and DDP's bucket all-reduces through its comm hook). All trainers: fp32,
AdamW, grad clip 1.0, compile and activation checkpointing off unless --compile/--ac, one
intra-op thread per process (OMP_NUM_THREADS=1), the same SentencePiece tokenizer and rows cut to
seq_len (no padding: every step is batch x seq_len tokens). Repetitions are interleaved and
rotate their order.

    python bench/bench_peers.py --quick                                  # tiny, N=2 (~1-2 min)
    python bench/bench_peers.py --models tiny --nprocs 1,2 --peft-python /tmp/peftvenv/bin/python
    python bench/bench_peers.py --models 100m --nprocs 2 --peft-python /tmp/peftvenv/bin/python
    python bench/bench_peers.py --models 100m --mesh-count      # 4 processes: 2x2 against 1x4, a count

Targets (issue 9; CPU, N=2): tokens/s >= 1.2x tt-lora-r8 at the same trainable-parameter budget
(ours-pmss-kB) and >= 1.0x at the same rank (ours-lora-r8, ours-pmss-k8); peak memory per rank
<= tt-lora-r8's. Issue 18: the replicated base (ours-pmss-kB-repl) >= 1.0x peft-lora-r8 (DDP).

``--mesh-count`` runs our trainer on 4 processes as a 2x2 mesh (parallel.dp_shard=2: the base
sharded within each pair, replicated across the pairs) and as a flat 1x4 mesh (dp_shard=4), and
counts the collective bytes per step that would cross nodes if each pair of ranks were a node:
a count, so the 2-core machine's oversubscription does not matter.

Our runs share one user cache inside the workdir (``PMSS_CACHE_DIR``), empty at the start of the
invocation: the first PMSS run selects its skeletons and caches them, later ones reuse them (as
every lr sweep or seed on one base does). Each PMSS run is marked "cold" or "cached"; after each
table, the median time to first step of the cached PMSS runs against our LoRA runs (issue 28:
<= 1.2x).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
from pathlib import Path

import yaml

import benchlib
from benchlib import BENCH, REPO, RunResult, print_markdown
from bench_train import trainer_overrides
from pmss_dist.checkpoints.fingerprint import CACHE_ENV
from pmss_dist.train.run_dir import RunDir

LORA_RANK = 8


def torchtune_config(model: str, paths: dict, nproc: int, steps: int, compile_on: bool, ac_on: bool,
                     out: Path) -> dict:
    c = benchlib.model_config(model)
    seq_len, batch = benchlib.SHAPES[model]
    return {
        "output_dir": str(out),
        "tokenizer": {"_component_": "torchtune.models.llama2.llama2_tokenizer", "path": str(paths["tokenizer"]),
                      "max_seq_len": seq_len},
        "model": {"_component_": "torchtune.models.llama3.lora_llama3",
                  "lora_attn_modules": ["q_proj", "k_proj", "v_proj", "output_proj"],
                  "apply_lora_to_mlp": True, "apply_lora_to_output": False,
                  "lora_rank": LORA_RANK, "lora_alpha": float(LORA_RANK), "lora_dropout": 0.0,
                  "vocab_size": c["vocab_size"], "num_layers": c["num_hidden_layers"],
                  "num_heads": c["num_attention_heads"], "num_kv_heads": c["num_key_value_heads"],
                  "embed_dim": c["hidden_size"], "max_seq_len": seq_len, "intermediate_dim": c["intermediate_size"],
                  "norm_eps": c["rms_norm_eps"], "rope_base": c["rope_theta"]},
        "checkpointer": {"_component_": "torchtune.training.FullModelHFCheckpointer",
                         "checkpoint_dir": str(paths["ckpt"]), "checkpoint_files": ["model.safetensors"],
                         "recipe_checkpoint": None, "output_dir": str(out), "model_type": "LLAMA3"},
        "resume_from_checkpoint": False,
        "save_adapter_weights_only": True,  # ours saves only the adapter too
        "dataset": {"_component_": "torchtune.datasets.alpaca_dataset", "source": "json",
                    "data_files": str(paths["data"]), "split": "train", "train_on_input": True, "packed": False},
        "seed": 0, "shuffle": True, "batch_size": batch // nproc,
        "optimizer": {"_component_": "torch.optim.AdamW", "lr": 3e-4, "weight_decay": 0.0},
        "lr_scheduler": {"_component_": "torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup",
                         "num_warmup_steps": 1},
        # torchtune's own configs' loss: chunked output cross-entropy.
        "loss": {"_component_": "torchtune.modules.loss.CEWithChunkedOutputLoss"},
        "epochs": 1, "max_steps_per_epoch": steps, "gradient_accumulation_steps": 1, "clip_grad_norm": 1.0,
        "compile": compile_on, "device": "cpu", "dtype": "fp32",
        "enable_activation_checkpointing": ac_on, "enable_activation_offloading": False,
        "metric_logger": {"_component_": "torchtune.training.metric_logging.DiskLogger", "log_dir": str(out / "logs")},
        "log_every_n_steps": 1, "log_peak_memory_stats": False,
        "profiler": {"_component_": "torchtune.training.setup_torch_profiler", "enabled": False},
    }


def run_torchtune(model, paths, nproc, steps, compile_on, ac_on, out: Path, timeout,
                  reshard_after_forward: bool = True, qlora: bool = False, plain_ce: bool = False) -> RunResult:
    """``qlora``: torchtune's QLoRA (``lora_llama3(..., quantize_base=True)``, as its
    ``qlora_llama3_*`` builders: the projections' base weights in NF4) in bf16, as its QLoRA configs.
    ``plain_ce``: ``torch.nn.CrossEntropyLoss`` (the recipe's unchunked path) instead of the chunked loss."""
    cfg = out / "torchtune.yaml"
    config = torchtune_config(model, paths, nproc, steps, compile_on, ac_on, out)
    config["fsdp_reshard_after_forward"] = reshard_after_forward
    if qlora:
        config["model"]["quantize_base"] = True
        config["dtype"] = "bf16"
    if plain_ce:
        config["loss"] = {"_component_": "torch.nn.CrossEntropyLoss"}
    cfg.write_text(yaml.safe_dump(config))
    env = worker_env(out, None)
    launched = benchlib.torchrun(nproc, BENCH / "torchtune_worker.py", ["--config", str(cfg)], env,
                                 out / "log.txt", timeout)
    seq_len, batch = benchlib.SHAPES[model]
    return benchlib.result_from_records(out.name, benchlib.read_records(out / "records"), launched,
                                        seq_len * batch, trainable=benchlib.lora_trainable(model, LORA_RANK))


def worker_env(out: Path, profile: str | None) -> dict:
    """The environment of a worker that records into ``out`` (and profiles, op_timer.StepProfiler)."""
    return {"BENCH_RECORD_DIR": str(out / "records"), "OMP_NUM_THREADS": "1", **({"BENCH_PROFILE": profile} if profile else {})}


def run_ours(model, paths, kind: str, rank: int, nproc, steps, compile_on, ac_on, out: Path, timeout,
             profile: str | None = None, extra: tuple[str, ...] = (), tree: Path = REPO) -> RunResult:
    """One run of our trainer from the source ``tree`` (this checkout unless bench_commits.py
    names another commit's)."""
    overrides = trainer_overrides(model, paths, "lora", nproc, compile_on, ac_on, steps, out)
    overrides += [f"adapter.kind={kind}", f"adapter.rank={rank}", f"adapter.alpha={rank}", *extra]  # later keys win
    env = worker_env(out, profile)
    launched = benchlib.torchrun(nproc, tree / "bench" / "trainer_worker.py",
                                 ["--config", str(tree / "configs" / "tiny.yaml"), *overrides], env,
                                 out / "log.txt", timeout, tree)
    seq_len, batch = benchlib.SHAPES[model]
    summary = RunDir(out).read_summary()
    selection = ("-" if kind != "pmss" else
                 "cached" if "reusing skeleton selection from the cache" in (out / "log.txt").read_text() else "cold")
    return benchlib.result_from_records(out.name, benchlib.read_records(out / "records"), launched,
                                        seq_len * batch, trainable=summary["trainable_params"], selection=selection)


def token_rows(paths: dict, seq_len: int, work: Path) -> Path:
    """The data as token ids cut to seq_len, for the PEFT worker (its venv has no pmss_dist): the
    same SentencePiece model, BOS + prompt + response as our trainer tokenises an instruction row."""
    from pmss_dist.config import DataConfig
    from pmss_dist.data import examples as data_lib
    from pmss_dist.data.tokenizers import load_tokenizer

    out = work / f"tokens_{seq_len}.json"
    if not out.is_file():
        tok = load_tokenizer(paths["ckpt"])
        cfg = DataConfig(source=str(paths["data"]), format="instruction", seq_len=seq_len, train_on_prompt=True)
        rows = [s["tokens"][:seq_len] for s in data_lib.build_dataset(cfg, tok, seed=0)]
        assert all(len(r) == seq_len for r in rows), "every row must be longer than seq_len"
        out.write_text(json.dumps(rows))
    return out


def run_peft(peft_python: str, model, paths, nproc, steps, out: Path, work: Path, timeout,
             profile: str | None = None) -> RunResult:
    seq_len, batch = benchlib.SHAPES[model]
    tokens = token_rows(paths, seq_len, work)
    env = worker_env(out, profile)
    cmd = [peft_python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(BENCH / "peft_worker.py"), "--model", str(paths["ckpt"]), "--tokens", str(tokens),
           "--rank", str(LORA_RANK), "--steps", str(steps), "--batch", str(batch)]
    launched = benchlib.run_command(cmd, env, out / "log.txt", timeout)
    return benchlib.result_from_records(out.name, benchlib.read_records(out / "records"), launched,
                                        seq_len * batch, trainable=benchlib.lora_trainable(model, LORA_RANK))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, N=2, 12 steps, no PEFT")
    parser.add_argument("--models", default="tiny,100m")
    parser.add_argument("--nprocs", default="1,2")
    parser.add_argument("--runs", default="tt-lora,tt-lora-keep,ours-lora,ours-pmss-budget,ours-pmss-rank,peft-lora",
                        help="which trainers (peft-lora needs --peft-python)")
    parser.add_argument("--peft-python", default=None,
                        help="python of a venv with torch, transformers and peft but no torchao (e.g. /tmp/peftvenv/bin/python)")
    parser.add_argument("--compile", action="store_true", help="torch.compile on, for our trainer and torchtune's")
    parser.add_argument("--ac", action="store_true", help="activation checkpointing on, for both")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (tiny 30, 100m 4)")
    parser.add_argument("--skip", type=int, default=None, help="measured steps left out as warm-up (tiny 5, 100m 0)")
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--profile", default=None, metavar="FIRST:COUNT",
                        help="profile the steps FIRST..FIRST+COUNT-1 of our trainer and HF PEFT on rank 0 (printed after the table)")
    parser.add_argument("--ours-set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override for our trainer's runs (e.g. parallel.reshard_after_forward=false); "
                             "their labels get a '+' suffix")
    parser.add_argument("--workdir", default=None, help="keep inputs, runs and logs here (default: a temporary "
                        "directory, removed at the end)")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--mesh-count", action="store_true",
                        help="instead: 4 processes, a 2x2 mesh against a flat 1x4, collective bytes per step that "
                             "would cross nodes of 2 ranks (our trainer only)")
    args = parser.parse_args()
    if args.quick:
        args.models, args.nprocs, args.steps = "tiny", "2", args.steps or 12
        args.runs = args.runs.replace(",peft-lora", "")
    with benchlib.workdir(args.workdir, "bench_peers_") as work:
        if args.mesh_count:
            mesh_count(args, work)
        else:
            run_all(args, work)


MESH_NPROC, MESH_NODE = 4, 2  # 4 processes, counted as 2 nodes of 2 ranks


def mesh_count(args, work: Path) -> None:
    """Per step, rank 0's collective bytes on 4 processes as 2x2 (HSDP) and as 1x4 (flat FSDP),
    split by whether the collective's group spans more than one pair of ranks ("nodes")."""
    rows = []
    for model in args.models.split(","):
        paths = benchlib.prepare_workspace(work / "inputs", model)
        k_budget = benchlib.pmss_rank_for_budget(model, LORA_RANK)
        steps = args.steps or 3
        for kind, rank, label in (("pmss", k_budget, f"pmss-k{k_budget}"), ("lora", LORA_RANK, f"lora-r{LORA_RANK}"),
                                  ("full", LORA_RANK, "full")):
            for mesh, shard in (("2x2", 2), ("1x4", 4)):
                out = work / "runs" / f"{model}-{label}-{mesh}"
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir(parents=True)
                extra = (*args.ours_set, f"parallel.dp_shard={shard}", "parallel.reshard_after_forward=true",
                         *(["optim.lr=1e-4"] if kind == "full" else []))
                r = run_ours(model, paths, kind, rank, MESH_NPROC, steps, args.compile, args.ac, out, args.timeout,
                             None, extra)
                cross = {k: r.collective_bytes(k, MESH_NODE, True) for k in ("all_gather", "reduce_scatter", "all_reduce")}
                within = r.collective_bytes(None, MESH_NODE, False)
                rows.append([model, label, mesh, f"{within / 1e6:.2f}", f"{sum(cross.values()) / 1e6:.3f}",
                             *(f"{cross[k] / 1e6:.3f}" for k in cross)])
                print(f"  {out.name}: within {within / 1e6:.2f} MB, across {sum(cross.values()) / 1e6:.3f} MB per step",
                      flush=True)
    print_markdown(["model", "run", "mesh", "MB/step within nodes", "MB/step across nodes", "across: all-gather",
                    "across: reduce-scatter", "across: all-reduce"], rows,
                   title=f"### collective bytes per step, rank 0, {MESH_NPROC} processes counted as "
                         f"{MESH_NPROC // MESH_NODE} nodes of {MESH_NODE} (median of steps 2-{args.steps or 3})")


def run_all(args, work: Path) -> None:
    runs = [r for r in args.runs.split(",") if r != "peft-lora" or args.peft_python]
    print(f"workdir {work}; every process OMP_NUM_THREADS=1; fp32; compile {'on' if args.compile else 'off'}; "
          f"AC {'on' if args.ac else 'off'}")
    if args.ours_set:
        print(f"our runs marked '+' use: {' '.join(args.ours_set)}")
    shutil.rmtree(work / "cache", ignore_errors=True)
    os.environ[CACHE_ENV] = str(work / "cache")  # the runs inherit it; cold at the start of the invocation
    for model in args.models.split(","):
        paths = benchlib.prepare_workspace(work / "inputs", model)
        steps = args.steps or (30 if model == "tiny" else 4)
        skip = args.skip if args.skip is not None else (5 if model == "tiny" else 0)
        seq_len, batch = benchlib.SHAPES[model]
        k_budget = benchlib.pmss_rank_for_budget(model, LORA_RANK)
        for nproc in (int(n) for n in args.nprocs.split(",")):
            results: dict[str, list[RunResult]] = {}
            for rep in range(args.reps):
                for run in runs[rep % len(runs):] + runs[:rep % len(runs)]:
                    label = {"tt-lora": f"tt-lora-r{LORA_RANK}", "tt-lora-keep": f"tt-lora-r{LORA_RANK}-keep",
                             "ours-lora": f"ours-lora-r{LORA_RANK}",
                             "ours-pmss-budget": f"ours-pmss-k{k_budget}", "ours-pmss-rank": f"ours-pmss-k{LORA_RANK}",
                             "ours-pmss-repl": f"ours-pmss-k{k_budget}-repl", "ours-lora-repl": f"ours-lora-r{LORA_RANK}-repl",
                             "peft-lora": f"peft-lora-r{LORA_RANK}"}[run]
                    if run.startswith("ours") and args.ours_set:
                        label += "+"
                    out = work / "runs" / f"{model}-n{nproc}-{label}-rep{rep}"
                    shutil.rmtree(out, ignore_errors=True)
                    out.mkdir(parents=True)
                    common = (nproc, steps, args.compile, args.ac, out, args.timeout)
                    if run in ("tt-lora", "tt-lora-keep"):
                        r = run_torchtune(model, paths, *common, reshard_after_forward=run == "tt-lora")
                    elif run == "ours-lora":
                        r = run_ours(model, paths, "lora", LORA_RANK, *common, args.profile, tuple(args.ours_set))
                    elif run == "ours-pmss-budget":
                        r = run_ours(model, paths, "pmss", k_budget, *common, args.profile, tuple(args.ours_set))
                    elif run == "ours-pmss-rank":
                        r = run_ours(model, paths, "pmss", LORA_RANK, *common, args.profile, tuple(args.ours_set))
                    elif run == "ours-pmss-repl":
                        r = run_ours(model, paths, "pmss", k_budget, *common, args.profile,
                                     (*args.ours_set, "parallel.dp_shard=1"))
                    elif run == "ours-lora-repl":
                        r = run_ours(model, paths, "lora", LORA_RANK, *common, args.profile,
                                     (*args.ours_set, "parallel.dp_shard=1"))
                    else:
                        r = run_peft(args.peft_python, model, paths, nproc, steps, out, work, args.timeout, args.profile)
                    results.setdefault(label, []).append(r)
                    if (out / "records" / "profile_rank0.txt").is_file():
                        r.extra["profile"] = (out / "records" / "profile_rank0.txt").read_text()
                    selection = r.extra.get("selection", "-")
                    print(f"  {out.name}: {r.tokens_per_s(skip):.0f} tok/s, {r.tokens_per_cpu_s(skip):.0f} tok/CPU-s, "
                          f"first step {r.first_step_s:.1f}s{'' if selection == '-' else f' ({selection} selection)'}, "
                          f"peak RSS {' / '.join(f'{m:.0f}' for m in r.rss_mib)} MiB", flush=True)
            ref = results.get(f"tt-lora-r{LORA_RANK}")
            ref_keep = results.get(f"tt-lora-r{LORA_RANK}-keep")
            ref_peft = results.get(f"peft-lora-r{LORA_RANK}")
            rows = []
            for label, rs in results.items():
                def ratio(f, base=ref):  # median over repetitions of (run / torchtune in the same repetition)
                    return f"{statistics.median(f(r) / f(t) for r, t in zip(rs, base)):.2f}" if base else "-"
                rows.append([label, f"{rs[0].extra['trainable']:,}",
                             f"{statistics.median(r.tokens_per_s(skip) for r in rs):.0f}", ratio(lambda r: r.tokens_per_s(skip)),
                             ratio(lambda r: r.tokens_per_s(skip), ref_keep),
                             ratio(lambda r: r.tokens_per_s(skip), ref_peft),
                             f"{statistics.median(r.tokens_per_cpu_s(skip) for r in rs):.0f}", ratio(lambda r: r.tokens_per_cpu_s(skip)),
                             f"{statistics.median(r.first_step_s for r in rs):.1f}", ratio(lambda r: r.first_step_s),
                             " / ".join(f"{m:.0f}" for m in rs[0].rss_mib), ratio(lambda r: max(r.rss_mib)),
                             " / ".join(f"{m - a:.0f}" for m, a in zip(rs[0].rss_mib, rs[0].rss_after_import_mib)),
                             f"{statistics.median(r.collective_bytes(skip=skip) for r in rs) / 1e6:.1f}"])
            print_markdown(["run", "trainable", "tokens/s", "x tt", "x tt-keep", "x peft", "tokens/CPU-s", "x tt",
                            "first step s", "x tt",
                            "peak RSS MiB per rank", "x tt", "peak - after-import RSS MiB", "collective MB/step (rank 0)"],
                           rows,
                           title=f"### {model} ({benchlib.parameter_count(model):,} params), N={nproc}, seq_len={seq_len}, "
                                 f"global batch={batch}, {steps} steps (steps {skip + 2}-{steps} measured), "
                                 f"{args.reps} rep(s)")
            print_first_steps(results)
            for label, rs in results.items():
                if "profile" in rs[0].extra:
                    print(f"\n#### profile of {label}, rank 0\n```\n{rs[0].extra['profile']}```")


def print_first_steps(results: dict[str, list[RunResult]]) -> None:
    """Median time to first step of each PMSS run, cold and with a cached selection, against the
    median of our LoRA runs on the same base layout."""
    for label, rs in results.items():
        if not label.startswith("ours-pmss"):
            continue
        lora_label = re.sub(r"^ours-pmss-k\d+", f"ours-lora-r{LORA_RANK}", label)  # the same base layout and set
        lora = results.get(lora_label)
        for state in ("cold", "cached"):
            times = [r.first_step_s for r in rs if r.extra.get("selection") == state]
            if not times:
                continue
            against = (f", {statistics.median(times) / statistics.median(r.first_step_s for r in lora):.2f}x "
                       f"{lora_label}'s" if lora else "")
            print(f"time to first step, {label}, {state} selection: {statistics.median(times):.1f}s "
                  f"(median of {len(times)}){against}")


if __name__ == "__main__":
    main()
