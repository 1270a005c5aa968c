"""Tokenizers, datasets and the global-batch sampler.

A sample is ``{"tokens": [...], "labels": [...]}`` with ``labels[t]`` the target of position ``t``
(``IGNORE_INDEX`` where no loss is taken). The sampler fixes the order of samples in every
*global* batch from the seed alone, and each rank takes its contiguous share: the samples of a
step, and so the loss, do not depend on the number of processes or the accumulation split.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from pmss_dist.builtin import BYTE_TOKENIZER_FILE

IGNORE_INDEX = -100
BUILTIN_ARITHMETIC = "builtin:arithmetic"


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 plus BOS/EOS/PAD: the built-in model's tokenizer."""

    def __init__(self, bos_id: int, eos_id: int, pad_id: int):
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def load_tokenizer(ckpt_dir: str | Path):
    ckpt_dir = Path(ckpt_dir)
    byte_file = ckpt_dir / BYTE_TOKENIZER_FILE
    if byte_file.is_file():
        spec = json.loads(byte_file.read_text())
        return ByteTokenizer(spec["bos_id"], spec["eos_id"], spec["pad_id"])
    raise FileNotFoundError(f"no tokenizer found in {ckpt_dir} (looked for {BYTE_TOKENIZER_FILE})")


def tokenize_pair(tokenizer, prompt: str, response: str, train_on_prompt: bool = False) -> dict:
    """BOS + prompt + response + EOS, with the loss on the response (and EOS) only by default."""
    prompt_ids = tokenizer.encode(prompt, add_bos=True, add_eos=False)
    response_ids = tokenizer.encode(response, add_bos=False, add_eos=True)
    tokens = prompt_ids + response_ids
    targets = tokens[1:] + [IGNORE_INDEX]
    n_masked = 0 if train_on_prompt else len(prompt_ids) - 1
    labels = [IGNORE_INDEX] * n_masked + targets[n_masked:]
    return {"tokens": tokens, "labels": labels}


def arithmetic_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """The built-in task: two-number addition, ``"23+45="`` -> ``"68"``."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        pairs.append((f"{a}+{b}=", str(a + b)))
    return pairs


@dataclass
class GlobalBatchSampler:
    """Yields, for each step, the dataset indices of the global batch, from a per-epoch seeded
    permutation. Its whole state is ``step``: resuming at step ``s`` yields what an uninterrupted
    run would have."""

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

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


def rank_micro_batches(global_indices: list[int], rank: int, world_size: int,
                       micro_batch_size: int) -> list[list[int]]:
    """This rank's contiguous share of a global batch, split into micro-batches."""
    per_rank = len(global_indices) // world_size
    mine = global_indices[rank * per_rank:(rank + 1) * per_rank]
    return [mine[i:i + micro_batch_size] for i in range(0, per_rank, micro_batch_size)]


def collate(samples: list[dict], seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad (or truncate) to ``seq_len``; padding takes no loss."""
    tokens = torch.full((len(samples), seq_len), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), seq_len), IGNORE_INDEX, dtype=torch.long)
    for i, s in enumerate(samples):
        n = min(len(s["tokens"]), seq_len)
        tokens[i, :n] = torch.tensor(s["tokens"][:n])
        labels[i, :n] = torch.tensor(s["labels"][:n])
    return {"tokens": tokens, "labels": labels}


def build_dataset(data_cfg, tokenizer, seed: int) -> list[dict]:
    """The training samples that ``data_cfg`` (a ``config.DataConfig``) names, tokenised."""
    if data_cfg.source != BUILTIN_ARITHMETIC:
        raise ValueError(f"data.source={data_cfg.source!r}: only {BUILTIN_ARITHMETIC!r} is available")
    pairs = arithmetic_pairs(data_cfg.num_samples, seed=seed)
    return [tokenize_pair(tokenizer, p, r, data_cfg.train_on_prompt) for p, r in pairs]
