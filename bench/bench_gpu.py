"""Throughput, PEFT-MFU and peak memory on one GPU, side by side: PMSS at LoRA-r8's budget, LoRA r8
and the frozen base alone, on a SmolLM2-135M-shaped and a Llama-3.1-8B-shaped model (issue 19).

Random weights at the real shapes (no model files travel): each model is built by
``pmss_dist.build.build_model`` exactly as the trainer builds it (meta device, adapters swapped
in, activation checkpointing -> ``torch.compile(fullgraph=True)`` per block -> FSDP2 on a world of
one, ``to_empty`` on the GPU, RoPE caches), then its frozen weights are drawn in place (N(0, 0.02))
instead of loaded and the PMSS skeletons are random. bf16 frozen weights and compute, fp32
adapters, AdamW on the adapters, the trainer's own step (``train.step``: loss, gradient clipping),
random token ids.

What is measured, per (model, AC mode, method):

- tokens/s: tokens per step / median wall time of the timed steps (after warm-up steps, which
  include compilation; each step ends in a host sync, as the trainer's loss logging does);
- PEFT-MFU: tokens/s x the trainer's FLOP count per token (``pmss_dist.train.metrics.
  flops_per_token``: 4N over frozen matmul weights, the adapters' work 3x, attention) / the bf16
  matmul peak *measured on this device at start* (a few large bf16 matmuls); the same against
  the datasheet peak is recorded beside it;
- peak memory: ``torch.cuda.max_memory_allocated`` over the timed steps;
- the memory planner's prediction for the same config: no planner is wired into this bench yet,
  so it is recorded as null with that reason.

"frozen" is the base alone, forward + backward to the input (the input-gradient GEMMs every
adapter also pays), no optimizer. Blocks with nothing to train are never AC-wrapped by
``parallelize``, so it is measured once per model and is the same for every AC mode.

Then, if the budget allows, the layer ratio on the GPU: one linear layer forward+backward
(``bench_layer.build_variants``: frozen base, LoRA r8/r16, PMSS at LoRA-r8's budget and k=256),
bf16, 8192 tokens, at 4096x4096, 14336x4096 and 4096x14336 (``bench_layer.py`` itself times CPU
only), as x frozen base and x LoRA r8 (median of interleaved repetitions).

Work runs in priority order (most valuable first), each (model, AC mode) group in its own
subprocess with the rest of the time budget as its limit; every figure is appended to the JSON
(``--out``) as soon as it is measured, so a timeout still leaves what was done.

    python bench/bench_gpu.py --out runs/gpu/bench_gpu.json                 # on the GPU (~5-9 min)
    python bench/bench_gpu.py --out /tmp/b.json --tiny                      # the same path on CPU, ~1 min
    python bench/bench_gpu.py --out b.json --models llama3.1-8b --ac selective --methods pmss lora
    python bench/bench_gpu.py summarize DIR   # DIR/bench_gpu.json + DIR/cuda_tests.xml + DIR/env.json
                                              # -> DIR/gpu_check.json and DIR/summary.txt (tools/gpu_check.sh)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULT_PREFIX = "BENCH_RESULT "

# HF config.json fields of the two shapes (random weights: only the shapes matter; Llama-3.1's
# rope_scaling is left out, pmss_dist does not support it yet and it does not change the cost).
_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "rms_norm_eps": 1e-5,
          "torch_dtype": "bfloat16"}
MODELS = {
    "smollm2-135m": {**_LLAMA, "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
                     "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                     "max_position_embeddings": 8192, "rope_theta": 100000.0, "tie_word_embeddings": True,
                     "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2},
    "llama3.1-8b": {**_LLAMA, "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
                    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                    "max_position_embeddings": 131072, "rope_theta": 500000.0, "tie_word_embeddings": False,
                    "bos_token_id": 128000, "eos_token_id": 128001, "pad_token_id": 128004},
    "tiny": None,  # pmss_dist.models.builtin.TINY_CONFIG (the --tiny dry run, on CPU)
}
# (sequences per step, sequence length): the same tokens per step for every method and AC mode of
# a model. 8B: 2 x 2048 fits one 80 GB GPU even without AC (~60 GB with the base kept gathered).
SHAPES = {"smollm2-135m": (8, 2048), "llama3.1-8b": (2, 2048), "tiny": (4, 64)}
METHODS = ("pmss", "lora", "frozen")
AC_MODES = ("selective", "full", "none")
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Seconds a group needs at least to be worth starting (compile of one block included), per method.
MIN_GROUP_S = {"llama3.1-8b": 75, "smollm2-135m": 40, "tiny": 0}
LAYER_SHAPES = {"gpu": [(4096, 4096), (14336, 4096), (4096, 14336)], "tiny": [(256, 256), (688, 256), (256, 688)]}
PLANNER_NOTE = "no memory planner wired in: this bench does not call one yet, so there is no prediction to compare"


# ----------------------------------------------------------------------------------------------
# workers (one subprocess each): print RESULT_PREFIX + JSON lines


def emit(record: dict) -> None:
    print(RESULT_PREFIX + json.dumps(record), flush=True)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peak(device, tiny: bool) -> dict:
    """The device's dense bf16 matmul rate: the best of a few timed n x n x n products."""
    import torch

    n = 512 if tiny else 8192
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=gen)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=gen)
    for _ in range(3):
        a @ b
    _sync(device)
    rates = []
    for _ in range(5):
        iters = 2 if tiny else 10
        t0 = time.perf_counter()
        for _ in range(iters):
            a @ b
        _sync(device)
        rates.append(2 * n**3 * iters / (time.perf_counter() - t0))
    from pmss_dist.train.metrics import peak_flops

    datasheet = peak_flops(device)
    return {"kind": "peak", "device": device_name(device), "matmul_n": n, "bf16_flops_measured": max(rates),
            "bf16_flops_datasheet": datasheet}


