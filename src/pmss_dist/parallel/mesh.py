"""The data-parallel device mesh: ``dp_replicate`` copies of the base, each sharded over ``dp_shard``
ranks (torchtitan's names).

Within a node the frozen base is sharded (FSDP2 all-gathers ride the fast links); across nodes it is
replicated (HSDP), so the only traffic between nodes is the reduction of what trains: the cores'
gradients, a few MB per step whatever the base's size (full fine-tuning adds its sharded gradients'
all-reduce). ``dp_shard = 1`` keeps a whole base on every rank and shards nothing: no all-gather at
all, the fastest layout when the base fits on one device.
"""

from __future__ import annotations

import os
import re

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from pmss_dist.errors import ConfigError
from pmss_dist.config import ParallelConfig

# "auto" shards a base over as many whole nodes as keep its shard within this fraction of a rank's
# memory: the rest is for gathered blocks, activations, the adapters and their optimizer.
SHARD_MEMORY_FRACTION = 0.5
SHARD, REPLICATE = "dp_shard", "dp_replicate"


def local_world_size() -> int:
    """Processes on this node: torchrun's LOCAL_WORLD_SIZE, or srun's SLURM_NTASKS_PER_NODE ("8" or "8(x2)")."""
    if "LOCAL_WORLD_SIZE" in os.environ:
        return int(os.environ["LOCAL_WORLD_SIZE"])
    match = re.match(r"\d+", os.environ.get("SLURM_NTASKS_PER_NODE", ""))
    return int(match.group()) if match else 1


def resolve_dp_shape(parallel: ParallelConfig, world_size: int, local_world: int, model_bytes: int,
                     rank_memory: int) -> tuple[int, int]:
    """``(dp_replicate, dp_shard)`` for ``parallel``'s settings, or a ConfigError naming the numbers."""
    shard = parallel.dp_shard
    if shard == "auto":
        if parallel.dp_replicate != "auto":
            shard = _divide(world_size, parallel.dp_replicate, "parallel.dp_replicate")
        else:
            nodes = max(1, world_size // local_world)
            whole = [n for n in range(1, nodes + 1) if nodes % n == 0]
            fits = [n for n in whole if model_bytes / (n * local_world) <= SHARD_MEMORY_FRACTION * rank_memory]
            shard = (fits[0] if fits else nodes) * min(local_world, world_size)
    replicate = parallel.dp_replicate
    if replicate == "auto":
        replicate = _divide(world_size, shard, "parallel.dp_shard")
    if replicate * shard != world_size:
        raise ConfigError(f"parallel.dp_replicate ({replicate}) x parallel.dp_shard ({shard}) = {replicate * shard}, "
                          f"but the world size is {world_size}: make their product the number of processes")
    if shard % local_world and local_world % shard:
        raise ConfigError(f"parallel.dp_shard={shard} neither divides a node ({local_world} processes per node) nor "
                          f"spans whole nodes: a shard group must not straddle nodes")
    return replicate, shard


def _divide(world_size: int, part: int, key: str) -> int:
    if world_size % part:
        raise ConfigError(f"{key}={part} does not divide the world size {world_size}")
    return world_size // part


def data_parallel_mesh(device_type: str, replicate: int, shard: int, *, full_finetune: bool) -> DeviceMesh | None:
    """The mesh FSDP2 shards over: 1-D ``(dp_shard,)`` on one copy, 2-D ``(dp_replicate, dp_shard)``
    for HSDP; ``None`` when nothing is sharded (``dp_shard == 1`` with a frozen base). Full
    fine-tuning always gets a mesh: its trained weights' gradients are reduced by FSDP2."""
    if shard == 1 and not full_finetune:
        return None
    if replicate == 1:
        return init_device_mesh(device_type, (shard,), mesh_dim_names=(SHARD,))
    return init_device_mesh(device_type, (replicate, shard), mesh_dim_names=(REPLICATE, SHARD))
