"""GGUF (llama.cpp) file -> Hugging Face checkpoint directory.

Writes ``config.json``, ``model.safetensors`` (float32), ``tokenizer.json`` and
``tokenizer_config.json`` so the result loads with ``transformers`` and with this library's
``hf_checkpoint`` reader. The architectures handled are the dense decoders in `ARCHITECTURES`
(llama, qwen2, qwen3, gemma, gemma2, phi3), each described by one table: its family (in
`pmss_dist.models`: the HF class, ``model_type``, llama.cpp's name for it, the tensors its
checkpoints hold), what llama.cpp's ``convert_hf_to_gguf.py`` did to the values, its config
fields and its RoPE scalings (`ROPE_SCALINGS`). Anything else fails with a clear error rather
than producing a checkpoint that loads but computes something else.

What llama.cpp changes on the way in, and is undone here (per architecture in its table):

* llama: q/k projection rows permuted from HF's half-split RoPE layout to GGML's interleaved one
  (``LlamaModel.permute``); ``unpermute_qk`` inverts it. Llama 3.1+ RoPE scaling is stored as a
  ``rope_freqs`` tensor of per-frequency divisors; ``llama3_rope_scaling`` recovers the
  config.json parameters from it.
* gemma, gemma2: every ``*norm.weight`` is stored as ``1 + w`` (Gemma's RMSNorm multiplies by
  ``1 + w``); the 1 is subtracted. Gemma 2's query scale is llama.cpp's rule, not stated in the file.
* phi3: q/k/v and gate/up stay fused, as in HF; LongRoPE factors are stored as
  ``rope_factors_long``/``rope_factors_short`` tensors and go back into ``rope_scaling``.
* everything: weights are block-quantised; ``dequantize`` expands F32/F16/BF16/Q8_0/Q4_0/Q4_1.

The ``gguf`` package (gguf-py) is only used to parse the container; dequantisation is our own.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import numpy as np

from pmss_dist.hf.keys import key_map
from pmss_dist.models import gemma, gemma2, llama, phi3, qwen2, qwen3

SUPPORTED_TOKENIZER_MODELS = ("gpt2", "llama")

# ggml type name -> (elements per block, bytes per block). Values are ggml's, fixed by the format.
BLOCK_LAYOUT = {
    "F32": (1, 4),
    "F16": (1, 2),
    "BF16": (1, 2),
    "Q8_0": (32, 2 + 32),      # fp16 scale d, 32 x int8
    "Q4_0": (32, 2 + 16),      # fp16 scale d, 32 x 4-bit packed in 16 bytes
    "Q4_1": (32, 2 + 2 + 16),  # fp16 scale d, fp16 min m, 32 x 4-bit
}
SUPPORTED_TENSOR_TYPES = tuple(BLOCK_LAYOUT)

Progress = Callable[[str], None]


# ---------------------------------------------------------------------------------------------
# Dequantisation
# ---------------------------------------------------------------------------------------------

def _fp16(column_bytes: np.ndarray) -> np.ndarray:
    """(n_blocks, 2) uint8 -> (n_blocks, 1) float32, reading a little-endian fp16 per block."""
    return np.ascontiguousarray(column_bytes).view("<f2").astype(np.float32)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """(n_blocks, 16) packed bytes -> (n_blocks, 32) values 0..15: low nibbles are elements 0..15,
    high nibbles 16..31 (ggml's block layout, not byte-interleaved)."""
    return np.concatenate([packed & 0x0F, packed >> 4], axis=1)


def dequantize(raw: np.ndarray, type_name: str, n_elements: int, tensor_name: str = "?") -> np.ndarray:
    """Raw GGUF tensor bytes -> flat float32 array of ``n_elements`` values (GGUF element order)."""
    if type_name not in BLOCK_LAYOUT:
        raise ValueError(f"tensor {tensor_name!r} has GGML type {type_name}, which this converter "
                         f"cannot dequantise (supported: {', '.join(SUPPORTED_TENSOR_TYPES)}); "
                         "re-quantise the model to one of those with llama.cpp's llama-quantize")
    block_elems, block_bytes = BLOCK_LAYOUT[type_name]
    data = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    if n_elements % block_elems or data.size != n_elements // block_elems * block_bytes:
        raise ValueError(f"tensor {tensor_name!r}: {data.size} bytes do not hold {n_elements} "
                         f"{type_name} values; the file is truncated or corrupt")

    if type_name == "F32":
        return data.view("<f4").astype(np.float32)
    if type_name == "F16":
        return data.view("<f2").astype(np.float32)
    if type_name == "BF16":
        # bf16 is the top half of an fp32: shift the 16 bits up and reinterpret.
        return (data.view("<u2").astype(np.uint32) << 16).view(np.float32)

    blocks = data.reshape(-1, block_bytes)
    d = _fp16(blocks[:, 0:2])
    if type_name == "Q8_0":
        q = blocks[:, 2:].view(np.int8).astype(np.float32)
        out = d * q
    elif type_name == "Q4_0":
        q = _nibbles(blocks[:, 2:]).astype(np.int8) - np.int8(8)
        out = d * q.astype(np.float32)
    else:  # Q4_1
        m = _fp16(blocks[:, 2:4])
        out = d * _nibbles(blocks[:, 4:]).astype(np.float32) + m
    return out.reshape(-1)


def unpermute_qk(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Invert llama.cpp's q/k row permutation (GGML interleaved RoPE -> HF half-split RoPE).

    llama.cpp does ``w.reshape(n_head, 2, hd // 2, dim).swapaxes(1, 2)``; swapping the same two
    axes back on the (n_head, hd // 2, 2, dim) view restores HF's order. ``n_head`` is the
    number of query heads for q and of key/value heads for k. Works on biases (1-D) too.
    """
    rows = weight.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"cannot unpermute {rows} rows into {n_head} heads of even size")
    w = weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:])
    return w.swapaxes(1, 2).reshape(weight.shape)


# ---------------------------------------------------------------------------------------------
# Architectures: one table each
# ---------------------------------------------------------------------------------------------

REQUIRED = object()  # a field the file must state
OMIT = object()      # a field left out of config.json when the file does not state it

# HF config key -> (GGUF key under "{arch}.", default). Every architecture reads these the same way.
COMMON_FIELDS = {
    "num_hidden_layers": ("block_count", REQUIRED),
    "hidden_size": ("embedding_length", REQUIRED),
    "intermediate_size": ("feed_forward_length", REQUIRED),
    "num_attention_heads": ("attention.head_count", REQUIRED),
    "max_position_embeddings": ("context_length", REQUIRED),
    "rms_norm_eps": ("attention.layer_norm_rms_epsilon", REQUIRED),
    "rope_theta": ("rope.freq_base", 10000.0),  # llama.cpp's default; Gemma files never state it
}

# llama.cpp's name of each tensor, by the torchtune module it holds: a family's HF name for that
# module is its `hf.keys.key_map`'s, so its GGUF tensors are the ones its HF checkpoints hold.
# Global tensors (``output`` is absent when the head is tied to the embedding):
GGUF_GLOBALS = {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output"}
# Per-layer leaves, ``blk.{i}.LEAF.weight`` (and ``.bias`` where the family has one):
GGUF_LEAVES = {
    "sa_norm": "attn_norm", "attn.q_proj": "attn_q", "attn.k_proj": "attn_k", "attn.v_proj": "attn_v",
    "attn.output_proj": "attn_output", "attn.q_norm": "attn_q_norm", "attn.k_norm": "attn_k_norm",
    "sa_scale": "post_attention_norm", "mlp_norm": "ffn_norm", "mlp_scale": "post_ffw_norm",
    "mlp.w1": "ffn_gate", "mlp.w3": "ffn_up", "mlp.w2": "ffn_down",
}
# A fused HF tensor (a family's ``FUSED``), which llama.cpp keeps fused, by its first part.
GGUF_FUSED_LEAVES = {"attn.q_proj": "attn_qkv", "mlp.w1": "ffn_up"}


@dataclass(frozen=True)
class Shape:
    """The attention geometry every architecture states the same way."""
    n_layer: int
    dim: int
    n_head: int
    n_head_kv: int
    head_dim: int
    rope_dims: int


@dataclass
class Facts:
    """What a config builder may read: the metadata, the tensor shapes (numpy order, by GGUF
    name) and the values of the small tensors that describe RoPE scaling."""
    arch: "Architecture"
    meta: dict
    shapes: dict[str, tuple[int, ...]]
    rope_tensors: dict[str, np.ndarray]
    shape: Shape = None  # filled in by `read_shape`

    def key(self, name: str) -> str:
        return f"{self.arch.name}.{name}"

    def get(self, name: str, default=REQUIRED):
        full = self.key(name)
        if full in self.meta:
            return self.meta[full]
        if default is REQUIRED:
            raise ValueError(f"GGUF metadata lacks {full!r}, which a {self.arch.name} model needs; "
                             "is this a complete llama.cpp model file? Re-convert it with llama.cpp's "
                             "convert_hf_to_gguf.py")
        return default


@dataclass(frozen=True)
class Architecture:
    """Everything the converter knows about one ``general.architecture``: its family's facts
    (`pmss_dist.models`) and what llama.cpp does with them."""
    family: ModuleType             # the pmss_dist.models family read back from it
    tied_only: bool = False        # llama.cpp ties the head to the embedding whatever the file holds
    # llama.cpp permuted attn_q/attn_k rows (LlamaModel.permute): its own layout, not torchtune's
    # (the family's PERMUTED_QK), which also interleaves Gemma's
    permute_qk: bool = False
    norm_offset: float = 0.0       # llama.cpp stored HF's ``*norm.weight`` + this
    head_dim_in_config: bool = True   # config.json has head_dim; else it must be hidden/heads
    partial_rotary: bool = False   # rope.dimension_count < head dim is expressible (phi3)
    fields: dict[str, tuple[str, Any]] = field(default_factory=dict)  # on top of COMMON_FIELDS
    constants: dict[str, Any] = field(default_factory=dict)           # fixed config.json values
    derived: Callable[[Facts], dict] = lambda facts: {}               # fields computed from several facts
    rope_scalings: tuple[str, ...] = ("linear",)  # config.json RoPE scaling types (`ROPE_SCALINGS`)
    sentencepiece: str = "llama"   # how transformers builds this family's SentencePiece tokenizer

    @property
    def name(self) -> str:  # general.architecture
        return self.family.GGUF_ARCH

    @property
    def hf_class(self) -> str:  # config.json "architectures"
        return self.family.ARCHITECTURE

    @property
    def model_type(self) -> str:
        return self.family.MODEL_TYPE

    @property
    def rope_tensors(self) -> tuple[str, ...]:
        """Global tensors that describe RoPE scaling: read into config.json, not written."""
        return tuple(name for kind in self.rope_scalings for name in ROPE_SCALINGS[kind][0])

    @cached_property
    def global_tensors(self) -> dict[str, str]:
        """GGUF global tensor -> HF module."""
        return {GGUF_GLOBALS[tune.rsplit(".", 1)[0]]: hf.rsplit(".", 1)[0]
                for tune, hf in key_map(self.family).items() if not tune.startswith("layers.")}

    @cached_property
    def layer(self) -> dict[str, str]:
        """Per-layer GGUF leaf -> HF module under ``model.layers.{i}``."""
        return {leaf: hf_module for leaf, (hf_module, suffix) in self._layer_tensors if suffix == "weight"}

    @cached_property
    def biases(self) -> tuple[str, ...]:
        """The leaves whose ``.bias`` tensor the family always has."""
        return tuple(leaf for leaf, (_, suffix) in self._layer_tensors if suffix == "bias")

    @cached_property
    def _layer_tensors(self) -> list[tuple[str, tuple[str, str]]]:
        """``(GGUF leaf, (HF module, "weight" or "bias"))`` for each layer tensor of the family."""
        fused = getattr(self.family, "FUSED", {})
        out = []
        for tune, hf in key_map(self.family).items():
            if not tune.startswith("layers."):
                continue
            module = tune.removeprefix("layers.{}.").rsplit(".", 1)[0]
            if hf in fused and tune != fused[hf][0]:
                continue  # a later part of a fused tensor: the tensor is named by its first
            leaf = GGUF_FUSED_LEAVES[module] if hf in fused else GGUF_LEAVES[module]
            hf_module, suffix = hf.removeprefix("model.layers.{}.").rsplit(".", 1)
            out.append((leaf, (hf_module, suffix)))
        return out


def _decimal(value: float) -> float:
    """A float32 metadata value as the short decimal it was written from (1e-05, not
    9.999999747378752e-06); float32 is how GGUF stores them, and both round to the same float32."""
    value = float(value)
    as_f32 = np.float32(value)
    return float(str(as_f32)) if float(as_f32) == value else value


def _llama_cpp_rope_freqs(factor: float, low: float, high: float, original: float, base: float,
                          dims: int) -> np.ndarray:
    """llama.cpp's ``rope_freqs`` for HF llama3 parameters (convert_hf_to_gguf.py
    ``LlamaModel.generate_extra_tensors``), in float32 as it computes them."""
    freqs = 1.0 / (np.float32(base) ** (np.arange(0, dims, 2, dtype=np.float32) / np.float32(dims)))
    wavelen = np.float32(2 * math.pi) / freqs
    smooth = (np.float32(original) / wavelen - np.float32(low)) / np.float32(high - low)
    middle = np.float32(1) / ((1 - smooth) / np.float32(factor) + smooth)
    return np.where(wavelen < original / high, np.float32(1),
                    np.where(wavelen > original / low, np.float32(factor), middle)).astype(np.float32)


def llama3_rope_scaling(rope_freqs: np.ndarray, base: float, dims: int) -> dict | None:
    """HF ``rope_scaling`` of type llama3 from llama.cpp's ``rope_freqs`` tensor.

    llama.cpp stores one divisor per rotary frequency: 1 above the high-frequency cut, ``factor``
    below the low-frequency one, and ``1 / ((1 - s) / factor + s)`` in between, with
    ``s = (original / wavelength - low) / (high - low)``. ``factor`` is the last divisor; ``s`` is
    linear in 1 / wavelength, so the in-between divisors fix ``original / (high - low)`` and
    ``low / (high - low)``, i.e. the two cut wavelengths ``original / low`` and ``original / high``,
    which is all that transformers' llama3 RoPE depends on. The remaining freedom (scaling all
    three) is fixed with ``low_freq_factor = 1``, Meta's value in every Llama 3.x; Meta's full
    published set (low 1, high 4, original 8192) is tried when fewer than two frequencies fall
    in between. A candidate is accepted only if it reproduces the tensor.
    """
    f = np.asarray(rope_freqs, dtype=np.float64).reshape(-1)
    if f.shape != (dims // 2,):
        raise ValueError(f"rope_freqs.weight has {f.size} values, but the rotary dimension {dims} needs "
                         f"{dims // 2}; the file is inconsistent")
    if np.all(f == 1.0):
        return None
    factor = float(f[-1])
    wavelen = 2 * math.pi * np.float64(base) ** (np.arange(0, dims, 2) / dims)
    between = (f > 1 + 1e-6) & (f < factor * (1 - 1e-6))

    candidates = []
    if between.sum() >= 2:
        s = (1 / f[between] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(1 / wavelen[between], s, 1)  # s = slope / wavelen + intercept
        high, original = 1 - 1 / intercept, -slope / intercept     # with low = 1
        candidates += [(factor, 1.0, float(f"{high:.6g}"), float(round(original))),
                       (factor, 1.0, high, original)]
    candidates.append((factor, 1.0, 4.0, 8192.0))
    for c_factor, low, high, original in candidates:
        if np.allclose(_llama_cpp_rope_freqs(c_factor, low, high, original, base, dims), f, rtol=1e-5, atol=0):
            return {"rope_type": "llama3", "factor": _decimal(c_factor), "low_freq_factor": low,
                    "high_freq_factor": _decimal(high),
                    "original_max_position_embeddings": int(round(original))
                    if abs(original - round(original)) < 1e-6 else original}
    raise ValueError("rope_freqs.weight does not follow llama.cpp's Llama-3 RoPE scaling formula "
                     "(convert_hf_to_gguf.py LlamaModel.generate_extra_tensors); cannot recover "
                     "config.json's rope_scaling from it")


def _llama3_from_tensors(facts: Facts) -> dict | None:
    return llama3_rope_scaling(facts.rope_tensors["rope_freqs.weight"], facts.get("rope.freq_base", 10000.0),
                               facts.shape.rope_dims)


def _longrope_from_tensors(facts: Facts) -> dict:
    """LongRoPE: per-frequency long/short factors as two tensors, the pre-training length in
    ``rope.scaling.original_context_length`` and the attention factor in ``rope.scaling.attn_factor``
    (kept only where it differs from the one transformers derives from the two lengths)."""
    n = facts.shape.rope_dims // 2
    scaling = {"rope_type": "longrope"}
    for kind in ("long", "short"):
        values = facts.rope_tensors[f"rope_factors_{kind}.weight"].reshape(-1)
        if values.size != n:
            raise ValueError(f"rope_factors_{kind}.weight has {values.size} values, but the rotary "
                             f"dimension {facts.shape.rope_dims} needs {n}; the file is inconsistent")
        scaling[f"{kind}_factor"] = [_decimal(v) for v in values]
    original = int(facts.get("rope.scaling.original_context_length"))
    extension = int(facts.get("context_length")) / original
    default = math.sqrt(1 + math.log(extension) / math.log(original)) if extension > 1 else 1.0
    attn_factor = facts.get("rope.scaling.attn_factor", None)
    if attn_factor is not None and abs(attn_factor - default) > 1e-6 * default:
        scaling["attention_factor"] = _decimal(attn_factor)
    return scaling


def _linear_from_metadata(facts: Facts) -> dict:
    return {"rope_type": "linear", "factor": _decimal(facts.get("rope.scaling.factor"))}


# config.json rope_type -> (the tensors llama.cpp stores it in, or () for metadata only; reader).
ROPE_SCALINGS = {
    "linear": ((), _linear_from_metadata),
    "llama3": (("rope_freqs.weight",), _llama3_from_tensors),
    "longrope": (("rope_factors_long.weight", "rope_factors_short.weight"), _longrope_from_tensors),
}


def rope_scaling(facts: Facts) -> dict | None:
    """config.json ``rope_scaling`` from the file: a scaling llama.cpp stores as tensors (llama3,
    longrope) if the file has them, else ``{arch}.rope.scaling.type`` (none, linear). A type the
    architecture does not list in ``rope_scalings`` (yarn, ...) is refused, never dropped."""
    arch = facts.arch
    stated = facts.get("rope.scaling.type", "none")
    supported = ", ".join(["none"] + [f"{kind} (as {' + '.join(ROPE_SCALINGS[kind][0]) or 'metadata'})"
                                      for kind in arch.rope_scalings])
    by_tensor = [kind for kind in arch.rope_scalings if set(ROPE_SCALINGS[kind][0]) & set(facts.rope_tensors)]
    kind = by_tensor[0] if by_tensor else stated
    if kind == "none":
        return None
    if kind not in arch.rope_scalings:
        raise ValueError(f"GGUF metadata {facts.key('rope.scaling.type')!r} is {stated!r}, which this converter "
                         f"does not support for {arch.name} (supported: {supported})")
    if stated not in ("none", kind):
        raise ValueError(f"GGUF metadata {facts.key('rope.scaling.type')!r} is {stated!r} but the file carries "
                         f"{kind} RoPE scaling tensors; the two contradict each other")
    tensors, reader = ROPE_SCALINGS[kind]
    missing = [name for name in tensors if name not in facts.rope_tensors]
    if missing:
        raise ValueError(f"{kind} RoPE scaling needs the tensor(s) {', '.join(missing)}, which the file lacks")
    return reader(facts)


def _gemma2_derived(facts: Facts) -> dict:
    s = facts.shape
    # llama.cpp (llama-model.cpp, LLM_ARCH_GEMMA2) scales queries by 1/sqrt(hidden/heads) for the
    # 46-layer 27B and by 1/sqrt(head_dim) otherwise; nothing in the file states it.
    scalar = s.dim // s.n_head if s.n_layer == 46 else s.head_dim
    # llama.cpp: set_swa_pattern(2), so even layers use the window and odd ones attend globally.
    layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(s.n_layer)]
    return {"query_pre_attn_scalar": scalar, "layer_types": layer_types}


def _phi3_derived(facts: Facts) -> dict:
    s = facts.shape
    # llama.cpp writes 0 for "no sliding window" (Phi-4); config.json says null.
    derived = {"sliding_window": int(facts.get("attention.sliding_window", 0)) or None}
    if s.rope_dims != s.head_dim:  # Phi-4-mini; Phi-3's own config.json files leave it out
        derived["partial_rotary_factor"] = s.rope_dims / s.head_dim
    return derived


_NO_SLIDING_WINDOW = {"use_sliding_window": False, "sliding_window": None}

ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (
    Architecture(
        llama, permute_qk=True,
        constants={"hidden_act": "silu", "attention_bias": False, "mlp_bias": False},
        rope_scalings=("linear", "llama3"), sentencepiece="llama"),
    Architecture(
        qwen2, head_dim_in_config=False,
        constants={"hidden_act": "silu", **_NO_SLIDING_WINDOW}),
    Architecture(
        qwen3, constants={"hidden_act": "silu", "attention_bias": False, **_NO_SLIDING_WINDOW}),
    Architecture(
        gemma, tied_only=True, norm_offset=1.0,
        constants={"hidden_act": "gelu_pytorch_tanh", "attention_bias": False}, sentencepiece="gemma"),
    Architecture(
        gemma2, tied_only=True, norm_offset=1.0,
        # defaults are llama.cpp's (llama-model.cpp) where the file may leave a field out
        fields={"sliding_window": ("attention.sliding_window", 4096),
                "attn_logit_softcapping": ("attn_logit_softcapping", 50.0),
                "final_logit_softcapping": ("final_logit_softcapping", 30.0)},
        constants={"hidden_activation": "gelu_pytorch_tanh", "attention_bias": False},
        derived=_gemma2_derived, sentencepiece="gemma"),
    Architecture(
        phi3, head_dim_in_config=False, partial_rotary=True,
        fields={"original_max_position_embeddings": ("rope.scaling.original_context_length", OMIT)},
        constants={"hidden_act": "silu"},
        derived=_phi3_derived,
        rope_scalings=("longrope",),  # transformers' Phi3Config accepts no other type
        sentencepiece="phi3"),
)}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)


# ---------------------------------------------------------------------------------------------
# Metadata -> config.json
# ---------------------------------------------------------------------------------------------

def read_metadata(reader) -> dict:
    """All key/value fields of a ``gguf.GGUFReader`` as plain Python values."""
    return {name: entry.contents() for name, entry in reader.fields.items()
            if not name.startswith("GGUF.")}


def check_architecture(meta: dict) -> Architecture:
    name = meta.get("general.architecture")
    if name not in ARCHITECTURES:
        raise ValueError(f"GGUF architecture (general.architecture) {name!r} is not supported; "
                         f"this converter handles {', '.join(SUPPORTED_ARCHITECTURES)}")
    if meta.get(f"{name}.expert_count", 0):
        raise ValueError(f"this {name} GGUF is a mixture-of-experts model "
                         f"({name}.expert_count = {meta[f'{name}.expert_count']}); only dense models "
                         f"are supported")
    return ARCHITECTURES[name]


def read_shape(facts: Facts) -> Shape:
    arch = facts.arch
    dim = int(facts.get("embedding_length"))
    n_head = int(facts.get("attention.head_count"))
    n_head_kv = facts.get("attention.head_count_kv", n_head)
    if isinstance(n_head_kv, list):
        raise ValueError(f"GGUF metadata {facts.key('attention.head_count_kv')!r} varies per layer "
                         f"({n_head_kv}); {arch.hf_class} needs one key/value head count")
    head_dim = int(facts.get("attention.key_length", dim // n_head))
    value_dim = int(facts.get("attention.value_length", head_dim))
    if value_dim != head_dim:
        raise ValueError(f"GGUF metadata {facts.key('attention.value_length')!r} = {value_dim} differs from "
                         f"attention.key_length = {head_dim}; {arch.hf_class} has one head dim")
    if not arch.head_dim_in_config and head_dim != dim // n_head:
        raise ValueError(f"GGUF metadata {facts.key('attention.key_length')!r} = {head_dim}, but "
                         f"{arch.hf_class} fixes the head dim at embedding_length / head_count = "
                         f"{dim // n_head}; the file does not describe a {arch.hf_class}")
    rope_dims = int(facts.get("rope.dimension_count", head_dim))
    if rope_dims != head_dim and not (arch.partial_rotary and 0 < rope_dims < head_dim and rope_dims % 2 == 0):
        # HF rotates the whole head for these families; partial rotary would change the model.
        raise ValueError(f"GGUF metadata {facts.key('rope.dimension_count')!r} = {rope_dims} differs from "
                         f"the head dim {head_dim}; {arch.hf_class} rotates the whole head (partial "
                         "rotary embeddings are supported for phi3 only)")
    return Shape(int(facts.get("block_count")), dim, n_head, int(n_head_kv), head_dim, rope_dims)


def build_hf_config(facts: Facts) -> dict:
    """``config.json`` for the file's architecture. Vocabulary size and tying come from the
    tensors themselves, which cannot disagree with them."""
    arch, shape = facts.arch, facts.shape
    config = {"architectures": [arch.hf_class], "model_type": arch.model_type}
    for hf_key, (gguf_key, default) in {**COMMON_FIELDS, **arch.fields}.items():
        value = facts.get(gguf_key, default)
        if value is OMIT:
            continue
        config[hf_key] = _decimal(value) if isinstance(value, float) else value
    config["num_key_value_heads"] = shape.n_head_kv
    if arch.head_dim_in_config:
        config["head_dim"] = shape.head_dim
    config.update(arch.constants)
    config.update(arch.derived(facts))
    config["rope_scaling"] = rope_scaling(facts)
    config["vocab_size"] = int(facts.shapes["token_embd.weight"][0])
    # llama.cpp writes no output.weight when the head shares the embedding matrix.
    config["tie_word_embeddings"] = arch.tied_only or "output.weight" not in facts.shapes
    for key in ("bos", "eos", "padding"):
        token_id = facts.meta.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None:
            config["pad_token_id" if key == "padding" else f"{key}_token_id"] = int(token_id)
    config["torch_dtype"] = "float32"
    return config


# ---------------------------------------------------------------------------------------------
# Tensor names and values
# ---------------------------------------------------------------------------------------------

_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_GLOBAL_RE = re.compile(r"^([a-z_]+)\.weight$")


def _expected_tensors(arch: Architecture, n_layer: int) -> list[str]:
    names = ["token_embd.weight", "output_norm.weight"]
    for i in range(n_layer):
        names += [f"blk.{i}.{leaf}.weight" for leaf in arch.layer]
        names += [f"blk.{i}.{leaf}.bias" for leaf in arch.biases]
    return names


def hf_tensor_name(arch: Architecture, gguf_name: str, n_layer: int) -> str | None:
    """The HF name of a GGUF tensor; ``None`` for tensors that only feed config.json (RoPE
    scaling) or that llama.cpp ignores (gemma2's ``output``)."""
    if gguf_name in arch.rope_tensors:
        return None
    match = _GLOBAL_RE.match(gguf_name)
    if match and match.group(1) in arch.global_tensors:
        if match.group(1) == "output" and arch.tied_only:
            return None
        return f"{arch.global_tensors[match.group(1)]}.weight"
    match = _LAYER_RE.match(gguf_name)
    if match and int(match.group(1)) < n_layer and match.group(2) in arch.layer \
            and (match.group(3) == "weight" or match.group(2) in arch.biases):
        return f"model.layers.{match.group(1)}.{arch.layer[match.group(2)]}.{match.group(3)}"
    raise ValueError(f"unexpected tensor {gguf_name!r} for a dense {arch.name} model ({arch.hf_class} "
                     f"has no such weight: extra biases, experts and extra heads are not supported)")


def _numpy_shape(tensor) -> tuple[int, ...]:
    # GGUF lists dimensions fastest-varying first; numpy/PyTorch list them slowest first.
    return tuple(int(n) for n in reversed(tensor.shape.tolist()))


def check_attention_shapes(facts: Facts) -> None:
    """The q/k/v rows must match the head counts: the q/k un-permutation and HF's attention both
    split rows into heads, and a mismatch would load as the wrong model."""
    s = facts.shape
    rows = {"attn_q": s.n_head * s.head_dim, "attn_k": s.n_head_kv * s.head_dim,
            "attn_v": s.n_head_kv * s.head_dim, "attn_qkv": (s.n_head + 2 * s.n_head_kv) * s.head_dim}
    for i in range(s.n_layer):
        for leaf, expected in rows.items():
            name = f"blk.{i}.{leaf}.weight"
            if name in facts.shapes and facts.shapes[name][0] != expected:
                raise ValueError(
                    f"tensor {name!r} has {facts.shapes[name][0]} rows, but the metadata's head counts "
                    f"({facts.key('attention.head_count')} = {s.n_head}, head_count_kv = {s.n_head_kv}, "
                    f"head dim {s.head_dim}) need {expected}; the file's metadata contradicts its weights")


def tensor_to_hf(tensor, arch: Architecture, shape: Shape, hf_name: str) -> np.ndarray:
    """One ``gguf.ReaderTensor`` -> its HF float32 array (dequantised, llama.cpp's changes undone)."""
    values = dequantize(tensor.data, tensor.tensor_type.name, int(tensor.n_elements), tensor.name)
    values = values.reshape(_numpy_shape(tensor))
    if arch.permute_qk and ".attn_q." in tensor.name:
        values = unpermute_qk(values, shape.n_head)
    elif arch.permute_qk and ".attn_k." in tensor.name:
        values = unpermute_qk(values, shape.n_head_kv)
    if arch.norm_offset and hf_name.endswith("norm.weight"):
        values = values - np.float32(arch.norm_offset)
    return values


# ---------------------------------------------------------------------------------------------
# Streaming safetensors writer
# ---------------------------------------------------------------------------------------------

def write_safetensors_streaming(path: Path, specs: list[tuple[str, tuple[int, ...]]],
                                produce: Callable[[int], np.ndarray]) -> None:
    """Write float32 tensors one at a time: ``specs`` fixes names/shapes (and so the header) up
    front, ``produce(i)`` returns tensor ``i``. Peak memory is one tensor, unlike
    ``safetensors.save_file`` which needs every tensor (plus a byte copy) at once."""
    header, offset = {}, 0
    for name, shape in specs:
        nbytes = 4 * int(np.prod(shape, dtype=np.int64))
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors pads the header so tensor data is 8-aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for i, (name, shape) in enumerate(specs):
            array = np.ascontiguousarray(produce(i), dtype="<f4")
            if array.shape != tuple(shape):
                raise AssertionError(f"{name}: produced shape {array.shape}, header says {shape}")
            f.write(memoryview(array).cast("B"))


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

# Pre-tokenizer split regexes by llama.cpp's ``tokenizer.ggml.pre`` (byte-level BPE only).
# ``None`` = GPT-2's own regex (what ByteLevel(use_regex=True) applies). The patterns are the
# models' own tokenizer.json ones, as transformers' GGUF loader uses them.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DIGITS = "<individual digits, then GPT-2 regex>"
PRE_TOKENIZERS = {
    None: None,
    "default": None,
    "gpt2": None,
    "gpt-2": None,  # llama.cpp's own name for GPT-2's split
    # SmolLM splits every digit on its own, then applies GPT-2's regex (as its original
    # tokenizer.json does: Digits(individual_digits) + ByteLevel).
    "smollm": _DIGITS,
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,              # Qwen2, Qwen2.5, Qwen3
    "deepseek-r1-qwen": _QWEN2_SPLIT,   # Qwen2.5-based distillations
    "gpt-4o": _GPT4O_SPLIT,             # tiktoken o200k-style vocabularies (Phi-4-mini)
}

# llama.cpp token types (llama_token_type): which vocabulary entries are added tokens.
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which byte-level BPE vocabularies are spelled in."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return chars


def _byte_level_pre_tokenizer(pre: str | None, add_prefix_space: bool):
    from tokenizers import Regex, pre_tokenizers

    if pre not in PRE_TOKENIZERS:
        supported = ", ".join(repr(k) for k in PRE_TOKENIZERS if k)
        raise ValueError(f"GGUF tokenizer.ggml.pre {pre!r} is not supported (supported: {supported}); "
                         "a wrong split regex would tokenise text differently from llama.cpp. Pass "
                         "tokenizer=False / --no-tokenizer and use the model's original tokenizer.json")
    split = PRE_TOKENIZERS[pre]
    if split is None or split == _DIGITS:
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=True)
        if split is None:
            return byte_level
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=False)])


