"""A model for inference: an HF checkpoint directory (a base or a merged export), optionally with
a pmss_dist adapter directory applied on top."""

from __future__ import annotations

from pathlib import Path

import torch

from pmss_dist.adapters.io import load_adapter_state, read_adapter
from pmss_dist.adapters.layers import AdapterSpec
from pmss_dist.build import build_model
from pmss_dist.checkpoints.fingerprint import check_base_fingerprint
from pmss_dist.hf.load import read_model_spec


def load_eval_model(model_dir: str | Path, adapter_dir: str | Path | None, *, device: torch.device,
                    mesh=None, dtype: torch.dtype = torch.float32):
    """The decoder of ``model_dir`` with the adapter of ``adapter_dir`` (if any), in eval mode. With
    ``mesh`` the frozen weights are sharded with FSDP2 as in training (each rank reads only its
    rows); without, every process holds the whole model."""
    model_spec = read_model_spec(model_dir)
    spec, state = None, None
    if adapter_dir is not None:
        state, meta = read_adapter(adapter_dir)
        check_base_fingerprint(f"adapter {adapter_dir}", meta.get("base_fingerprint"), model_dir,
                               "point --model at its base")
        spec = AdapterSpec(meta["kind"], tuple(meta["targets"]), int(meta["rank"]), float(meta["alpha"]))
    model = build_model(model_spec, adapter=spec, mesh=mesh, device=device, dtype=dtype, weights=model_dir)
    if state is not None:
        load_adapter_state(model, state)
    model.eval()
    return model