def device_name(device) -> str:
    import platform

    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def model_config(name: str) -> dict:
    if name == "tiny":
        from pmss_dist.models.builtin import TINY_CONFIG

        return dict(TINY_CONFIG)
    return dict(MODELS[name])


def random_init(model, seed: int) -> None:
    """Draw every frozen weight in place, shard by shard (a DTensor's local part)."""
    import torch

    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                continue
            local = p.to_local() if hasattr(p, "to_local") else p
            if local.dim() >= 2:
                local.copy_(torch.randn(local.shape, generator=gen, device=local.device, dtype=torch.float32) * 0.02)
            else:
                local.fill_(1.0)  # norm scales


def random_skeletons(model, seed: int) -> dict:
    import torch

    from pmss_dist.adapters.layers import PMSSLinear, adapter_layers

    gen = torch.Generator().manual_seed(seed)
    return {name: (torch.randperm(m.out_features, generator=gen)[:m.k],
                   torch.randperm(m.in_features, generator=gen)[:m.k])
            for name, m in adapter_layers(model).items() if isinstance(m, PMSSLinear)}


def adapter_size(config: dict, method: str) -> int | None:
    from benchlib import pmss_rank_for_budget

    return {"pmss": pmss_rank_for_budget(config, 8), "lora": 8}.get(method)