def _byte_level_bpe(meta: dict, arch: Architecture):
    """Byte-level BPE (``tokenizer.ggml.model == "gpt2"``): GPT-2's byte alphabet, the file's
    merges, the pre-tokenizer named by ``tokenizer.ggml.pre``. Returns (tokenizer, vocab, spell)."""
    from tokenizers import Tokenizer, decoders, models

    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ")) for m in _require_meta(meta, "tokenizer.ggml.merges")]
    if any(len(m) != 2 for m in merges):
        raise ValueError("GGUF tokenizer.ggml.merges must be 'left right' pairs")
    # Entries are byte-level spelled already; one using other characters (a rare llama.cpp
    # mislabel) is re-spelled through its UTF-8 bytes, as transformers does.
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())

    def spell(token: str) -> str:
        return token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode())

    vocab = {spell(token): index for index, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None,
                                     continuing_subword_prefix="", end_of_word_suffix="",
                                     fuse_unk=False))
    tokenizer.pre_tokenizer = _byte_level_pre_tokenizer(
        meta.get("tokenizer.ggml.pre"), bool(meta.get("tokenizer.ggml.add_space_prefix", False)))
    tokenizer.decoder = decoders.ByteLevel()
    # Control tokens must be byte-level spelled to be real vocabulary entries; others are mislabels.
    return tokenizer, vocab, spell, lambda token: set(token) <= alphabet


