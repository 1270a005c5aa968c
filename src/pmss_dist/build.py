"""The one recipe that turns a model's spec (its config.json, read) into a ready model, for every
entry point.

Build on the meta device -> swap in adapters -> activation checkpointing, compile and FSDP2 per
block -> ``to_empty`` on the device -> RoPE caches -> base weights, each rank reading only its own
rows -> adapter tensors initialised. Training, evaluation, skeleton selection and the benches
all call `build_model`; none of them repeats these steps. Its two halves, `sharded_meta_model`
(no memory) and `materialize`, are public so that the planner (`pmss_dist.plan`) runs the same
steps with fake tensors in between.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torchtune.training import set_default_dtype

from pmss_dist.adapters.layers import FULL, AdapterSpec, apply_adapters, reset_adapters
from pmss_dist.adapters.quantize import tensor_bytes
from pmss_dist.config import ParallelConfig
from pmss_dist.hf.load import base_parameters, check_hf_weights, load_hf_weights
from pmss_dist.models import build_decoder, init_rope_caches
from pmss_dist.models.spec import ModelSpec
from pmss_dist.console import print_main
from pmss_dist.parallel.mesh import SHARD
from pmss_dist.parallel.parallelize import parallelize, rank_memory_bytes, resolve_reshard_after_forward

# Inference and selection: no compile, no activation checkpointing, reshard after every forward.
INFERENCE = ParallelConfig(compile=False, activation_checkpointing="none", reshard_after_forward=True)


def build_model(model_spec: ModelSpec, *, adapter: AdapterSpec | None, mesh: DeviceMesh | None, device: torch.device,
                dtype: torch.dtype, parallel: ParallelConfig = INFERENCE, weights: str | Path | None = None,
                max_seq_len: int | None = None, seed: int = 0) -> nn.Module:
    """The decoder ``model_spec`` describes, with ``adapter`` swapped in (``None``: no adapter,
    everything frozen), sharded over ``mesh`` as ``parallel`` says (``mesh=None``: nothing sharded,
    a whole copy in this process), on ``device``, frozen weights in ``dtype``, base weights read from the HF
    directory ``weights`` (``None``: left uninitialised, for callers that draw their own).

    Adapter tensors are fp32 and start as `reset_adapters` makes them from ``seed``; PMSS layers
    still need skeletons (`assign_skeletons`, or a checkpoint). Full fine-tuning keeps fp32 master
    weights, sharded, and computes in ``dtype`` through FSDP's mixed precision."""
    model = sharded_meta_model(model_spec, adapter=adapter, mesh=mesh, device=device, dtype=dtype, parallel=parallel,
                               weights=weights, max_seq_len=max_seq_len)
    return materialize(model, model_spec, device=device, weights=weights, seed=seed)


def sharded_meta_model(model_spec: ModelSpec, *, adapter: AdapterSpec | None, mesh: DeviceMesh | None,
                       device: torch.device, dtype: torch.dtype, parallel: ParallelConfig = INFERENCE,
                       weights: str | Path | None = None, max_seq_len: int | None = None) -> nn.Module:
    """The first half of `build_model`: the model on the meta device with adapters, activation
    checkpointing, compile and FSDP2 applied, and no memory used (``device`` only sizes
    ``reshard_after_forward: auto``). The planner (`pmss_dist.plan`) materialises it under fake tensors."""
    shards = 1 if mesh is None else mesh[SHARD].size()
    model = _meta_model(model_spec, adapter, dtype, max_seq_len, shards=shards, device=device)
    if weights is not None:  # names and shapes, from the file headers: before any memory is used
        check_hf_weights({name: p.shape for name, p in base_parameters(model).items()}, weights, model_spec)
    reshard = True
    if mesh is not None:
        model_bytes = sum(tensor_bytes(p) for p in model.parameters())
        memory = rank_memory_bytes(device)
        reshard = resolve_reshard_after_forward(parallel.reshard_after_forward, model_bytes, memory)
        if parallel.reshard_after_forward == "auto":
            print_main(f"parallel.reshard_after_forward=auto -> {str(reshard).lower()} (model "
                       f"{model_bytes / 2**30:.2f} GiB, rank memory {memory / 2**30:.0f} GiB)")
    parallelize(model, mesh, param_dtype=dtype, compile=parallel.compile,
                activation_checkpointing=parallel.activation_checkpointing, reshard_after_forward=reshard)
    return model


def materialize(model: nn.Module, model_spec: ModelSpec, *, device: torch.device, weights: str | Path | None = None,
                seed: int = 0, storage_mode=None) -> nn.Module:
    """The second half of `build_model`: storage on ``device`` (each rank its shards), RoPE caches,
    base weights from ``weights`` (``None``: left uninitialised), adapter tensors initialised.
    ``storage_mode``: a context to allocate parameters and buffers under (the planner's
    FakeTensorMode); the small RoPE caches are computed outside it."""
    with storage_mode or contextlib.nullcontext():
        model.to_empty(device=device)
    init_rope_caches(model, device)
    if weights is not None:
        load_hf_weights(model, weights, model_spec)
    reset_adapters(model, seed)
    return model


def parameter_bytes(model_spec: ModelSpec, *, adapter: AdapterSpec | None, dtype: torch.dtype) -> int:
    """Bytes of the model `build_model` makes (all of it, unsharded), from a build on the meta device."""
    return sum(tensor_bytes(p) for p in _meta_model(model_spec, adapter, dtype, None).parameters())


def _meta_model(model_spec: ModelSpec, adapter: AdapterSpec | None, dtype: torch.dtype, max_seq_len: int | None, *,
                shards: int = 1, device: torch.device | None = None):
    # Full fine-tuning keeps fp32 master weights (FSDP's mixed precision computes in ``dtype``).
    storage_dtype = torch.float32 if adapter is not None and adapter.kind == FULL else dtype
    with torch.device("meta"), set_default_dtype(storage_dtype):
        model = build_decoder(model_spec, max_seq_len=max_seq_len)
    if adapter is None:
        model.requires_grad_(False)
    else:
        apply_adapters(model, adapter, shards=shards, constants_device=device)
    return model
