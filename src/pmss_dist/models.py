"""torchtune decoders built from a Hugging Face ``config.json``.

torchtune owns the architectures; this module only maps HF config fields onto its builders
and names the families we support, so that an unknown one fails before any work is done.
"""

from __future__ import annotations

import torch
from torch import nn
from torchtune.models.gemma import gemma
from torchtune.models.llama3 import llama3
from torchtune.models.mistral import mistral
from torchtune.models.qwen2 import qwen2
from torchtune.modules import TiedLinear, TransformerDecoder

# HF architecture name -> family. Families differ in builder and in q/k RoPE layout.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "GemmaForCausalLM": "gemma",
}
# Families whose HF checkpoints rotate halves while torchtune rotates interleaved pairs:
# their q/k weights are permuted on import and back on export. Qwen2 in torchtune keeps HF's layout.
PERMUTED_QK_FAMILIES = {"llama", "mistral", "gemma"}


def model_family(hf_config: dict) -> str:
    archs = hf_config.get("architectures") or []
    for arch in archs:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    raise ValueError(f"unsupported architecture {archs or '(none given)'} in config.json; "
                     f"supported: {sorted(ARCHITECTURES)}")


def head_dim(hf_config: dict) -> int:
    return hf_config.get("head_dim") or hf_config["hidden_size"] // hf_config["num_attention_heads"]


def rope_theta(hf_config: dict) -> float:
    """The RoPE base. transformers < 5 writes ``rope_theta``/``rope_scaling`` at the top level;
    5.x nests both in ``rope_parameters`` (``rope_type`` "default" meaning no scaling)."""
    params = hf_config.get("rope_parameters") or {}
    scaling = hf_config.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    if scaling:
        raise ValueError(f"config.json sets RoPE scaling {scaling}, which pmss_dist does not "
                         "support yet; use a checkpoint without RoPE scaling")
    return float(hf_config.get("rope_theta", params.get("rope_theta", 10000.0)))


def build_model(hf_config: dict, max_seq_len: int | None = None) -> TransformerDecoder:
    """Build the torchtune decoder that an HF ``config.json`` describes (on the current default
    device: use ``torch.device("meta")`` as a context to build without memory)."""
    family = model_family(hf_config)
    c = hf_config
    rope_base = rope_theta(c)
    common = dict(
        vocab_size=c["vocab_size"],
        num_layers=c["num_hidden_layers"],
        num_heads=c["num_attention_heads"],
        num_kv_heads=c.get("num_key_value_heads", c["num_attention_heads"]),
        embed_dim=c["hidden_size"],
        max_seq_len=max_seq_len or c.get("max_position_embeddings", 4096),
        intermediate_dim=c["intermediate_size"],
        norm_eps=c.get("rms_norm_eps", 1e-5),
    )
    if family == "llama":
        model = llama3(**common, rope_base=rope_base)
        if c.get("tie_word_embeddings", False):
            del model.output  # a registered nn.Linear; TiedLinear is a plain callable
            model.output = TiedLinear(model.tok_embeddings)
    elif family == "mistral":
        model = mistral(**common, rope_base=rope_base)
    elif family == "qwen2":
        model = qwen2(**common, rope_base=rope_base, tie_word_embeddings=c.get("tie_word_embeddings", False))
    else:  # gemma: always tied, explicit head_dim
        model = gemma(**common, head_dim=head_dim(c), rope_base=rope_base)
    return model


def has_tied_output(model: nn.Module) -> bool:
    return isinstance(model.output, TiedLinear)


@torch.no_grad()
def init_rope_caches(model: nn.Module, device: torch.device) -> None:
    """RoPE caches are non-persistent buffers computed at construction: after building on the
    meta device and ``to_empty`` they hold garbage, so compute them again on ``device``."""
    with torch.device(device):
        for module in model.modules():
            if hasattr(module, "rope_init"):
                module.rope_init()