def sentencepiece_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary, best first: every split of a token into
    two vocabulary entries, ranked by the token's score (transformers' ``generate_merges``, which
    its GGUF loader uses; llama.cpp ranks pairs by the same scores)."""
    merges = []
    for merge, score in scores.items():
        local = [(merge[:i], merge[i:], score) for i in range(1, len(merge))
                 if merge[:i] in vocab and merge[i:] in vocab]
        merges.extend(sorted(local, key=lambda x: (vocab[x[0]], vocab[x[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _sentencepiece_bpe(meta: dict, arch: Architecture):
    """SentencePiece BPE (``tokenizer.ggml.model == "llama"``), built as transformers' GGUF loader
    builds it for the architecture (``arch.sentencepiece``):

    * ``llama``: Metaspace pre-tokenizer (a "▁" prefix unless ``tokenizer.ggml.add_space_prefix``
      is false, which transformers ignores and llama.cpp honours; we honour it), byte fallback;
    * ``phi3``: the prefix and spaces from a normaliser instead, as Phi-3's own tokenizer.json;
    * ``gemma``: no prefix; whitespace-only tokens respelled with "▁"; merges ranked by position
      in the file, since Gemma's scores do not follow its merge order.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    flavour = arch.sentencepiece
    tokens = list(meta["tokenizer.ggml.tokens"])
    if flavour == "gemma":
        tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {token: index for index, token in enumerate(tokens)}
    if "tokenizer.ggml.merges" in meta:
        merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    elif flavour == "gemma":
        merges = sentencepiece_merges(vocab, {token: -index for index, token in enumerate(tokens)})
    else:
        scores = list(_require_meta(meta, "tokenizer.ggml.scores"))
        merges = sentencepiece_merges(vocab, dict(zip(tokens, scores)))
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None and unk_id < len(tokens) else None
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True,
                                     unk_token=unk, dropout=None))
    decode = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if flavour == "gemma":
        tokenizer.normalizer = normalizers.Replace(" ", "\u2581")
        tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    elif flavour == "phi3":
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"),
                                                     normalizers.Replace(" ", "\u2581")])
        decode.append(decoders.Strip(content=" ", left=1))
    else:
        prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="\u2581", prepend_scheme="first" if prefix else "never", split=False)
        if prefix:
            decode.append(decoders.Strip(content=" ", left=1))
    tokenizer.decoder = decoders.Sequence(decode)
    return tokenizer, vocab, lambda token: token, lambda token: True


