"""Batches: the global-batch sampler, each rank's micro-batches, and collation to tensors.

A preference pair is one sample of two rows: ``data.micro_batch_size`` counts pairs, and a
micro-batch of n pairs is 2n rows (`collate_samples`).

The sampler fixes the order of samples in every *global* batch from the seed alone, and each rank
takes its contiguous share: the samples of a step, and so the loss, do not depend on the number
of processes or the accumulation split. A packed sample (with ``seq_lens``, see ``packing``) gets
a per-document ``mask`` [b, s, s] and restarting ``input_pos`` [b, s] in its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pmss_dist.data.examples import IGNORE_INDEX
from pmss_dist.data.packing import document_mask_and_positions


@dataclass
class GlobalBatchSampler:
    """Yields, for each step, the dataset indices of the global batch, from a per-epoch seeded
    permutation. Its position is ``step``: resuming at step ``s`` yields what an uninterrupted
    run would have. The state also records what the order was made from, so a resume on other
    data or another batch size is refused instead of silently seeing different batches."""

    num_samples: int
    global_batch: int
    seed: int
    step: int = 0

    def __post_init__(self):
        if self.num_samples < self.global_batch:
            raise ValueError(f"dataset has {self.num_samples} samples, fewer than one global batch "
                             f"({self.global_batch}): lower data.batch_size or add data")
        self._epoch, self._perm = -1, None

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch  # the ragged tail of an epoch is dropped

    def next_batch(self) -> list[int]:
        epoch, pos = divmod(self.step, self.steps_per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.num_samples, generator=gen).tolist()
        self.step += 1
        return self._perm[pos * self.global_batch:(pos + 1) * self.global_batch]

    def peek_batch(self) -> list[int]:
        """The global batch `next_batch` will return, without moving on."""
        step = self.step
        try:
            return self.next_batch()
        finally:
            self.step = step

    def state_dict(self) -> dict:
        return {"step": self.step, "num_samples": self.num_samples, "global_batch": self.global_batch,
                "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        for key in ("num_samples", "global_batch", "seed"):
            if key in state and int(state[key]) != getattr(self, key):
                raise ValueError(f"the checkpoint's data order was made with {key}={state[key]}, this run has "
                                 f"{getattr(self, key)}: resuming would not continue the same batches "
                                 "(use the original data and data.batch_size, or checkpoint.resume=none)")
        self.step = int(state["step"])


def rank_micro_batches(global_indices: list[int], rank: int, world_size: int,
                       micro_batch_size: int) -> list[list[int]]:
    """This rank's contiguous share of a global batch, split into micro-batches."""
    per_rank = len(global_indices) // world_size
    mine = global_indices[rank * per_rank:(rank + 1) * per_rank]
    return [mine[i:i + micro_batch_size] for i in range(0, per_rank, micro_batch_size)]


def collate(samples: list[dict], seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad (or truncate) to ``seq_len``; padding takes no loss. Packed samples (with
    ``seq_lens``) also get their per-document ``mask`` and restarting ``input_pos``."""
    tokens = torch.full((len(samples), seq_len), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), seq_len), IGNORE_INDEX, dtype=torch.long)
    for i, s in enumerate(samples):
        n = min(len(s["tokens"]), seq_len)
        tokens[i, :n] = torch.tensor(s["tokens"][:n])
        labels[i, :n] = torch.tensor(s["labels"][:n])
    batch = {"tokens": tokens, "labels": labels}
    if any("seq_lens" in s for s in samples):
        masks, positions = zip(*(document_mask_and_positions(s.get("seq_lens", [min(len(s["tokens"]), seq_len)]),
                                                             seq_len) for s in samples))
        batch["mask"], batch["input_pos"] = torch.stack(masks), torch.stack(positions)
    return batch


def collate_samples(samples: list[dict], seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """`collate` for samples of either kind: preference pairs (``{"chosen", "rejected"}``, see
    `data.examples.tokenize_preference`) become the chosen rows, then the rejected rows."""
    if samples and "chosen" in samples[0]:
        samples = [s["chosen"] for s in samples] + [s["rejected"] for s in samples]
    return collate(samples, seq_len, pad_id)


def eval_micro_batches(samples: list[dict], rank: int, world_size: int, micro_batch_size: int,
                       seq_len: int, pad_id: int, max_samples: int = 0) -> list[dict]:
    """This rank's eval batches over the first ``max_samples`` samples (0: all), which are the same
    at any world size: the set is cut into rounds of ``world_size x micro_batch_size`` samples, each
    rank its contiguous share of a round. Every rank gets the same number of batches, because
    sharded models run collectives in every forward; the last round is filled with rows that take
    no loss."""
    if max_samples:
        samples = samples[:max_samples]
    per_round = world_size * micro_batch_size
    empty = {"tokens": [pad_id], "labels": [IGNORE_INDEX]}
    if samples and "chosen" in samples[0]:
        empty = {"chosen": empty, "rejected": empty}
    batches = []
    for start in range(rank * micro_batch_size, -(-len(samples) // per_round) * per_round, per_round):
        rows = samples[start:start + micro_batch_size]
        batches.append(collate_samples(rows + [empty] * (micro_batch_size - len(rows)), seq_len, pad_id))
    return batches