def measure_training(env, model_name: str, ac: str, method: str, compile: bool, warmup: int, steps: int) -> dict:
    import torch

    from pmss_dist.adapters.layers import AdapterSpec, assign_skeletons, count_parameters
    from pmss_dist.build import build_model
    from pmss_dist.config import ParallelConfig
    from pmss_dist.models import model_spec
    from pmss_dist.parallel.grads import replicated_parameters, trainable_parameters
    from pmss_dist.parallel.mesh import ParallelDims
    from pmss_dist.train import step as step_lib
    from pmss_dist.train.metrics import flops_per_token

    config = model_config(model_name)
    batch, seq = SHAPES[model_name]
    size = adapter_size(config, method)
    spec = None if method == "frozen" else AdapterSpec(method, ALL_TARGETS, size, float(size))
    record = {"kind": "train", "model": model_name, "ac": "n/a (frozen blocks are not AC-wrapped)"
              if method == "frozen" else ac, "method": method, "size": size, "compile": compile,
              "dtype": "bfloat16", "batch": batch, "seq_len": seq, "tokens_per_step": batch * seq,
              "planner_prediction_gib": None, "planner_note": PLANNER_NOTE}
    t0 = time.perf_counter()
    parallel = ParallelConfig(compile=compile, activation_checkpointing=ac, reshard_after_forward="auto")
    mesh = ParallelDims.flat(env.world_size).build_mesh(env.device.type)
    model = build_model(model_spec(config), adapter=spec, mesh=mesh, device=env.device, dtype=torch.bfloat16,
                        parallel=parallel, max_seq_len=seq)
    random_init(model, seed=0)
    if method == "pmss":
        assign_skeletons(model, selections=random_skeletons(model, seed=0))
    if method == "frozen":
        # Nothing trains: let backward run to the embeddings' output, as it does under an adapter.
        model.tok_embeddings.register_forward_hook(lambda mod, inp, out: out.requires_grad_(True))
    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=1e-5) if params else None
    counts = count_parameters(model)
    record.update(trainable_params=counts["trainable"], total_params=counts["total"],
                  flops_per_token=flops_per_token(model, model_spec(config), seq), build_s=time.perf_counter() - t0)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config["vocab_size"], (batch, seq + 1), generator=gen)
    data = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:]}

    replicated = replicated_parameters(model)
    trained = step_lib.loss_units([data])

    def step() -> float:
        """The trainer's step (train.step), read every step as a log_every=1 run reads it."""
        targets = step_lib.global_targets(trained, env.device)
        loss_sum = step_lib.micro_steps(model, [data], env.device, targets)
        norm = torch.zeros((), device=env.device)
        if optimizer is not None:
            norm = step_lib.reduce_and_clip(params, replicated, 1.0)
            step_lib.update(optimizer)
        return step_lib.read([step_lib.agree(0, loss_sum, 0, targets, norm)])[0].loss

    model.train()
    t0 = time.perf_counter()
    losses = [step()]
    _sync(env.device)
    record["first_step_s"] = time.perf_counter() - t0  # compilation included
    for _ in range(warmup - 1):
        losses.append(step())
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(env.device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        losses.append(step())
        _sync(env.device)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    tps = batch * seq / step_s
    record.update(step_s_median=step_s, step_s_min=min(times), step_s_max=max(times), timed_steps=steps,
                  tokens_per_s=tps, loss_first=losses[0], loss_last=losses[-1])
    if env.device.type == "cuda":
        record.update(peak_memory_gib=torch.cuda.max_memory_allocated(env.device) / 2**30,
                      peak_reserved_gib=torch.cuda.max_memory_reserved(env.device) / 2**30,
                      memory_kind="torch.cuda.max_memory_allocated (timed steps)")
    else:
        record.update(peak_memory_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                      memory_kind="peak RSS of the process (CPU: no allocator statistics)")
    return record


def cleanup(device) -> None:
    import gc

    import torch

    gc.collect()
    torch._dynamo.reset()  # compiled graphs of the last model
    if device.type == "cuda":
        torch.cuda.empty_cache()


def worker_train(args) -> None:
    import torch

    from pmss_dist.parallel.env import init_distributed, shutdown

    env = init_distributed()
    if env.world_size != 1:
        raise SystemExit("bench_gpu.py measures one device: run it with plain python, not torchrun")
    tiny = args.model == "tiny"
    warmup, steps = (2, 3) if tiny else (3, 8)
    for method in args.methods:
        try:
            emit(measure_training(env, args.model, args.ac, method, not args.no_compile, warmup, steps))
        except Exception as err:  # an OOM (or a failure) of one config must not lose the others
            oom = isinstance(err, torch.OutOfMemoryError)
            emit({"kind": "train", "model": args.model, "ac": args.ac, "method": method,
                  "error": ("OOM: " if oom else "") + f"{type(err).__name__}: {str(err)[:400]}"})
        cleanup(env.device)
    shutdown()


def worker_peak(args) -> None:
    import torch

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    emit(measure_peak(device, args.tiny))


def worker_layers(args) -> None:
    """bench_layer's variants, on this device in bf16, timed with a device sync."""
    import torch

    from bench_layer import build_variants
    from pmss_dist.adapters.layers import LoRALinear, PMSSLinear

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    tiny = args.tiny or device.type != "cuda"
    tokens, reps, iters = (256, 3, 2) if tiny else (8192, 7, 10)
    for d_out, d_in in LAYER_SHAPES["tiny" if tiny else "gpu"]:
        variants = build_variants(d_out, d_in, kinds=("base", "lora", "pmss"), seed=0)
        for m in variants.values():
            m.to(device)
            for layer in m.modules():  # frozen weight in bf16, adapters fp32, as in training
                if hasattr(layer, "weight") and isinstance(layer.weight, torch.nn.Parameter):
                    layer.weight.data = layer.weight.data.to(torch.bfloat16)
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(tokens, d_in, generator=gen).to(device, torch.bfloat16).requires_grad_(True)
        grad_out = torch.randn(tokens, d_out, generator=gen).to(device, torch.bfloat16)

        def run(m):
            x.grad = None
            for p in m.parameters():
                p.grad = None
            m(x).backward(grad_out)

        for m in variants.values():  # warm-up
            for _ in range(3):
                run(m)
        _sync(device)
        times = {n: [] for n in variants}
        names = list(variants)
        for rep in range(reps):
            for n in names[rep % len(names):] + names[:rep % len(names)]:  # rotated, interleaved
                t0 = time.perf_counter()
                for _ in range(iters):
                    run(variants[n])
                _sync(device)
                times[n].append((time.perf_counter() - t0) / iters)
        lora = "lora_r8"
        for n, ts in times.items():
            m = variants[n]
            size = m.k if isinstance(m, PMSSLinear) else m.r if isinstance(m, LoRALinear) else None
            emit({"kind": "layer", "shape": f"{d_out}x{d_in}", "variant": n, "size": size, "tokens": tokens,
                  "dtype": "bfloat16", "device": device_name(device),
                  "trainable": sum(p.numel() for p in m.parameters() if p.requires_grad),
                  "ms_median": 1e3 * statistics.median(ts),
                  "x_base": statistics.median(t / b for t, b in zip(ts, times["base"])),
                  "x_lora_r8": statistics.median(t / b for t, b in zip(ts, times[lora]))})
        del variants
        cleanup(device)


# ----------------------------------------------------------------------------------------------
# the orchestrator


class Results:
    """bench_gpu.json, rewritten (atomically) after every figure."""

    def __init__(self, path: Path, meta: dict):
        self.path = path
        self.data = {"schema": 1, "meta": meta, "peak": None, "train": [], "layers": [], "skipped": [],
                     "planner": PLANNER_NOTE, "complete": False}
        self.write()

    def add(self, record: dict) -> None:
        kind = record.pop("kind")
        if kind == "peak":
            self.data["peak"] = record
        elif kind == "train":
            peak = (self.data["peak"] or {}).get("bf16_flops_measured")
            datasheet = (self.data["peak"] or {}).get("bf16_flops_datasheet")
            if "tokens_per_s" in record:
                work = record["tokens_per_s"] * record["flops_per_token"]
                record["peft_mfu_measured_peak"] = work / peak if peak else None
                record["peft_mfu_datasheet_peak"] = work / datasheet if datasheet else None
            self.data["train"].append(record)
        elif kind == "layer":
            self.data["layers"].append(record)
        self.write()

    def skip(self, what: str, reason: str) -> None:
        self.data["skipped"].append({"what": what, "reason": reason})
        self.write()

    def write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)