# tokenizer.ggml.model -> builder of (tokenizer, vocab, spell, is_real_control_token), and whether
# the tokenizer adds BOS when the file does not say (llama.cpp's default per vocabulary type).
_TOKENIZER_MODELS = {"gpt2": (_byte_level_bpe, False), "llama": (_sentencepiece_bpe, True)}


def _require_meta(meta: dict, key: str):
    if key not in meta:
        raise ValueError(f"GGUF metadata lacks {key!r}; pass tokenizer=False / --no-tokenizer to "
                         "convert the weights only")
    return meta[key]


def build_tokenizer(meta: dict, arch: Architecture | None = None):
    """(``tokenizers.Tokenizer``, tokenizer_config dict) from a GGUF's ``tokenizer.*`` metadata.

    Mirrors what ``transformers`` does for a GGUF vocabulary, so the directory encodes text as
    ``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` does. Deliberate differences: for
    ``pre == "smollm"`` digits are split one by one first, as llama.cpp and SmolLM's own
    tokenizer.json do (transformers skips it; identical ids on SmolLM2's vocabulary, which has no
    multi-digit tokens); a SentencePiece file with ``add_space_prefix = false`` gets no "▁" prefix.
    """
    from tokenizers import AddedToken, processors

    arch = arch or ARCHITECTURES["llama"]
    model = meta.get("tokenizer.ggml.model")
    if model not in _TOKENIZER_MODELS:
        raise ValueError(f"GGUF tokenizer.ggml.model {model!r} is not supported (supported: "
                         f"{', '.join(SUPPORTED_TOKENIZER_MODELS)}: byte-level BPE, SentencePiece BPE); "
                         "pass tokenizer=False / --no-tokenizer to convert the weights only")
    builder, bos_by_default = _TOKENIZER_MODELS[model]
    tokens = list(_require_meta(meta, "tokenizer.ggml.tokens"))
    tokenizer, vocab, spell, real = builder(meta, arch)
    token_types = list(meta.get("tokenizer.ggml.token_type") or [])

    # Control tokens (<|im_start|>, <s>, ...) must match whole, never be split by BPE.
    special = [AddedToken(t, normalized=False, special=True)
               for t, kind in zip(tokens, token_types) if kind == _TOKEN_TYPE_CONTROL and real(t)]
    user = [AddedToken(t, normalized=False, special=False)
            for t, kind in zip(tokens, token_types) if kind == _TOKEN_TYPE_USER_DEFINED and t in vocab]
    if special:
        tokenizer.add_special_tokens(special)
    if user:
        tokenizer.add_tokens(user)

    def token(key: str) -> str | None:
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[token_id] if token_id is not None and token_id < len(tokens) else None

    bos, eos = token("bos"), token("eos")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", bos_by_default)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        # Put BOS/EOS insertion into tokenizer.json itself so any loader (transformers of any
        # version, torchtune's HF tokenizer) adds them without honouring tokenizer_config flags.
        specials = [(t, vocab[spell(t)]) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
        single = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
        pair = single + ([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else [])
        tokenizer.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                                 special_tokens=specials)

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": token("unknown"),
        "pad_token": token("padding"),
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(meta.get(f"{arch.name}.context_length", 2048)),
    }
    if meta.get("tokenizer.chat_template"):
        config["chat_template"] = meta["tokenizer.chat_template"]
    return tokenizer, {k: v for k, v in config.items() if v is not None}


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------

