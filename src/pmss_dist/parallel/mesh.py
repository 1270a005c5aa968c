"""The data-parallel layout: ``dp_replicate`` copies of the base, each sharded over ``dp_shard``
ranks (torchtitan's names), and the device meshes it builds, their dimensions addressed by name.

Within a node the frozen base is sharded (FSDP2 all-gathers ride the fast links); across nodes it is
replicated (HSDP), so the only traffic between nodes is the reduction of what trains: the cores'
gradients, a few MB per step whatever the base's size (full fine-tuning adds its sharded gradients'
all-reduce). ``dp_shard = 1`` keeps a whole base on every rank and shards nothing: no all-gather at
all, the fastest layout when the base fits on one device.
"""

from __future__ import annotations

import os
import re
import weakref
from dataclasses import dataclass

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


@dataclass(frozen=True)
class ParallelDims:
    """``replicate`` copies of the base x ``shard`` ranks per copy = ``world_size``, or a
    ConfigError naming the numbers."""

    replicate: int
    shard: int
    world_size: int

    def __post_init__(self) -> None:
        if self.replicate * self.shard != self.world_size:
            raise ConfigError(f"parallel.dp_replicate ({self.replicate}) x parallel.dp_shard ({self.shard}) = "
                              f"{self.replicate * self.shard}, but the world size is {self.world_size}: make their "
                              f"product the number of processes")

    @classmethod
    def resolve(cls, parallel: ParallelConfig, world_size: int, local_world: int, model_bytes: int,
                rank_memory: int) -> ParallelDims:
        """``parallel.dp_shard`` and ``parallel.dp_replicate`` on this world, their ``auto``s decided by
        the node's size and whether ``model_bytes`` of base fit in ``rank_memory``."""
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
        dims = cls(replicate, shard, world_size)
        if shard % local_world and local_world % shard:
            raise ConfigError(f"parallel.dp_shard={shard} neither divides a node ({local_world} processes per node) "
                              f"nor spans whole nodes: a shard group must not straddle nodes")
        return dims

    @classmethod
    def flat(cls, world_size: int) -> ParallelDims:
        """One copy sharded over every rank: the layout of selection and evaluation, which take no
        ``parallel`` settings."""
        return cls(1, world_size, world_size)

    @property
    def sharded(self) -> bool:
        return self.shard > 1

    @property
    def replicated(self) -> bool:
        return self.replicate > 1

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """``(dp_replicate, dp_shard)``; with one copy just ``(dp_shard,)``, so that FSDP2 shards
        without HSDP's replicate dimension. Callers address dimensions by name, never position."""
        if not self.replicated:
            mesh = init_device_mesh(device_type, (self.shard,), mesh_dim_names=(SHARD,))
        else:
            mesh = init_device_mesh(device_type, (self.replicate, self.shard), mesh_dim_names=(REPLICATE, SHARD))
        _built_meshes.add(mesh)
        return mesh

    def training_mesh(self, device_type: str, *, full_finetune: bool) -> DeviceMesh | None:
        """The mesh training hands FSDP2; ``None`` when nothing is sharded (``dp_shard == 1`` with a
        frozen base). Full fine-tuning always gets one: FSDP2 reduces its trained weights' gradients."""
        return self.build_mesh(device_type) if self.sharded or full_finetune else None


_built_meshes: weakref.WeakSet[DeviceMesh] = weakref.WeakSet()


def release_mesh_groups() -> None:
    """Drop the process groups the built meshes hold (their sub-meshes' groups live in the root's
    registry), once the groups are destroyed. torch's DTensor caches keep meshes alive to the end
    of the interpreter, and with them the gloo groups' worker threads: a worker still releasing a
    finished collective's tensors then needs the GIL while Python finalises, and the process
    aborts ("terminate called without an active exception"). Released here, the groups are freed
    and their threads joined before that."""
    for mesh in list(_built_meshes):
        registry = getattr(mesh, "_pg_registry", None)  # absent in torch releases without one
        if isinstance(registry, dict):
            registry.clear()


def _divide(world_size: int, part: int, key: str) -> int:
    if world_size % part:
        raise ConfigError(f"{key}={part} does not divide the world size {world_size}")
    return world_size // part
