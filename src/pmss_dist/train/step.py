"""One optimizer step: what the trainer runs, the planner measures (plan/probe.py) and the GPU
bench times (bench/bench_gpu.py), so that none of them restates it.

A step waits on the ranks only where it must. Before the forward, one all-reduce of this rank's
count of what the loss averages over (`loss_units`: trained tokens, or a dpo run's pairs): every
micro-batch's loss is divided by the global count, which the gradients need. After the update,
one all-reduce of ``[loss sum, a dpo run's reward sums, stop flags]``
(`agree`), issued without waiting; the host reads it only at the trainer's read points (logging,
checkpoints, the end). Between read points a step makes no host read: the loss, the gradient norm
and the counts stay on the device, and the next kernels queue behind the current ones.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pmss_dist.data.batches import IGNORE_INDEX
from pmss_dist.eval.loss import token_loss_sum
from pmss_dist.eval.preference import PreferenceLoss, preference_loss_sum, trained_pairs
from pmss_dist.parallel.grads import all_reduce_grads, clip_grad_norm

# The stop signals `agree` carries, one counter each: summed over ranks, any count above zero stops.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def loss_units(batches: list[dict], preference: PreferenceLoss | None = None) -> int:
    """What this rank's collated (CPU) micro-batches' loss is a sum over: trained tokens, or with
    ``preference`` the pairs trained on both sides. No device is involved."""
    if preference is not None:
        return sum(trained_pairs(b) for b in batches)
    return sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)


def micro_loss(model: torch.nn.Module, batch: dict, device: torch.device,
               preference: PreferenceLoss | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One micro-batch's summed loss (with its graph) and its statistics' sums (detached; none for
    the token loss, `eval.preference.PREFERENCE_STATS` with ``preference``)."""
    if preference is not None:
        return preference_loss_sum(model, batch, device, preference)
    loss, _ = token_loss_sum(model, batch, device)
    return loss, loss.new_zeros(0)


def global_targets(count: int, device: torch.device) -> torch.Tensor:
    """The global batch's number of trained tokens, ``count`` summed over ranks, as a device tensor
    (float64). Its all-reduce is the one collective before the forward."""
    total = torch.tensor([float(count)], device=device, dtype=torch.float64)
    dist.all_reduce(total)
    return total[0]


def micro_steps(model: torch.nn.Module, batches: list[dict], device: torch.device,
                targets: torch.Tensor, preference: PreferenceLoss | None = None) -> torch.Tensor:
    """Forward and backward of this rank's micro-batches, each loss divided by the global
    ``targets``; returns the undivided ``[loss sum, statistics' sums]`` on the device."""
    sums = None
    for batch in batches:
        loss, stats = micro_loss(model, batch, device, preference)
        (loss / targets.to(loss.dtype)).backward()  # as dividing by the count as a number would
        part = torch.cat([loss.detach().reshape(1), stats]).to(torch.float64)
        sums = part if sums is None else sums + part
    return sums


def reduce_and_clip(params: list, replicated: list, grad_clip: float) -> torch.Tensor:
    """After the micro-batches: the replicated adapters' gradients summed over ranks, then the
    global norm (every gradient clipped to ``grad_clip``). Returns the norm, on the device."""
    all_reduce_grads(replicated)
    return clip_grad_norm(params, grad_clip)


def update(optimizer: torch.optim.Optimizer) -> None:
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@dataclass
class Unread:
    """A step whose outcome the host has not read yet."""

    step: int
    agreed: torch.Tensor  # [loss sum, statistics' sums, one count per STOP_SIGNALS], summed over ranks once `work` is done
    work: object  # the async all-reduce's handle
    targets: torch.Tensor
    grad_norm: torch.Tensor


def agree(step: int, sums: torch.Tensor, signum: int, targets: torch.Tensor,
          grad_norm: torch.Tensor) -> Unread:
    """Start the one all-reduce after the update: the loss sum and statistics' sums (`micro_steps`)
    and whether this rank was asked to stop. Nothing waits for it here."""
    flags = [float(signum == s) for s in STOP_SIGNALS]
    agreed = torch.cat([sums.detach().reshape(-1).to(torch.float64),
                        torch.tensor(flags, dtype=torch.float64, device=sums.device)])
    return Unread(step, agreed, dist.all_reduce(agreed, async_op=True), targets, grad_norm)


@dataclass
class Outcome:
    step: int
    loss: float  # the global batch's mean token loss
    grad_norm: float
    targets: float
    stop: int  # the stop signal any rank had received by this step, or 0
    stats: tuple[float, ...] = ()  # the statistics' global means (per pair), in `micro_loss`'s order


def read(unread: list[Unread]) -> list[Outcome]:
    """Wait for the pending steps' all-reduces and read them in one host transfer."""
    if not unread:
        return []
    for entry in unread:
        entry.work.wait()
    values = torch.stack([torch.cat([e.agreed, e.targets.reshape(1), e.grad_norm.detach().reshape(1).to(torch.float64)])
                          for e in unread]).tolist()
    outcomes = []
    for entry, row in zip(unread, values):
        sums, flags = row[:-2 - len(STOP_SIGNALS)], row[-2 - len(STOP_SIGNALS):-2]
        targets, norm = row[-2], row[-1]
        stop = next((int(s) for s, n in zip(STOP_SIGNALS, flags) if n > 0), 0)
        means = [s / targets if targets else float("nan") for s in sums]
        outcomes.append(Outcome(entry.step, means[0], norm, targets, stop, tuple(means[1:])))
    return outcomes