def _plan(reader, tokenizer: bool):
    """Everything about the output, validated, before a byte is written: the architecture, the
    facts, the (HF name, shape) of each tensor with its source, config.json and the tokenizer."""
    if getattr(getattr(reader, "endianess", None), "name", "LITTLE") != "LITTLE":
        # Our dequantisers read little-endian scales; big-endian GGUFs are vanishingly rare.
        raise ValueError("a big-endian GGUF is not supported; convert the model again without --bigendian")
    meta = read_metadata(reader)
    arch = check_architecture(meta)
    facts = Facts(arch, meta, {t.name: _numpy_shape(t) for t in reader.tensors}, {})
    facts.shape = read_shape(facts)

    specs, sources = [], []
    for tensor in reader.tensors:
        if tensor.tensor_type.name not in BLOCK_LAYOUT:
            raise ValueError(f"tensor {tensor.name!r} has GGML type {tensor.tensor_type.name}, which this "
                             f"converter cannot dequantise (supported: {', '.join(SUPPORTED_TENSOR_TYPES)}); "
                             "re-quantise the model to one of those with llama.cpp's llama-quantize")
        name = hf_tensor_name(arch, tensor.name, facts.shape.n_layer)
        if tensor.name in arch.rope_tensors:
            facts.rope_tensors[tensor.name] = dequantize(tensor.data, tensor.tensor_type.name,
                                                         int(tensor.n_elements), tensor.name)
        if name is not None:
            specs.append((name, facts.shapes[tensor.name]))
            sources.append(tensor)
    missing = [n for n in _expected_tensors(arch, facts.shape.n_layer) if n not in facts.shapes]
    if missing:
        raise ValueError(f"the file lacks {len(missing)} tensor(s) a {arch.name} model needs "
                         f"({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}); it is "
                         "incomplete (a split GGUF? merge it with llama-gguf-split --merge)")
    check_attention_shapes(facts)
    config = build_hf_config(facts)
    tok = build_tokenizer(meta, arch) if tokenizer else None
    if tok is not None and tok[0].get_vocab_size(with_added_tokens=True) > config["vocab_size"]:
        raise ValueError(f"the tokenizer has {tok[0].get_vocab_size()} tokens but the embedding only "
                         f"{config['vocab_size']} rows; pass tokenizer=False / --no-tokenizer to convert "
                         "the weights only")
    return arch, facts, specs, sources, config, tok


