"""PEFT-MFU and peak memory of a Llama-2-7B-shaped model on one GPU (issue 9.3).

Random weights at the real dimensions (dim 4096, 32 layers, 32 heads, MLP 11008, vocab 32000), no
checkpoint on disk: the model is built by ``pmss_dist.build.build_model``, as the trainer builds it — on the meta
device, adapters swapped in, activation checkpointing -> torch.compile per block -> FSDP2 (one
rank), ``to_empty`` on the GPU, RoPE caches, then weights drawn in place (N(0, 0.02)) instead of
loaded. bf16 frozen weights and compute, fp32 adapters, AdamW on the adapters, random token ids.

MFU counts PEFT FLOPs (``pmss_dist.train.metrics.flops_per_token`` through the trainer's own
per-model count): forward 2N + input-gradient backward 2N over the frozen matmul weights, the
adapters' work 3x, attention 12·L·T·d — no weight-gradient GEMMs, since the base is frozen.

    python bench/bench_gpu_7b.py                          # on a GPU: PMSS at LoRA-r8's budget
    python bench/bench_gpu_7b.py --adapter lora --rank 8
    OMP_NUM_THREADS=1 python bench/bench_gpu_7b.py --tiny # CPU smoke test of the same path (~1 min, mostly compilation;
                                                          # on a shared CPU, 2 OpenMP threads made steps 40x slower)

Skeleton indices are random (selection cost is not part of a training step; bench_selection.py
measures it).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from pmss_dist.adapters.layers import AdapterSpec, PMSSLinear, adapter_layers, assign_skeletons, count_parameters
from pmss_dist.build import build_model
from pmss_dist.config import ParallelConfig
from pmss_dist.models.builtin import TINY_CONFIG
from pmss_dist.parallel.env import init_distributed, shutdown
from pmss_dist.parallel.grads import trainable_parameters
from pmss_dist.train.metrics import flops_per_token as model_flops_per_token  # the trainer's own count
from pmss_dist.train.metrics import peak_flops, peak_memory_gib

from benchlib import pmss_rank_for_budget

LLAMA2_7B = {**TINY_CONFIG, "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
             "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
             "max_position_embeddings": 4096, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@torch.no_grad()
def random_init(model: torch.nn.Module, seed: int) -> None:
    """Draw every frozen weight in place, shard by shard (a DTensor's local part)."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            continue
        local = p.to_local() if hasattr(p, "to_local") else p
        if local.dim() >= 2:
            local.copy_(torch.randn(local.shape, generator=gen, device=local.device) * 0.02)
        else:
            local.fill_(1.0)  # norm scales


def random_skeletons(model, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {name: (torch.randperm(m.out_features, generator=gen)[:m.k],
                   torch.randperm(m.in_features, generator=gen)[:m.k])
            for name, m in adapter_layers(model).items() if isinstance(m, PMSSLinear)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the built-in tiny model on CPU: a smoke test")
    parser.add_argument("--adapter", choices=("pmss", "lora"), default="pmss")
    parser.add_argument("--rank", type=int, default=None, help="PMSS k / LoRA r (default: PMSS at LoRA-r8's budget, LoRA 8)")
    parser.add_argument("--seq-len", type=int, default=None, help="default 2048 (tiny 64)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default 4, tiny 4)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10, tiny 3)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    parser.add_argument("--ac", choices=("none", "full", "selective"), default="full")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    args = parser.parse_args()
    config = TINY_CONFIG if args.tiny else LLAMA2_7B
    seq_len = args.seq_len or (64 if args.tiny else 2048)
    batch = args.batch or 4
    steps = args.steps or (3 if args.tiny else 10)
    rank = args.rank or (pmss_rank_for_budget(config, 8) if args.adapter == "pmss" else 8)
    dtype = getattr(torch, args.dtype)

    env = init_distributed()
    if env.world_size != 1:
        raise SystemExit("bench_gpu_7b.py measures one GPU: run it with plain python, not torchrun")
    if env.device.type != "cuda" and not args.tiny:
        raise SystemExit("no GPU here: the 7B shape needs one; --tiny runs the same path on CPU")
    t_start = time.perf_counter()
    parallel = ParallelConfig(compile=not args.no_compile, activation_checkpointing=args.ac, reshard_after_forward=True)
    model = build_model(config, adapter=AdapterSpec(args.adapter, ALL_TARGETS, rank, float(rank)), mesh=env.mesh,
                        device=env.device, dtype=dtype, parallel=parallel, max_seq_len=seq_len)
    random_init(model, seed=0)  # no weights on disk: frozen weights drawn in place, shard by shard
    counts = count_parameters(model)
    if args.adapter == "pmss":
        assign_skeletons(model, selections=random_skeletons(model, seed=0))
    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    flops_per_token = model_flops_per_token(model, config, seq_len)
    peak = peak_flops(env.device)
    print(f"{'tiny' if args.tiny else 'Llama-2-7B'} shape: {counts['total']:,} params, {counts['trainable']:,} trainable "
          f"({args.adapter} rank {rank}); {args.dtype}, compile {not args.no_compile}, AC {args.ac}; "
          f"batch {batch} x seq {seq_len}; device {env.device}"
          f"{' (' + torch.cuda.get_device_name(env.device) + ')' if env.device.type == 'cuda' else ''}; "
          f"build {time.perf_counter() - t_start:.1f}s", flush=True)

    gen = torch.Generator(device="cpu").manual_seed(0)
    tokens = torch.randint(0, config["vocab_size"], (batch, seq_len + 1), generator=gen).to(env.device)

    def sync():
        if env.device.type == "cuda":
            torch.cuda.synchronize(env.device)

    def step() -> float:
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()  # a host sync, as the trainer's logging has

    model.train()
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        loss = step()
    sync()
    print(f"warm-up ({args.warmup} steps, compilation included): {time.perf_counter() - t0:.1f}s, loss {loss:.3f}",
          flush=True)
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(env.device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    tps = batch * seq_len / step_s
    mem = peak_memory_gib(env.device)
    mem_text = (f"{mem:.2f} GiB (torch.cuda.max_memory_allocated, timed steps)" if mem is not None else
                f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (peak RSS: CPU)")
    print(f"\n| model | adapter | trainable | dtype | compile | AC | tokens/step | step s (median of {steps}) | "
          "tokens/s | PEFT GFLOP/token | PEFT-MFU | peak memory |")
    print("|---|---|---:|---|---|---|---:|---:|---:|---:|---:|---|")
    mfu = f"{100 * tps * flops_per_token / peak:.1f}%" if peak else "n/a (no peak FLOP/s for this device)"
    print(f"| {'tiny' if args.tiny else 'Llama-2-7B shape'} | {args.adapter} k/r={rank} | {counts['trainable']:,} | "
          f"{args.dtype} | {'on' if not args.no_compile else 'off'} | {args.ac} | {batch * seq_len} | {step_s:.3f} | "
          f"{tps:,.0f} | {flops_per_token / 1e9:.3f} | {mfu} | {mem_text} |")
    if peak:
        print(f"\nPEFT-MFU target (issue 9): >= 45% -> {'met' if tps * flops_per_token / peak >= 0.45 else 'MISSED'}")
    shutdown()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
