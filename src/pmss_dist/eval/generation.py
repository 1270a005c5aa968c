"""Batched generation from a torchtune decoder, with or without a KV cache.

Prompts of different lengths are left-padded; padding is excluded by an explicit mask (never
inferred from a token id, so ``pad_id`` may be a real token) and positions start at 0 on each
prompt's first real token, so a prompt's continuation does not depend on what it is batched
with. Greedy decoding (``temperature=0``) takes the argmax; sampling uses torchtune's
``sample`` (temperature, top-k) with the exponential-race noise drawn from a generator seeded
per row by ``(seed, row_id)``: a row samples the same tokens whatever its batch, batch position
or process, and the cached and uncached paths draw the same noise.

We write the loop instead of calling ``torchtune.generation.generate`` because that one finds
padding by comparing with ``pad_id``, zeroes tokens after a stop token (0 is a real id), and
shares one noise tensor across the batch.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch
import torch.distributed as dist
from torchtune.generation import sample
from torchtune.modules.common_utils import local_kv_cache


def _masks(prompts: Sequence[Sequence[int]], total: int, pad_id: int, device) -> tuple:
    """Left-padded tokens [b, P], attention mask [b, T, T] (True = may attend) and positions [b, T]."""
    width = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    real = torch.ones(len(prompts), total, dtype=torch.bool)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        real[i, :width - len(p)] = False
    causal = torch.ones(total, total, dtype=torch.bool).tril()
    mask = causal[None] & real[:, None, :]
    mask |= torch.eye(total, dtype=torch.bool)[None]  # padding attends itself: no all-False row
    positions = (real.cumsum(-1) - 1).clamp(min=0)
    return tokens.to(device), mask.to(device), positions.to(device)


def _row_generators(seed: int, row_ids: Sequence[int]) -> list[torch.Generator]:
    # The CPU generator keeps only the low 32 bits of a seed: hash (seed, row) into them.
    seeds = [int.from_bytes(hashlib.sha256(f"{seed}/{int(r)}".encode()).digest()[:4], "little") for r in row_ids]
    return [torch.Generator().manual_seed(s) for s in seeds]


def _all_ranks_done(done: bool, device) -> bool:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return done
    flag = torch.tensor([1.0 if done else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, stop_ids: Sequence[int] = (),
             pad_id: int = 0, temperature: float = 0.0, top_k: int | None = None, seed: int = 0,
             row_ids: Sequence[int] | None = None, use_cache: bool = True,
             cache_dtype: torch.dtype | None = None, lockstep: bool = False) -> list[list[int]]:
    """New tokens for each prompt, up to (not including) its first stop token.

    ``row_ids`` name the rows for their sampling seeds (default: 0..b-1). ``lockstep``: keep
    generating until every process is done, for models sharded with FSDP (every forward is a
    collective; all ranks must make the same number)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, and no empty prompt (start it with BOS)")
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    total = width + max_new_tokens
    if total > model.max_seq_len:
        raise ValueError(f"prompt ({width} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"max_seq_len {model.max_seq_len}")
    tokens, mask, positions = _masks(prompts, total, pad_id, device)
    gens = _row_generators(seed, row_ids if row_ids is not None else range(len(prompts)))
    stops = torch.tensor(sorted(set(stop_ids)) or [-1], device=device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    out = torch.empty(len(prompts), 0, dtype=torch.long, device=device)

    def next_tokens(logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if temperature == 0:
            return logits.argmax(-1, keepdim=True)
        noise = torch.stack([torch.empty(logits.shape[-1]).exponential_(1, generator=g) for g in gens]).to(device)
        return sample(logits, temperature=temperature, top_k=top_k, q=noise).long()

    def step(cur: int) -> torch.Tensor:
        """Logits of the last position, given the sequence up to position ``cur`` (exclusive)."""
        seq = torch.cat([tokens, out], dim=1)
        if not use_cache:
            return model(seq, mask=mask[:, :cur, :cur], input_pos=positions[:, :cur])[:, -1]
        start = 0 if cur == width else cur - 1
        return model(seq[:, start:cur], mask=mask[:, start:cur, :], input_pos=positions[:, start:cur])[:, -1]

    def run() -> None:
        nonlocal out, done
        for cur in range(width, total):
            new = next_tokens(step(cur))
            out = torch.cat([out, new], dim=1)
            done |= torch.isin(new.squeeze(1), stops)
            if _all_ranks_done(bool(done.all()), device) if lockstep else bool(done.all()):
                break

    if use_cache:
        dtype = cache_dtype or next(model.parameters()).dtype
        with local_kv_cache(model, batch_size=len(prompts), device=device, dtype=dtype, decoder_max_seq_len=total):
            run()
    else:
        run()
    results = []
    for row in out.tolist():
        cut = next((i for i, t in enumerate(row) if t in set(stop_ids)), len(row))
        results.append(row[:cut])
    return results
