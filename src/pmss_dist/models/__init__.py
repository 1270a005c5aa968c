"""torchtune decoders built from a Hugging Face ``config.json``: the table of supported families.

torchtune owns the architectures (Qwen3, which it lacks, is composed from its modules); a family
module (``llama``, ``mistral``, ``qwen2``, ``gemma``, ``phi3``, ...) says everything pmss_dist must
know of one HF class:

- ``ARCHITECTURE``: the HF class name in ``config.json``'s ``architectures``;
- ``PERMUTED_QK``: whether q/k rows are permuted between HF's RoPE layout (halves) and torchtune's
  (interleaved pairs) on import and export;
- ``build(hf_config, **common)``: the torchtune decoder, from the fields every family shares
  (`build_decoder` reads them) and its own;
- optionally ``HF_KEYS`` (torchtune key template -> HF key template, added to torchtune's common map
  or replacing an entry of it: Gemma 2's ``mlp_norm`` is its pre-feedforward norm)
  and ``TIED_BY_DEFAULT`` (the output shares the embedding unless ``tie_word_embeddings`` says no);
- optionally ``ROPE_SCALING``: the RoPE scaling types (config.json's ``rope_type``/``type``) its
  ``build`` implements; any other is refused by `rope_scaling`;
- optionally ``FUSED`` (HF key template -> the torchtune key templates whose rows that one HF
  tensor stacks, in order): Phi-3's ``qkv_proj`` holds q, k and v. ``hf.keys`` turns it into a row
  range per torchtune parameter, which import reads, merged and full export write back into, and
  PEFT export targets as one module.

An architecture not in `FAMILIES`, or a config.json whose shared fields are not what they must be
(`check_hf_config`), fails before any work is done, with an `HFCheckpointError`.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import nn
from torchtune.modules import TransformerDecoder

from pmss_dist.errors import HFCheckpointError
from pmss_dist.models import gemma, gemma2, llama, mistral, phi3, qwen2, qwen3

# HF architecture name -> family module: the one table of what is supported.
FAMILIES: dict[str, ModuleType] = {m.ARCHITECTURE: m for m in (llama, mistral, qwen2, qwen3, gemma, gemma2, phi3)}


def model_family(hf_config: dict) -> ModuleType:
    archs = hf_config.get("architectures") or []
    if not isinstance(archs, list):
        raise HFCheckpointError(f"config.json: architectures is {archs!r}, not a list of class names such as "
                                "['LlamaForCausalLM']: restore the model's own config.json")
    for arch in archs:
        if arch in FAMILIES:
            return FAMILIES[arch]
    raise HFCheckpointError(f"unsupported architecture {archs or '(none given)'} in config.json; "
                            f"supported: {sorted(FAMILIES)}")


# The config.json fields every family's build reads, by what each must be; the sizes and head
# counts of the first group are required.
_COUNTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_OPTIONAL_COUNTS = ("num_key_value_heads", "head_dim", "max_position_embeddings")
_OPTIONAL_OBJECTS = ("rope_scaling", "rope_parameters")


def check_hf_config(hf_config, where: str = "config.json") -> None:
    """Refuse a config.json (read from ``where``) that is not an object, names no supported
    architecture, or whose shared fields are missing or not what they must be: sizes and head
    counts positive integers, the norm eps and RoPE base positive numbers, the heads a whole
    number of KV groups and, when head_dim is derived, hidden_size a whole number of heads.
    torch would otherwise fail deep in the build, or build a model with no weights to match."""
    c = hf_config
    if not isinstance(c, dict):
        raise HFCheckpointError(f"{where} holds a JSON {_json_kind(c)}, not an object of fields: restore the "
                                "model's own config.json")
    model_family(c)  # an unsupported architecture names its fields otherwise (GPT-2: n_embd)
    fix = "set it to the model's own value"
    for field in _COUNTS:
        if field not in c:
            raise HFCheckpointError(f"{where} has no {field}: {fix}")
    for field in (*_COUNTS, *_OPTIONAL_COUNTS):
        value = c.get(field)
        if (value is not None or field in _COUNTS) and not _is_count(value):
            raise HFCheckpointError(f"{where}: {field}={value!r} is not a positive integer: {fix}")
    for field in _OPTIONAL_OBJECTS:
        if c.get(field) is not None and not isinstance(c[field], dict):
            raise HFCheckpointError(f"{where}: {field}={c[field]!r} is not an object: {fix}")
    theta_field = "rope_theta" if "rope_theta" in c else "rope_parameters.rope_theta"
    for field, value in (("rms_norm_eps", c.get("rms_norm_eps")), (theta_field, _declared_theta(c))):
        if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
            raise HFCheckpointError(f"{where}: {field}={value!r} is not a positive number: {fix}")
    heads, kv_heads = c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"]
    if heads % kv_heads:
        raise HFCheckpointError(f"{where}: num_attention_heads={heads} is not a multiple of num_key_value_heads="
                                f"{kv_heads}: set them to the model's own values")
    if not c.get("head_dim") and c["hidden_size"] % heads:
        raise HFCheckpointError(f"{where}: hidden_size={c['hidden_size']} is not a multiple of num_attention_heads="
                                f"{heads}, and there is no head_dim: set them to the model's own values")


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _json_kind(value) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


def head_dim(hf_config: dict) -> int:
    return hf_config.get("head_dim") or hf_config["hidden_size"] // hf_config["num_attention_heads"]


# The config.json fields that set a parameter's shape, by the parameter's module (its name's last
# part before weight/bias/scale); anything else (the norms) is hidden_size wide.
_SHAPE_FIELDS = {
    "tok_embeddings": ("vocab_size", "hidden_size"), "output": ("vocab_size", "hidden_size"),
    "q_proj": ("num_attention_heads", "head_dim", "hidden_size"),
    "output_proj": ("num_attention_heads", "head_dim", "hidden_size"),
    "k_proj": ("num_key_value_heads", "head_dim", "hidden_size"),
    "v_proj": ("num_key_value_heads", "head_dim", "hidden_size"),
    "q_norm": ("head_dim",), "k_norm": ("head_dim",),
    "w1": ("intermediate_size", "hidden_size"), "w2": ("intermediate_size", "hidden_size"),
    "w3": ("intermediate_size", "hidden_size"),
}


def shape_fields(tune_name: str, hf_config: dict) -> str:
    """``"num_key_value_heads=2, head_dim=8, hidden_size=32"``: the config.json fields, with the
    values the model was built from, that set the shape of parameter ``tune_name``."""
    parts = tune_name.split(".")
    module = parts[-2] if len(parts) >= 2 else parts[0]
    c = hf_config
    derived = "" if c.get("head_dim") else f" (hidden_size/num_attention_heads = {c['hidden_size']}/{c['num_attention_heads']})"
    values = {**c, "head_dim": f"{head_dim(c)}{derived}",
              "num_key_value_heads": c.get("num_key_value_heads", c["num_attention_heads"])}
    return ", ".join(f"{field}={values.get(field)}" for field in _SHAPE_FIELDS.get(module, ("hidden_size",)))


def check_head_dim_derived(hf_config: dict, builder: str) -> None:
    """Refuse an explicit ``head_dim`` other than hidden_size / num_attention_heads, for torchtune
    builders that derive it (llama3, mistral): their model would not be the checkpoint's."""
    c = hf_config
    if c.get("head_dim") and c["head_dim"] != c["hidden_size"] // c["num_attention_heads"]:
        raise HFCheckpointError(f"config.json: head_dim={c['head_dim']} differs from hidden_size/num_attention_heads "
                                f"({c['hidden_size']}/{c['num_attention_heads']}), which torchtune's {builder} builder "
                                f"assumes for {model_family(c).ARCHITECTURE}; such checkpoints (e.g. Mistral-Nemo) are "
                                f"not supported")