def run_worker(cmd: list[str], results: Results, timeout: float, what: str) -> None:
    """Run one worker; every RESULT line goes to ``results`` as it arrives, the rest to our stdout.
    Killed at ``timeout`` seconds, whatever it is doing (reads never block past the deadline)."""
    import selectors

    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(BENCH), str(REPO / "src"), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    pending, timed_out = b"", False

    def handle(line: str) -> None:
        if line.startswith(RESULT_PREFIX):
            record = json.loads(line[len(RESULT_PREFIX):])
            results.add(record)
            shown = {k: record.get(k) for k in ("device", "bf16_flops_measured", "model", "ac", "method", "shape", "variant", "tokens_per_s",
                                                 "peak_memory_gib", "x_base", "error") if record.get(k) is not None}
            print(f"[bench_gpu] {what}: {shown}", flush=True)
        else:
            print(line, flush=True)

    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        if not sel.select(timeout=min(left, 5.0)):
            continue
        chunk = os.read(proc.stdout.fileno(), 1 << 16)
        if not chunk:  # the worker closed its output: it has ended
            break
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            handle(line.decode(errors="replace"))
    if pending:
        handle(pending.decode(errors="replace"))
    if timed_out:
        proc.kill()
        results.skip(what, f"stopped at its time limit ({timeout:.0f} s): the rest of the group did not run")
    rc = proc.wait()
    if rc != 0 and not timed_out:
        results.skip(what, f"worker exited with code {rc} (log above)")


