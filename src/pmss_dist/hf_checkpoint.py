"""Hugging Face checkpoint directories in: each rank reads only the rows of its own shards.

Tensors are memory-mapped through ``safetensors`` (never unpickled) and sliced before they are
copied, so a rank's peak memory is its shards plus one slice. Keys follow torchtune's HF map;
q/k rows are permuted between HF's half-split RoPE and torchtune's interleaved one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from torch.distributed.tensor import DTensor, Shard
from torchtune.models.convert_weights import _FROM_HF

from pmss_dist.models import PERMUTED_QK_FAMILIES, head_dim, model_family

# torchtune key (with "{}" for the layer) -> HF key. Built from torchtune's own map.
TUNE_TO_HF = {tune: hf for hf, tune in _FROM_HF.items() if tune is not None}
# Families whose attention projections carry biases (Qwen2's q/k/v).
_BIAS_KEYS = {"layers.{}.attn.q_proj.bias": "model.layers.{}.self_attn.q_proj.bias",
              "layers.{}.attn.k_proj.bias": "model.layers.{}.self_attn.k_proj.bias",
              "layers.{}.attn.v_proj.bias": "model.layers.{}.self_attn.v_proj.bias"}
TUNE_TO_HF.update(_BIAS_KEYS)


def read_hf_config(ckpt_dir: str | Path) -> dict:
    path = Path(ckpt_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: model.path must be an HF checkpoint directory "
                                "with config.json and *.safetensors")
    with open(path) as f:
        return json.load(f)


def tune_key_to_hf(key: str) -> str:
    """``layers.3.attn.q_proj.weight`` -> ``model.layers.3.self_attn.q_proj.weight``."""
    parts = key.split(".")
    layer = next((p for p in parts if p.isdigit()), None)
    template = key.replace(f".{layer}.", ".{}.", 1) if layer is not None else key
    if template not in TUNE_TO_HF:
        raise KeyError(f"no Hugging Face name for parameter {key!r}: export would drop it")
    hf = TUNE_TO_HF[template]
    return hf.format(layer) if layer is not None else hf


def weight_files(ckpt_dir: str | Path) -> dict[str, Path]:
    """HF key -> the safetensors file holding it (single file or sharded with an index)."""
    ckpt_dir = Path(ckpt_dir)
    index = ckpt_dir / "model.safetensors.index.json"
    if index.is_file():
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = {key: ckpt_dir / name for key, name in weight_map.items()}
    elif (ckpt_dir / "model.safetensors").is_file():
        path = ckpt_dir / "model.safetensors"
        with _open(path) as f:
            files = {key: path for key in f.keys()}
    else:
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {ckpt_dir}")
    for path in set(files.values()):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is listed in the index but missing")
    return files


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as err:  # safetensors raises its own error types for short/corrupt files
        raise ValueError(f"cannot read {path}: {err} (truncated or not a safetensors file?)") from err


def qk_row_permutation(n_heads: int, hd: int) -> torch.Tensor:
    """``perm[t]`` is the HF row that becomes torchtune row ``t`` (interleaved RoPE pairs)."""
    return torch.arange(n_heads * hd).view(n_heads, 2, hd // 2).transpose(1, 2).reshape(-1)


def _row_range(param: torch.Tensor) -> tuple[int, int]:
    """The global rows this rank holds: DTensor ``Shard(0)`` splits like ``torch.chunk``."""
    if not isinstance(param, DTensor):
        return 0, param.shape[0] if param.dim() else 0
    (placement,) = param.placements
    assert isinstance(placement, Shard) and placement.dim == 0, f"unexpected placement {placement}"
    n, world = param.shape[0], param.device_mesh.size()
    chunk = math.ceil(n / world)
    start = min(param.device_mesh.get_local_rank() * chunk, n)
    stop = min(start + chunk, n)
    assert param.to_local().shape[0] == stop - start, "DTensor shard layout differs from torch.chunk"
    return start, stop


def _permutations(hf_config: dict) -> dict[str, torch.Tensor]:
    if model_family(hf_config) not in PERMUTED_QK_FAMILIES:
        return {}
    hd = head_dim(hf_config)
    n_heads = hf_config["num_attention_heads"]
    n_kv = hf_config.get("num_key_value_heads", n_heads)
    return {"q_proj": qk_row_permutation(n_heads, hd), "k_proj": qk_row_permutation(n_kv, hd)}


def _local_tensor(param: torch.Tensor) -> torch.Tensor:
    return param.to_local() if isinstance(param, DTensor) else param


def model_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Frozen base tensors by their plain torchtune name (wrapper prefixes removed)."""
    out = {}
    for name, p in model.named_parameters():
        name = name.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", "")
        out[name] = p
    return out


@torch.no_grad()
def load_hf_weights(model: nn.Module, ckpt_dir: str | Path, hf_config: dict) -> None:
    """Copy the base weights of ``ckpt_dir`` into ``model``'s frozen parameters, each rank
    reading only the rows it owns. Adapter tensors (cores, LoRA factors) are left alone."""
    files = weight_files(ckpt_dir)
    perms = _permutations(hf_config)
    handles: dict[Path, object] = {}
    try:
        for name, param in model_parameters(model).items():
            if param.requires_grad:
                continue  # adapters: initialised by reset_adapters, not read from the base
            hf_key = tune_key_to_hf(name)
            if hf_key not in files:
                raise KeyError(f"{ckpt_dir}: parameter {hf_key} (for {name}) is missing from the checkpoint")
            path = files[hf_key]
            if path not in handles:
                handles[path] = _open(path)
            try:
                sliced = handles[path].get_slice(hf_key)
                start, stop = _row_range(param)
                perm = perms.get(name.split(".")[-2]) if name.endswith("_proj.weight") else None
                if perm is not None:
                    rows = perm[start:stop]
                    lo = int(rows.min()) if rows.numel() else 0
                    hi = int(rows.max()) + 1 if rows.numel() else 0
                    block = sliced[lo:hi]
                    value = block[rows - lo] if rows.numel() else block[:0]
                else:
                    value = sliced[start:stop]
            except Exception as err:
                raise ValueError(f"cannot read {hf_key} from {path}: {err}") from err
            local = _local_tensor(param)
            if tuple(value.shape) != tuple(local.shape):
                raise ValueError(f"{path}: {hf_key} has shape {tuple(value.shape)} for this rank's slice, "
                                 f"model expects {tuple(local.shape)}: config.json does not match the weights")
            local.copy_(value.to(local.dtype))
    finally:
        handles.clear()
