"""Activation checkpointing, torch.compile and FSDP2, applied per transformer block in the one
order that composes: AC wraps the block, the wrapped block is compiled in place, then sharded.

Frozen base weights are sharded by ``fully_shard`` (one group per block, plus the root). The
adapters' trainable tensors are passed as ``ignored_params``: every rank keeps a full fp32 copy
and ``grads.all_reduce_grads`` sums their gradients. That is one collective of a few MB per step,
and it keeps cores replicated rather than split unevenly on dim 0 as FSDP2 would do with them.
Full fine-tuning (no adapter layers) trains the sharded weights themselves: FSDP2 reduce-scatters
their gradients.
"""

from __future__ import annotations

import os
from functools import partial

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from pmss_dist.parallel.grads import replicated_parameters
from pmss_dist.parallel.mesh import local_world_size

# Selective AC keeps the outputs of the expensive ops and recomputes the cheap elementwise ones
# (norms, activations, RoPE): most of full AC's memory saving for a fraction of its recompute.
_SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,  # SDPA's choice on H100
}


def _selective_policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _wrap_ac(block: nn.Module, mode: str) -> nn.Module:
    if mode == "full":
        return checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT, preserve_rng_state=False)
    if mode == "selective":
        return checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT, preserve_rng_state=False,
                                  context_fn=partial(create_selective_checkpoint_contexts, _selective_policy))
    return block


def parallelize(model: nn.Module, mesh: DeviceMesh | None, *, param_dtype: torch.dtype, compile: bool,
                activation_checkpointing: str, reshard_after_forward: bool) -> nn.Module:
    """AC, compile and FSDP2 on ``model`` (a torchtune ``TransformerDecoder``, on meta or real
    weights), in place. ``mesh``: 1-D (FSDP) or 2-D ``(dp_replicate, dp_shard)`` (HSDP); ``None``
    shards nothing (a replicated base: the adapters' gradients are still summed by
    ``grads.all_reduce_grads``)."""
    replicated = set(replicated_parameters(model))
    for i, block in enumerate(model.layers):
        # A block with nothing to train has no backward through its weights: AC would only
        # add recompute; with compile it also fails ("Activation checkpoint rematerialization ... does
        # not support RNG ops in recompute regions") on a block whose parameters are all frozen.
        if any(p.requires_grad for p in block.parameters()):
            block = _wrap_ac(block, activation_checkpointing)
        if compile:
            block.compile(fullgraph=True)
        model.layers[i] = block
    if mesh is not None:
        _shard(model, mesh, param_dtype, reshard_after_forward, replicated)
    return model


def _shard(model: nn.Module, mesh: DeviceMesh, param_dtype: torch.dtype, reshard_after_forward: bool,
           replicated: set) -> None:
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward,
                    ignored_params=replicated & set(block.parameters()))
    # The root group holds embeddings, final norm and output: gathered for the first and last
    # use of the step, so keep them gathered (no reshard) between forward and backward.
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False, ignored_params=replicated)
    # Every rank's loss is already divided by the global token count, so the gradients of sharded
    # trainable weights (full fine-tuning) must be summed over ranks, as `all_reduce_grads` does
    # for adapters; FSDP2 would average them. A plain SUM, because gloo has no PREMUL_SUM.
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)


# "auto" keeps blocks unsharded between forward and backward when the whole model takes at most
# this fraction of a rank's memory: it then saves one all-gather per block per step (torchtune's
# recipe ran 1.31x faster with the same switch on ~100M, 2 CPU ranks, docs/BENCHMARKS.md) for
# memory the rank can spare. Larger
# models reshard, as ZeRO-3 needs.
UNSHARDED_MEMORY_FRACTION = 0.25


def resolve_reshard_after_forward(setting: bool | str, model_bytes: int, rank_memory_bytes: int) -> bool:
    """``parallel.reshard_after_forward`` (validated by config) as a bool: as given, or for "auto"
    decided by the model's size."""
    if isinstance(setting, bool):
        return setting
    return model_bytes > UNSHARDED_MEMORY_FRACTION * rank_memory_bytes


def rank_memory_bytes(device: torch.device) -> int:
    """Memory one rank can count on: its GPU's, or on CPU the host's split between local ranks."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return host // local_world_size()