def plan(args) -> list[tuple[str, str, list[str]]]:
    """(model, AC mode, methods) groups, most valuable first: every model at the first AC mode
    (with the frozen base once per model), then the other AC modes, model by model."""
    groups = []
    for i, ac in enumerate(args.ac):
        for model in args.models:
            methods = [m for m in args.methods if m != "frozen" or i == 0]
            if methods:
                groups.append((model, ac, methods))
    return groups


def orchestrate(args) -> int:
    start = time.monotonic()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        args.models = ["tiny"]
    meta = {"command": " ".join(sys.argv), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "tiny": args.tiny,
            "budget_s": args.budget_s, "compile": not args.no_compile, "shapes": {m: SHAPES[m] for m in args.models}}
    results = Results(out, meta)
    me = [sys.executable, str(Path(__file__).resolve())]
    tiny = ["--tiny"] if args.tiny else []

    def left() -> float:
        return args.budget_s - (time.monotonic() - start)

    run_worker(me + ["worker-peak", *tiny], results, min(120, max(left(), 1)), "peak")
    for model, ac, methods in plan(args):
        what = f"{model} AC={ac} {','.join(methods)}"
        need = MIN_GROUP_S[model] * len(methods)
        if left() < need:
            results.skip(what, f"time budget: {left():.0f} s left, the group needs about {need} s")
            continue
        cmd = me + ["worker-train", "--model", model, "--ac", ac, "--methods", *methods]
        if args.no_compile:
            cmd.append("--no-compile")
        run_worker(cmd, results, left(), what)
    if args.layers:
        need = 0 if args.tiny else 45
        if left() < need:
            results.skip("layers", f"time budget: {left():.0f} s left, needs about {need} s")
        else:
            run_worker(me + ["worker-layers", *tiny], results, left(), "layers")
    results.data["complete"] = not results.data["skipped"]
    results.data["meta"]["wall_s"] = time.monotonic() - start
    results.write()
    print(f"[bench_gpu] wrote {out} ({len(results.data['train'])} training configs, {len(results.data['layers'])} "
          f"layer rows, {len(results.data['skipped'])} skipped) in {time.monotonic() - start:.0f} s", flush=True)
    return 0


# ----------------------------------------------------------------------------------------------
# summary: tools/gpu_check.sh's JSON of all figures and its one-screen report


