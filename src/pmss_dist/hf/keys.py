"""Names and row orders between Hugging Face checkpoints and torchtune models.

Keys follow torchtune's HF map, checked in both directions (`match_keys`): every base parameter
of the model must be found in the checkpoint, and every tensor of the checkpoint must land in
the model (a Llama saved with ``attention_bias`` would otherwise lose its biases without a
word). q/k rows are permuted between HF's half-split RoPE and torchtune's interleaved one for
the families that need it; any row index chosen on a permuted weight maps back through it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torchtune.models.convert_weights import _FROM_HF

from pmss_dist.models import head_dim, model_family, tied_embeddings

# torchtune key (with "{}" for the layer) -> HF key, shared by every family: torchtune's own map.
# A family module adds its own keys in ``HF_KEYS`` (Qwen2's q/k/v biases, ...).
COMMON_KEYS = {tune: hf for hf, tune in _FROM_HF.items() if tune is not None}
# Checkpoint tensors that hold nothing the model needs (old Llama saves carry RoPE frequencies).
_DERIVED_HF_KEYS = {hf for hf, tune in _FROM_HF.items() if tune is None}


def _template(key: str) -> tuple[str, str | None]:
    """``layers.3.attn.q_proj.weight`` -> (``layers.{}.attn.q_proj.weight``, ``"3"``)."""
    layer = next((p for p in key.split(".") if p.isdigit()), None)
    return (key.replace(f".{layer}.", ".{}.", 1) if layer is not None else key), layer


def key_map(hf_config: dict) -> dict[str, str]:
    """torchtune key template -> HF key template for the family ``hf_config`` describes."""
    return {**COMMON_KEYS, **getattr(model_family(hf_config), "HF_KEYS", {})}


def tune_key_to_hf(key: str, hf_config: dict) -> str:
    """``layers.3.attn.q_proj.weight`` -> ``model.layers.3.self_attn.q_proj.weight``."""
    template, layer = _template(key)
    keys = key_map(hf_config)
    if template not in keys:
        raise KeyError(f"no Hugging Face name for parameter {key!r}: export would drop it")
    return keys[template].format(layer)


def qk_row_permutation(n_heads: int, hd: int) -> torch.Tensor:
    """``perm[t]`` is the HF row that becomes torchtune row ``t`` (interleaved RoPE pairs)."""
    return torch.arange(n_heads * hd).view(n_heads, 2, hd // 2).transpose(1, 2).reshape(-1)


def row_permutations(hf_config: dict) -> dict[str, torch.Tensor]:
    """``{"q_proj": perm, "k_proj": perm}`` for families whose q/k rows are permuted, else ``{}``."""
    if not model_family(hf_config).PERMUTED_QK:
        return {}
    hd = head_dim(hf_config)
    n_heads = hf_config["num_attention_heads"]
    n_kv = hf_config.get("num_key_value_heads", n_heads)
    return {"q_proj": qk_row_permutation(n_heads, hd), "k_proj": qk_row_permutation(n_kv, hd)}


def permutation_for(tune_key: str, perms: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The row permutation of a q/k weight (``layers.0.attn.q_proj.weight``), else ``None``."""
    parts = tune_key.split(".")
    return perms.get(parts[-2]) if len(parts) >= 2 and parts[-1] == "weight" else None


def match_keys(tune_names, files: dict[str, Path], hf_config: dict, ckpt_dir: Path) -> dict[str, str]:
    """``{torchtune name: HF key}`` for every base parameter; fails naming the first parameter
    the checkpoint lacks or the first checkpoint tensor the model has no place for."""
    pairs = {name: tune_key_to_hf(name, hf_config) for name in tune_names}
    missing = [f"{hf} (for {name})" for name, hf in pairs.items() if hf not in files]
    if missing:
        raise KeyError(f"{ckpt_dir}: checkpoint lacks {len(missing)} tensor(s) the model needs, "
                       f"e.g. {missing[:3]}: config.json does not describe these weights")
    used = set(pairs.values())
    unused = [k for k in files if k not in used and _template(k)[0] not in _DERIVED_HF_KEYS
              and not (k == "lm_head.weight" and tied_embeddings(hf_config))]
    if unused:
        where = files[unused[0]]
        raise ValueError(f"{where}: tensor(s) {unused[:3]} have no place in the {model_family(hf_config).ARCHITECTURE} "
                         f"model that config.json describes (e.g. attention_bias/mlp_bias, which the "
                         f"torchtune builder lacks); refusing to drop them")
    return pairs
