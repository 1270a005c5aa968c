"""The preference loss (DPO, IPO): one definition for the training step and the held-out eval.

A batch of n pairs (`data.batches.collate_samples`) holds the n chosen rows, then the n rejected
rows. A row's score is the summed log-probability of its trained tokens (the response and its
end-of-turn marker). The reference model is the same model with its adapters off
(`adapters.layers.adapters_off`): the base the run started from, bit for bit, with no copy of it
in memory. A pair with no trained token on one side (``data.seq_len`` cut it off) takes no loss
and is not counted.

The formulas and metric names are TRL's ``DPOTrainer``'s: ``sigmoid`` is
``-log σ(β·Δ)`` (with label smoothing ε: ``-(1-ε)·log σ(β·Δ) - ε·log σ(-β·Δ)``, conservative DPO),
``ipo`` is ``(Δ̄ - 1/(2β))²`` on per-token averages, where Δ is the chosen log-ratio (policy
over reference) minus the rejected one; a side's reward is ``β`` times its log-ratio.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pmss_dist.adapters.layers import adapters_off
from pmss_dist.data.batches import eval_micro_batches
from pmss_dist.data.examples import IGNORE_INDEX

# The per-pair means a step reports besides the loss, in this order (TRL's names).
PREFERENCE_STATS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen", "logps/rejected")


@dataclass(frozen=True)
class PreferenceLoss:
    """``objective.loss``, ``objective.beta`` and ``objective.label_smoothing`` of a dpo run."""

    loss: str  # sigmoid | ipo
    beta: float
    label_smoothing: float = 0.0

    def per_pair(self, chosen_ratio: torch.Tensor, rejected_ratio: torch.Tensor,
                 chosen_count: torch.Tensor, rejected_count: torch.Tensor) -> torch.Tensor:
        if self.loss == "ipo":
            delta = chosen_ratio / chosen_count.clamp(min=1) - rejected_ratio / rejected_count.clamp(min=1)
            return (delta - 1 / (2 * self.beta)) ** 2
        delta = self.beta * (chosen_ratio - rejected_ratio)
        smooth = self.label_smoothing
        return -(1 - smooth) * F.logsigmoid(delta) - smooth * F.logsigmoid(-delta)


def preference_loss(objective) -> PreferenceLoss | None:
    """A config's ``objective`` section (`config.ObjectiveConfig`) as a dpo run's loss, or None: sft."""
    if objective.kind == "sft":
        return None
    return PreferenceLoss(objective.loss, objective.beta, objective.label_smoothing)


def steps_run_reference_forward(objective) -> bool:
    """Whether a step of a config's ``objective`` runs the reference forward: a dpo run's does,
    unless its reference scores are precomputed (``objective.precompute_reference``)."""
    return objective.kind != "sft" and not objective.precompute_reference


def trained_pairs(batch: dict) -> int:
    """The pairs of a collated (CPU) batch that have trained tokens on both sides."""
    counts = (batch["labels"] != IGNORE_INDEX).sum(-1)
    n = len(counts) // 2
    return int(((counts[:n] > 0) & (counts[n:] > 0)).sum())


def sequence_logps(model, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each row's summed fp32 log-probability of its trained tokens (labels are already shifted)."""
    logits = model(tokens)
    nll = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                          reduction="none")
    return -nll.view(labels.shape).sum(-1)


def preference_loss_sum(model, batch: dict, device, objective: PreferenceLoss) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss summed over ``batch``'s counted pairs (with its graph), and the sums of
    `PREFERENCE_STATS` over them (detached). The reference scores are the batch's ``reference``
    (`reference_logps`) when it has them, else a reference forward runs first, without a graph."""
    tokens, labels = batch["tokens"].to(device), batch["labels"].to(device)
    if "reference" in batch:
        reference = batch["reference"].to(device)
    else:
        with torch.no_grad(), adapters_off(model):
            reference = sequence_logps(model, tokens, labels)
    policy = sequence_logps(model, tokens, labels)
    counts = (labels != IGNORE_INDEX).sum(-1)
    n = len(counts) // 2
    counted = (counts[:n] > 0) & (counts[n:] > 0)
    ratio = policy - reference
    losses = objective.per_pair(ratio[:n], ratio[n:], counts[:n], counts[n:])
    loss_sum = torch.where(counted, losses, torch.zeros_like(losses)).sum()
    rewards = objective.beta * ratio.detach()
    logps = policy.detach()
    per_pair = torch.stack([rewards[:n], rewards[n:], (rewards[:n] > rewards[n:]).float(), logps[:n], logps[n:]])
    stats = torch.where(counted, per_pair, torch.zeros_like(per_pair)).sum(-1)
    return loss_sum, stats


@torch.no_grad()
def reference_logps(model, samples: list[dict], device, rank: int, world_size: int, micro_batch_size: int,
                    seq_len: int, pad_id: int) -> torch.Tensor:
    """Every pair's reference scores, ``[len(samples), 2]`` (chosen, rejected; fp32, on the CPU),
    on every rank (collective). Each rank scores its share of the rounds `eval_micro_batches`
    makes, in micro-batches of the training shape, then the ranks exchange their scores."""
    batches = eval_micro_batches(samples, rank, world_size, micro_batch_size, seq_len, pad_id)
    mine = torch.zeros(len(batches), micro_batch_size, 2, device=device)
    for i, batch in enumerate(batches):  # in training mode, as the step's own reference forward
        with adapters_off(model):
            scores = sequence_logps(model, batch["tokens"].to(device), batch["labels"].to(device))
        mine[i] = scores.view(2, micro_batch_size).T  # chosen rows, then rejected rows
    if world_size == 1:
        return mine.reshape(-1, 2)[:len(samples)].cpu()
    everyone = [torch.zeros_like(mine) for _ in range(world_size)]
    dist.all_gather(everyone, mine)
    # Round r holds rank 0's micro-batch, then rank 1's, ...: the samples in order.
    return torch.stack(everyone, 1).reshape(-1, 2)[:len(samples)].cpu()


def batch_reference(table: torch.Tensor, indices: list[int]) -> torch.Tensor:
    """The `reference_logps` of a micro-batch of pairs in `collate_samples`' row order."""
    return torch.cat([table[indices, 0], table[indices, 1]])


@torch.no_grad()
def evaluate_preference(model, batches: list[dict], device, objective: PreferenceLoss) -> dict[str, float]:
    """The mean loss (``loss``) and `PREFERENCE_STATS` over ``batches`` summed over all ranks:
    every rank must call it with the same number of batches."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(2 + len(PREFERENCE_STATS), dtype=torch.float64, device=device)
    try:
        for batch in batches:
            loss_sum, stats = preference_loss_sum(model, batch, device, objective)
            totals += torch.cat([loss_sum.reshape(1), stats, torch.tensor([float(trained_pairs(batch))], device=device)]).double()
    finally:
        model.train(was_training)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(totals)
    values = totals.tolist()
    if not values[-1]:
        raise ValueError("the eval batches hold no pair with trained tokens on both sides: nothing to evaluate")
    return dict(zip(("loss",) + PREFERENCE_STATS, (v / values[-1] for v in values[:-1])))
