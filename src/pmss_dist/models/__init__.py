"""torchtune decoders built from a Hugging Face ``config.json``: the table of supported families.

torchtune owns the architectures; a family module (``llama``, ``mistral``, ``qwen2``, ``gemma``)
says everything pmss_dist must know of one HF class:

- ``ARCHITECTURE``: the HF class name in ``config.json``'s ``architectures``;
- ``PERMUTED_QK``: whether q/k rows are permuted between HF's RoPE layout (halves) and torchtune's
  (interleaved pairs) on import and export;
- ``build(hf_config, **common)``: the torchtune decoder, from the fields every family shares
  (`build_decoder` reads them) and its own;
- optionally ``HF_KEYS`` (torchtune key template -> HF key template, beyond torchtune's common map)
  and ``TIED_BY_DEFAULT`` (the output shares the embedding unless ``tie_word_embeddings`` says no).

An architecture not in `FAMILIES` fails before any work is done.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import nn
from torchtune.modules import TransformerDecoder

from pmss_dist.models import gemma, llama, mistral, qwen2

# HF architecture name -> family module: the one table of what is supported.
FAMILIES: dict[str, ModuleType] = {m.ARCHITECTURE: m for m in (llama, mistral, qwen2, gemma)}


def model_family(hf_config: dict) -> ModuleType:
    archs = hf_config.get("architectures") or []
    for arch in archs:
        if arch in FAMILIES:
            return FAMILIES[arch]
    raise ValueError(f"unsupported architecture {archs or '(none given)'} in config.json; "
                     f"supported: {sorted(FAMILIES)}")


def head_dim(hf_config: dict) -> int:
    return hf_config.get("head_dim") or hf_config["hidden_size"] // hf_config["num_attention_heads"]


def tied_embeddings(hf_config: dict) -> bool:
    default = getattr(model_family(hf_config), "TIED_BY_DEFAULT", False)
    return bool(hf_config.get("tie_word_embeddings", default))


def rope_theta(hf_config: dict) -> float:
    """The RoPE base. transformers < 5 writes ``rope_theta``/``rope_scaling`` at the top level;
    5.x nests both in ``rope_parameters`` (``rope_type`` "default" meaning no scaling)."""
    params = hf_config.get("rope_parameters") or {}
    scaling = hf_config.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    if scaling:
        raise ValueError(f"config.json sets RoPE scaling {scaling}, which pmss_dist does not "
                         "support yet; use a checkpoint without RoPE scaling")
    return float(hf_config.get("rope_theta", params.get("rope_theta", 10000.0)))


def build_decoder(hf_config: dict, max_seq_len: int | None = None) -> TransformerDecoder:
    """Build the torchtune decoder that an HF ``config.json`` describes (on the current default
    device: use ``torch.device("meta")`` as a context to build without memory)."""
    family = model_family(hf_config)
    c = hf_config
    return family.build(
        c,
        vocab_size=c["vocab_size"],
        num_layers=c["num_hidden_layers"],
        num_heads=c["num_attention_heads"],
        num_kv_heads=c.get("num_key_value_heads", c["num_attention_heads"]),
        embed_dim=c["hidden_size"],
        max_seq_len=max_seq_len or c.get("max_position_embeddings", 4096),
        intermediate_dim=c["intermediate_size"],
        norm_eps=c.get("rms_norm_eps", 1e-5),
        rope_base=rope_theta(c),
    )


@torch.no_grad()
def init_rope_caches(model: nn.Module, device: torch.device) -> None:
    """RoPE caches are non-persistent buffers computed at construction: after building on the
    meta device and ``to_empty`` they hold garbage, so compute them again on ``device``."""
    with torch.device(device):
        for module in model.modules():
            if hasattr(module, "rope_init"):
                module.rope_init()
