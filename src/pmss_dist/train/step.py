"""One optimizer step: what the trainer runs, the planner measures (plan/probe.py) and the GPU
bench times (bench/bench_gpu.py), so that none of them restates it.

A step waits on the ranks only where it must. Before the forward, one all-reduce of this rank's
trained-token count (`global_targets`): every micro-batch's loss is divided by the global count,
which the gradients need. After the update, one all-reduce of ``[loss sum, stop flags]``
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
from pmss_dist.parallel.grads import all_reduce_grads, clip_grad_norm

# The stop signals `agree` carries, one counter each: summed over ranks, any count above zero stops.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def trained_tokens(batches: list[dict]) -> int:
    """This rank's trained tokens in its collated (CPU) micro-batches: no device is involved."""
    return sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)


def global_targets(count: int, device: torch.device) -> torch.Tensor:
    """The global batch's number of trained tokens, ``count`` summed over ranks, as a device tensor
    (float64). Its all-reduce is the one collective before the forward."""
    total = torch.tensor([float(count)], device=device, dtype=torch.float64)
    dist.all_reduce(total)
    return total[0]


def micro_steps(model: torch.nn.Module, batches: list[dict], device: torch.device,
                targets: torch.Tensor) -> torch.Tensor:
    """Forward and backward of this rank's micro-batches, each loss divided by the global
    ``targets``; returns the undivided loss sum on the device."""
    loss_sum = torch.zeros((), device=device, dtype=torch.float32)
    for batch in batches:
        loss, _ = token_loss_sum(model, batch, device)
        (loss / targets.to(loss.dtype)).backward()  # as dividing by the count as a number would
        loss_sum += loss.detach()
    return loss_sum


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
    agreed: torch.Tensor  # [loss sum, one count per STOP_SIGNALS], summed over ranks once `work` is done
    work: object  # the async all-reduce's handle
    targets: torch.Tensor
    grad_norm: torch.Tensor


def agree(step: int, loss_sum: torch.Tensor, signum: int, targets: torch.Tensor,
          grad_norm: torch.Tensor) -> Unread:
    """Start the one all-reduce after the update: the loss sum and whether this rank was asked to
    stop. Nothing waits for it here."""
    flags = [float(signum == s) for s in STOP_SIGNALS]
    agreed = torch.cat([loss_sum.detach().reshape(1).to(torch.float64),
                        torch.tensor(flags, dtype=torch.float64, device=loss_sum.device)])
    return Unread(step, agreed, dist.all_reduce(agreed, async_op=True), targets, grad_norm)


@dataclass
class Outcome:
    step: int
    loss: float  # the global batch's mean token loss
    grad_norm: float
    targets: float
    stop: int  # the stop signal any rank had received by this step, or 0


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
        loss_sum, flags, targets, norm = row[0], row[1:1 + len(STOP_SIGNALS)], row[-2], row[-1]
        stop = next((int(s) for s, n in zip(STOP_SIGNALS, flags) if n > 0), 0)
        outcomes.append(Outcome(entry.step, loss_sum / targets if targets else float("nan"), norm, targets, stop))
    return outcomes
