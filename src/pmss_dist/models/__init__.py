"""torchtune decoders built from a Hugging Face ``config.json``: the table of supported families.

torchtune owns the architectures (Qwen3, which it lacks, is composed from its modules); a family
module (``llama``, ``mistral``, ``qwen2``, ``gemma``, ``phi3``, ...) says everything pmss_dist must
know of one HF class, for the build, HF import and export and the GGUF converters alike:

- ``ARCHITECTURE``, ``MODEL_TYPE``: the HF class name in ``config.json``'s ``architectures`` and
  its ``model_type``;
- ``GGUF_ARCH``: llama.cpp's ``general.architecture`` for it;
- ``PERMUTED_QK``: whether q/k rows are permuted between HF's RoPE layout (halves) and torchtune's
  (interleaved pairs) on import and export;
- ``build(spec, max_seq_len)``: the torchtune decoder of a `ModelSpec`;
- optionally ``read_fields(config, num_layers)``: its own config.json fields as `ModelSpec`
  fields (sliding windows, Gemma 2's soft caps), after refusing what it does not model;
- optionally ``HF_KEYS`` (torchtune key template -> HF key template, added to torchtune's common map
  or replacing an entry of it: Gemma 2's ``mlp_norm`` is its pre-feedforward norm)
  and ``TIED_BY_DEFAULT`` (the output shares the embedding unless ``tie_word_embeddings`` says no);
- optionally ``ROPE_SCALING``: the RoPE scaling types (config.json's ``rope_type``/``type``) its
  ``build`` implements; any other is refused by `build_decoder`;
- optionally ``FUSED`` (HF key template -> the torchtune key templates whose rows that one HF
  tensor stacks, in order): Phi-3's ``qkv_proj`` holds q, k and v. ``hf.keys`` turns it into a row
  range per torchtune parameter, which import reads, merged and full export write back into, and
  PEFT export targets as one module.

An architecture not in `FAMILIES`, or a config.json whose fields are not what they must be
(`model_spec`), fails before any work is done, with an `HFCheckpointError`.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import nn
from torchtune.modules import TransformerDecoder

from pmss_dist.errors import HFCheckpointError
from pmss_dist.models import gemma, gemma2, llama, mistral, phi3, qwen2, qwen3
from pmss_dist.models.spec import ModelSpec

# HF architecture name -> family module: the one table of what is supported.
FAMILIES: dict[str, ModuleType] = {m.ARCHITECTURE: m for m in (llama, mistral, qwen2, qwen3, gemma, gemma2, phi3)}
# The positions the RoPE caches cover when neither the caller nor config.json gives a length.
DEFAULT_MAX_SEQ_LEN = 4096


def model_spec(hf_config, where: str = "config.json") -> ModelSpec:
    """The `ModelSpec` of a config.json (read from ``where``), refusing one that is not an object,
    names no supported architecture, or whose fields are missing or not what they must be."""
    c = hf_config
    if not isinstance(c, dict):
        raise HFCheckpointError(f"{where} holds a JSON {_json_kind(c)}, not an object of fields: restore the "
                                "model's own config.json")
    archs = c.get("architectures") or []
    if not isinstance(archs, list):
        raise HFCheckpointError(f"config.json: architectures is {archs!r}, not a list of class names such as "
                                "['LlamaForCausalLM']: restore the model's own config.json")
    family = next((FAMILIES[arch] for arch in archs if arch in FAMILIES), None)
    if family is None:  # checked first: an unsupported architecture names its fields otherwise (GPT-2: n_embd)
        raise HFCheckpointError(f"unsupported architecture {archs or '(none given)'} in config.json; "
                                f"supported: {sorted(FAMILIES)}")
    return ModelSpec.from_hf_config(c, family, where)


def _json_kind(value) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


def build_decoder(spec: ModelSpec, max_seq_len: int | None = None) -> TransformerDecoder:
    """Build the torchtune decoder ``spec`` describes, with RoPE caches for ``max_seq_len``
    positions (default: config.json's context), on the current default device: use
    ``torch.device("meta")`` as a context to build without memory. A RoPE scaling the family does
    not implement (its ``ROPE_SCALING``) is refused here, the one place that says so."""
    scaling, family = spec.rope.scaling, spec.family
    supported = getattr(family, "ROPE_SCALING", ())
    if scaling is not None and scaling.kind not in supported:
        raise HFCheckpointError(f"config.json: rope_scaling type {scaling.kind!r} is not supported for "
                                f"{family.ARCHITECTURE} (supported: {list(supported) or 'none'}); use a checkpoint "
                                "without it")
    return family.build(spec, max_seq_len or spec.max_seq_len or DEFAULT_MAX_SEQ_LEN)


@torch.no_grad()
def init_rope_caches(model: nn.Module, device: torch.device) -> None:
    """RoPE caches are non-persistent buffers computed at construction: after building on the
    meta device and ``to_empty`` they hold garbage, so compute them again on ``device``."""
    with torch.device(device):
        for module in model.modules():
            if hasattr(module, "rope_init"):
                module.rope_init()
