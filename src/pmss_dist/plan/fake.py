"""Fake devices: a world of any size in this one process, and models of any size without memory.

The world is torch's fake process group (the ``fake`` backend with a `FakeStore`): collectives
return at once and move nothing, but every rank-dependent decision — the device mesh, each rank's
FSDP2 shard, the groups collectives run on — is the one rank 0 of a real world of that size makes.
The model is built by the real recipe (`build.sharded_meta_model`: meta device, adapters, AC,
FSDP2) and then materialised by the real `build.materialize` with its storage in a `FakeTensorMode`:
tensors with shapes, dtypes and storage sizes but no data, so a 405B model costs no memory.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.distributed._tools.fake_collectives  # noqa: F401  (fake kernels of the c10d collectives)
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed.device_mesh import DeviceMesh
from torch.testing._internal.distributed.fake_pg import FakeStore

from pmss_dist.build import materialize, sharded_meta_model
from pmss_dist.models.spec import ModelSpec
from pmss_dist.parallel.mesh import REPLICATE, SHARD, ParallelDims

# Fake tensors live on the CPU: the device type only picks kernels' meta functions; sizes are the same.
FAKE_DEVICE = torch.device("cpu")


@contextlib.contextmanager
def fake_world(world_size: int):
    """The fake process group of ``world_size`` ranks, as rank 0, for the duration of the block."""
    if dist.is_initialized():
        raise RuntimeError("the planner needs this process's default process group, and one is already set up")
    dist.init_process_group("fake", rank=0, world_size=world_size, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


def fake_mesh(world_size: int, dp_shard: int, full_finetune: bool) -> DeviceMesh | None:
    """The trainer's mesh for ``dp_shard`` (`ParallelDims.training_mesh`), over the fake world."""
    dims = ParallelDims(world_size // dp_shard, dp_shard, world_size)
    return dims.training_mesh(FAKE_DEVICE.type, full_finetune=full_finetune)


def mesh_groups(mesh: DeviceMesh | None) -> list[dist.ProcessGroup]:
    """The world and the mesh's groups: every group the training code runs collectives on."""
    groups = [dist.group.WORLD]
    if mesh is not None:
        groups += [mesh.get_group(name) for name in mesh.mesh_dim_names if name in (SHARD, REPLICATE)]
    return groups


def fake_model(model_spec: ModelSpec, *, fake_mode: FakeTensorMode, **build_args) -> torch.nn.Module:
    """`build_model` in its two halves, the second under ``fake_mode``: ``build_args`` are
    `sharded_meta_model`'s (adapter, mesh, dtype, parallel, max_seq_len); no weights are read."""
    model = sharded_meta_model(model_spec, device=FAKE_DEVICE, **build_args)
    return materialize(model, model_spec, device=FAKE_DEVICE, storage_mode=fake_mode)


def meta_model(model_spec: ModelSpec, **build_args) -> torch.nn.Module:
    """The first half only: sharded on the meta device, for sizes (each rank's shard bytes)."""
    return sharded_meta_model(model_spec, device=FAKE_DEVICE, **build_args)
