"""The trained adapter in a small file of our own: ``adapter.safetensors`` (cores or LoRA factors,
skeleton indices) beside ``adapter.json`` (kind, rank, alpha, targets, base model).

Adapter tensors are replicated on every rank, so rank 0 writes them as they are: no gather.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pmss_dist.adapters.layers import adapter_layers
from pmss_dist.files import publish_dir

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_META = "adapter.json"


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{name}.{attr}": getattr(layer, attr).detach().cpu().contiguous()
            for name, layer in adapter_layers(model).items() for attr in layer.tensor_names}


def adapter_meta(adapter_config: dict, base_model: str, base_fingerprint: str) -> dict:
    """``adapter.json``'s contents from a run's ``adapter`` config section. ``rank`` is the file's
    name for PMSS's k and LoRA's r, kept so that adapters written before still load."""
    a = adapter_config
    return {"kind": a["kind"], "rank": a["rank"], "alpha": a["alpha"], "targets": a["targets"], "method": a["method"],
            "base_model": base_model, "base_fingerprint": base_fingerprint}


def save_adapter(model: nn.Module, out_dir: str | Path, meta: dict) -> Path:
    return write_adapter(adapter_state(model), out_dir, meta)


def write_adapter(state: dict[str, torch.Tensor], out_dir: str | Path, meta: dict) -> Path:
    """Write the adapter directory ``out_dir`` whole or not at all (`files.publish_dir`): a
    previous adapter there stays until the new one is complete."""
    state = {k: v.contiguous() for k, v in state.items()}

    def write(staging: Path) -> None:
        save_file(state, str(staging / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (staging / ADAPTER_META).write_text(json.dumps(meta, indent=2))

    return publish_dir(out_dir, write)


def read_adapter(adapter_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    adapter_dir = Path(adapter_dir)
    for name in (ADAPTER_WEIGHTS, ADAPTER_META):
        if not (adapter_dir / name).is_file():
            raise FileNotFoundError(f"{adapter_dir / name} not found: not a pmss_dist adapter directory")
    return load_file(str(adapter_dir / ADAPTER_WEIGHTS)), json.loads((adapter_dir / ADAPTER_META).read_text())


@torch.no_grad()
def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy saved adapter tensors into a model whose adapters have the same names and shapes."""
    expected = adapter_state(model)
    if set(expected) != set(state):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise ValueError(f"adapter does not fit this model: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, layer in adapter_layers(model).items():
        for attr in layer.tensor_names:
            target, value = getattr(layer, attr), state[f"{name}.{attr}"]
            if target.shape != value.shape:
                raise ValueError(f"adapter tensor {name}.{attr} has shape {tuple(value.shape)}, "
                                 f"model expects {tuple(target.shape)}")
            target.copy_(value)