def tied_embeddings(hf_config: dict) -> bool:
    default = getattr(model_family(hf_config), "TIED_BY_DEFAULT", False)
    return bool(hf_config.get("tie_word_embeddings", default))


def declared_rope_scaling(hf_config: dict) -> dict | None:
    """The RoPE scaling config.json states, its type under ``"rope_type"``, whether or not a family
    here implements it; ``None`` for plain RoPE (see `rope_scaling` for the two layouts)."""
    scaling = hf_config.get("rope_scaling") or hf_config.get("rope_parameters") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    return None if kind == "default" else {**scaling, "rope_type": kind}


def rope_scaling(hf_config: dict) -> dict | None:
    """The RoPE scaling config.json asks for, its type under ``"rope_type"``; ``None`` for plain
    RoPE. transformers < 5 writes ``rope_scaling`` (type under ``type`` or ``rope_type``) at the top
    level; 5.x nests it in ``rope_parameters`` (``rope_type`` "default" meaning no scaling). A type
    the family does not implement (its ``ROPE_SCALING``) is refused here, the one place that says so."""
    scaling = declared_rope_scaling(hf_config)
    if scaling is None:
        return None
    kind = scaling["rope_type"]
    family = model_family(hf_config)
    supported = getattr(family, "ROPE_SCALING", ())
    if kind not in supported:
        raise HFCheckpointError(f"config.json: rope_scaling type {kind!r} is not supported for {family.ARCHITECTURE} "
                                f"(supported: {list(supported) or 'none'}); use a checkpoint without it")
    return {**scaling, "rope_type": kind}


def rope_theta(hf_config: dict) -> float:
    """The RoPE base: top-level ``rope_theta`` (transformers < 5) or ``rope_parameters.rope_theta``
    (5.x). Scaling, if any, is refused or returned by `rope_scaling`, which this checks first."""
    rope_scaling(hf_config)
    return declared_rope_theta(hf_config)


def declared_rope_theta(hf_config: dict) -> float:
    """The RoPE base config.json states (either layout), without `rope_scaling`'s check."""
    theta = _declared_theta(hf_config)
    return 10000.0 if theta is None else float(theta)


def _declared_theta(hf_config: dict):
    """config.json's RoPE base as written, in either layout; None when it gives none."""
    params = hf_config.get("rope_parameters") or {}
    return hf_config.get("rope_theta", params.get("rope_theta"))


def build_decoder(hf_config: dict, max_seq_len: int | None = None) -> TransformerDecoder:
    """Build the torchtune decoder that an HF ``config.json`` describes (on the current default
    device: use ``torch.device("meta")`` as a context to build without memory)."""
    check_hf_config(hf_config)
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
