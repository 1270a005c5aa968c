"""Gradients across ranks: which tensors train, summing the replicated adapters' gradients, and
the global gradient norm over sharded and replicated tensors alike."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from pmss_dist.adapters.layers import adapter_layers


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def replicated_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' trainable tensors: kept whole on every rank, outside FSDP."""
    return [p for layer in adapter_layers(model).values() for p in layer.parameters() if p.requires_grad]


def all_reduce_grads(params: list[nn.Parameter], group=None) -> None:
    """Sum the replicated adapters' gradients over ranks in one flat collective. The loss is
    already divided by the global token count, so the sum is the global batch's gradient.
    ``params`` must not hold FSDP-sharded parameters: FSDP has reduced those already."""
    if not params or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g)
        offset += g.numel()


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """The global gradient norm of ``params`` (FSDP-sharded, replicated or both), and with
    ``max_norm > 0`` every gradient scaled so that the norm is at most ``max_norm``. A sharded
    gradient's norm is a partial result until reduced over the mesh, and it cannot be stacked with
    plain tensors, so the two groups are measured apart and combined."""
    grads = [p.grad for p in params if p.grad is not None]
    sharded = [g for g in grads if isinstance(g, DTensor)]
    plain = [g for g in grads if not isinstance(g, DTensor)]
    squares = []
    if sharded:
        squares.append(torch.nn.utils.get_total_norm(sharded).full_tensor() ** 2)
    if plain:
        squares.append(torch.nn.utils.get_total_norm(plain) ** 2)
    total = torch.stack(squares).sum().sqrt()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total
