"""Packing short samples into fixed-length rows, with attention kept inside each document.

A pack is ``{"tokens", "labels", "seq_lens"}``: samples laid end to end, ``seq_lens`` their
lengths. Labels need no change at the seams: a sample's last label is already ``IGNORE_INDEX``, so
no position is trained to predict the next document. At collate time each pack gets a
block-diagonal causal mask (True = may attend) and positions that restart at 0 per document, so
a packed row computes exactly what its samples would compute one by one.

Packs are built once, from a seeded shuffle of the whole dataset, before any sharding: they
depend on the seed and ``seq_len`` only, never on the world size. Their order then changes every
epoch through the sampler; their composition does not.
"""

from __future__ import annotations

import torch


def pack_samples(samples: list[dict], seq_len: int, seed: int) -> list[dict]:
    """Greedy packing in a seeded order: each sample goes into the current pack if it fits, else
    starts a new one. A sample longer than ``seq_len`` is cut to ``seq_len`` (callers warn)."""
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed)).tolist()
    packs, tokens, labels, lens = [], [], [], []
    for i in order:
        s = samples[i]
        n = min(len(s["tokens"]), seq_len)
        if lens and len(tokens) + n > seq_len:
            packs.append({"tokens": tokens, "labels": labels, "seq_lens": lens})
            tokens, labels, lens = [], [], []
        tokens.extend(s["tokens"][:n])
        labels.extend(s["labels"][:n])
        lens.append(n)
    if lens:
        packs.append({"tokens": tokens, "labels": labels, "seq_lens": lens})
    return packs


def document_mask_and_positions(seq_lens: list[int], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``mask[q, k]`` is True where query ``q`` may attend key ``k``: same document and ``k <= q``.
    The padding tail is one more document, so every row attends at least itself (an all-False
    row would make softmax NaN)."""
    lens = list(seq_lens)
    if sum(lens) < seq_len:
        lens.append(seq_len - sum(lens))
    doc = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    starts = torch.cumsum(torch.tensor([0] + lens[:-1]), 0)
    positions = torch.arange(seq_len) - torch.repeat_interleave(starts, torch.tensor(lens))
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    return causal & (doc[:, None] == doc[None, :]), positions