def convert_gguf_to_hf(gguf_path: str | Path, out_dir: str | Path, *, tokenizer: bool = True,
                       progress: Progress | None = None) -> Path:
    """Convert a GGUF file of a supported architecture into an HF checkpoint directory; returns
    ``out_dir``.

    Everything is validated (architecture, tensor names and presence, tensor types, attention
    shapes, tokenizer) before any file is written, so a failure leaves no half-written checkpoint.
    """
    from gguf import GGUFReader  # test/tool dependency; not needed by the training library

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    say = progress or (lambda message: None)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")

    say(f"reading {gguf_path}")
    reader = GGUFReader(gguf_path)
    try:
        arch, facts, specs, sources, config, tok = _plan(reader, tokenizer)
    except ValueError as e:
        raise ValueError(f"{gguf_path}: {e}") from None
    meta = facts.meta

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if tok is not None:
        tok[0].save(str(out_dir / "tokenizer.json"))
        (out_dir / "tokenizer_config.json").write_text(json.dumps(tok[1], indent=2) + "\n")
        say(f"wrote tokenizer ({len(meta['tokenizer.ggml.tokens'])} tokens)")

    types = sorted({t.tensor_type.name for t in sources})
    say(f"{arch.name} -> {arch.hf_class}: dequantising {len(specs)} tensors ({', '.join(types)}) to float32")
    step = max(1, len(specs) // 10)

    def produce(i: int) -> np.ndarray:
        if i % step == 0 or i == len(specs) - 1:
            say(f"  tensor {i + 1}/{len(specs)}: {sources[i].name} -> {specs[i][0]}")
        return tensor_to_hf(sources[i], arch, facts.shape, specs[i][0])

    write_safetensors_streaming(out_dir / "model.safetensors", specs, produce)
    n_params = sum(int(np.prod(s)) for _, s in specs)
    say(f"wrote {out_dir / 'model.safetensors'} ({n_params / 1e6:.1f}M parameters)")
    return out_dir