def read_junit(path: Path) -> dict:
    import xml.etree.ElementTree as ET

    if not path.is_file():
        return {"ran": False, "cases": []}
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (node.get("message") or node.text or "")[:300]
                break
        cases.append({"name": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "time_s": float(case.get("time") or 0), "message": message})
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
    return {"ran": True, "counts": counts, "cases": cases}


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def summarize(directory: Path) -> int:
    env = json.loads((directory / "env.json").read_text()) if (directory / "env.json").is_file() else {}
    bench = json.loads((directory / "bench_gpu.json").read_text()) if (directory / "bench_gpu.json").is_file() else None
    tests = read_junit(directory / "cuda_tests.xml")
    report = {"schema": 1, "env": env, "cuda_tests": tests, "bench": bench,
              "written": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    (directory / "gpu_check.json").write_text(json.dumps(report, indent=1))

    lines = [f"gpu_check {report['written']}: {env.get('device', '?')}, torch {env.get('torch', '?')}, "
             f"CUDA {env.get('cuda', '-')}, Python {env.get('python', '?')}"]
    if tests["ran"]:
        c = tests["counts"]
        lines.append(f"CUDA tests: {c['passed']} passed, {c['failed']} failed, {c['error']} errors, {c['skipped']} skipped")
        for case in tests["cases"]:
            if case["outcome"] in ("failed", "error"):
                lines.append(f"  {case['outcome'].upper()} {case['name']}: {case['message'][:150]}")
        skipped = {case["message"] for case in tests["cases"] if case["outcome"] == "skipped"}
        lines += [f"  skipped: {m[:150]}" for m in sorted(skipped)[:3]]
    else:
        lines.append("CUDA tests: did not run")
    if bench is None:
        lines.append("bench: did not run")
    else:
        peak = bench.get("peak") or {}
        lines.append(f"bf16 matmul peak, measured: {_fmt(peak.get('bf16_flops_measured', None) and peak['bf16_flops_measured'] / 1e12, '.0f')} "
                     f"TFLOP/s (n={peak.get('matmul_n')}; datasheet "
                     f"{_fmt(peak.get('bf16_flops_datasheet') and peak['bf16_flops_datasheet'] / 1e12, '.0f')})")
        lines.append(f"{'model':<13} {'AC':<9} {'method':<11} {'tok/s':>9} {'MFU':>6} {'GiB':>6} {'1st step s':>10}")
        for r in bench.get("train", []):
            ac = r.get("ac", "")
            ac = "-" if ac.startswith("n/a") else ac
            method = f"{r['method']}{'' if r.get('size') is None else r['size']}"
            if "error" in r:
                lines.append(f"{r['model']:<13} {ac:<9} {method:<11} {r['error'][:45]}")
                continue
            lines.append(f"{r['model']:<13} {ac:<9} {method:<11} {_fmt(r.get('tokens_per_s'), ',.0f'):>9} "
                         f"{_fmt(r.get('peft_mfu_measured_peak') and 100 * r['peft_mfu_measured_peak'], '.1f'):>5}% "
                         f"{_fmt(r.get('peak_memory_gib'), '.2f'):>6} {_fmt(r.get('first_step_s'), '.1f'):>10}")
        layers = bench.get("layers", [])
        if layers:
            lines.append("layer fwd+bwd, x frozen base / x LoRA r8: " + "; ".join(
                f"{r['shape']} {r['variant']} {r['x_base']:.3f}/{r['x_lora_r8']:.3f}"
                for r in layers if r["variant"].startswith("pmss")))
        for s in bench.get("skipped", []):
            lines.append(f"skipped: {s['what']}: {s['reason']}")
        lines.append(f"memory planner: {bench.get('planner')}")
    text = "\n".join(lines) + "\n"
    (directory / "summary.txt").write_text(text)
    print(text, end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "summarize":
        return summarize(Path(argv[1]))
    if argv and argv[0].startswith("worker-"):
        p = argparse.ArgumentParser()
        p.add_argument("--tiny", action="store_true")
        p.add_argument("--model", choices=list(MODELS))
        p.add_argument("--ac", choices=AC_MODES)
        p.add_argument("--methods", nargs="+", choices=METHODS)
        p.add_argument("--no-compile", action="store_true")
        args = p.parse_args(argv[1:])
        {"worker-peak": worker_peak, "worker-train": worker_train, "worker-layers": worker_layers}[argv[0]](args)
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the JSON of every figure, rewritten as each is measured")
    p.add_argument("--tiny", action="store_true", help="the built-in tiny model on CPU: the same path, ~1 min")
    p.add_argument("--models", nargs="+", default=["llama3.1-8b", "smollm2-135m"], choices=[m for m in MODELS if m != "tiny"])
    p.add_argument("--ac", nargs="+", default=list(AC_MODES), choices=AC_MODES, help="in priority order")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--budget-s", type=float, default=540.0, help="stop starting work after this many seconds")
    p.add_argument("--no-layers", dest="layers", action="store_false", help="skip the layer ratios")
    p.add_argument("--no-compile", action="store_true")
    return orchestrate(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
