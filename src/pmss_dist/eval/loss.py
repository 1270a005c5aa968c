"""The token loss: one definition for the training step and the held-out eval loss."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pmss_dist.data.examples import IGNORE_INDEX

# The keys a packed batch adds: per-document attention masks and positions that restart at 0.
PACKED_KEYS = ("mask", "input_pos")


def token_loss_sum(model, batch: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed fp32 cross-entropy over the trained tokens of ``batch`` (a ``collate`` output), and
    the number of those tokens. Sums, not means, so that a loss divided by a global count does not
    depend on how the global batch is split over ranks and micro-batches."""
    packed = {k: batch[k].to(device) for k in PACKED_KEYS if k in batch}
    logits = model(batch["tokens"].to(device), **packed)
    labels = batch["labels"].to(device)
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    return loss, (labels != IGNORE_INDEX).sum()


@torch.no_grad()
def evaluate_loss(model, batches: list[dict], device) -> float:
    """Mean token cross-entropy over ``batches`` (from ``eval_micro_batches``) summed over all
    ranks: every rank must call it with the same number of batches."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    try:
        for batch in batches:
            loss, count = token_loss_sum(model, batch, device)
            totals[0] += loss.double()
            totals[1] += count
    finally:
        model.train(was_training)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(totals)
    if totals[1] == 0:
        raise ValueError("the eval batches hold no trained tokens: nothing to evaluate")
    return float(totals[0] / totals[1])
