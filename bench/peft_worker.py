"""One torchrun worker of the HF PEFT baseline: ``transformers`` LlamaForCausalLM loaded from the
benchmark's HF checkpoint, ``peft`` LoRA on all seven projections, a plain torch training loop
(AdamW, grad clipping at 1.0, cosine schedule) with DistributedDataParallel over gloo when N > 1 —
the usual HF PEFT + accelerate set-up without the accelerate wrapper.

It runs in its own virtual environment (peft refuses the torchao that torchtune needs), so it
imports nothing from pmss_dist: bench_peers.py hands it the token ids, already cut to seq_len.

``BENCH_PROFILE=first:count`` profiles its steps as trainer_worker.py profiles ours.

    torchrun --nproc_per_node 2 bench/peft_worker.py --model DIR --tokens tokens.json \
        --rank 8 --steps 10 --batch 16
"""

from __future__ import annotations

import json
import math
import os

import torch
import torch.distributed as dist
import transformers  # noqa: F401  (imported before record_worker: "after import" is comparable)
from peft import LoraConfig, get_peft_model

from benchlib import COUNTER, HF_PROJECTIONS, peer_worker_arguments, record_worker
from op_timer import StepProfiler


def main() -> None:
    record_worker(os.environ["BENCH_RECORD_DIR"])
    args = peer_worker_arguments("--tokens", "JSON list of token-id rows, all seq_len long",
                                 "global batch in sequences").parse_args()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=args.rank, lora_dropout=0.0,
                                             target_modules=HF_PROJECTIONS, bias="none"))
    model.train()
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    if world > 1:  # DDP's default all-reduce of each bucket, through torch.distributed (counted there)
        ddp.register_comm_hook(None, COUNTER.ddp_comm_hook())
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 2) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))
    rows = torch.tensor(json.loads(open(args.tokens).read()))
    per_rank = args.batch // world
    gen = torch.Generator().manual_seed(0)
    profiler = StepProfiler.from_env()
    for step in range(args.steps):
        batch_idx = torch.randperm(len(rows), generator=gen)[:args.batch]
        tokens = rows[batch_idx[rank * per_rank:(rank + 1) * per_rank]]
        with profiler.step(rank):
            # HF's own causal-LM loss (labels shifted, not the logits: no copy of the logits)
            loss = ddp(input_ids=tokens, labels=tokens).loss
            loss.backward()  # DDP averages the gradients over ranks
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        if rank == 0:
            print(f"step {step + 1}/{args.steps} loss {loss.item():.4f}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
