"""Hugging Face checkpoint directory -> GGUF file, written as llama.cpp's ``convert_hf_to_gguf.py``
writes one, so that llama.cpp (and Ollama, LM Studio, ...) run it.

The inverse of `to_hf`, from the same per-architecture tables (`to_hf.ARCHITECTURES`, found by the
family's ``GGUF_ARCH``: Mistral is written as llama, as llama.cpp's converter writes it): tensor
names, q/k rows permuted to GGML's interleaved RoPE layout (llama), Gemma's norms stored as
``1 + w``, RoPE scaling as llama.cpp stores it (linear in metadata, Llama 3.1's as a ``rope_freqs``
tensor, LongRoPE as ``rope_factors_long/short``), and the tokenizer from ``tokenizer.json``
(byte-level BPE as ``gpt2``, SentencePiece-style BPE as ``llama``) with the chat template.

A model llama.cpp would compute differently is refused before a byte is written, naming the
config.json field: Gemma 2 with another layer pattern, query scale or soft-capping than llama.cpp
assumes, attention or MLP biases the architecture does not read. A sliding window llama.cpp does
not apply (Mistral v0.1, Qwen2's ``use_sliding_window``, Phi-3) is written as llama.cpp's own
converter writes it, with a note: the file computes the model on sequences up to the window. One
tensor is in memory at a time.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pmss_dist.files import atomic_write, check_not_over_inputs
from pmss_dist.gguf.to_hf import (ARCHITECTURES, BLOCK_LAYOUT, COMMON_FIELDS, PRE_TOKENIZERS, REQUIRED, Architecture,
                                  _DIGITS, _llama_cpp_rope_freqs)
from pmss_dist.hf.load import open_safetensors, read_model_spec, weight_files
from pmss_dist.models.spec import LinearScaling, Llama3Scaling, LongRoPEScaling, ModelSpec

# --type -> (GGML type of 2-D weights, llama.cpp's general.file_type). 1-D tensors are F32 always.
OUT_TYPES = {"f32": ("F32", 0), "f16": ("F16", 1), "bf16": ("BF16", 32), "q8_0": ("Q8_0", 7)}
_TOKEN_NORMAL, _TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_USER, _TOKEN_UNUSED, _TOKEN_BYTE = 1, 2, 3, 4, 5, 6

Progress = Callable[[str], None]


class GGUFExportError(ValueError):
    pass


class _Metadata:
    """The ``GGUFWriter.add_*`` calls of a file, recorded while config.json and the tokenizer are
    read and checked, and made on the writer only once everything has passed."""

    def __init__(self):
        self.calls: list[tuple[str, tuple]] = []

    def __getattr__(self, method: str):
        return lambda *args: self.calls.append((method, args))

    def write_to(self, writer) -> None:
        for method, args in self.calls:
            getattr(writer, method)(*args)


# ---------------------------------------------------------------------------------------------
# config.json -> metadata
# ---------------------------------------------------------------------------------------------

def _refuse(field: str, value, why: str) -> None:
    raise GGUFExportError(f"config.json: {field}={value!r}: {why}; llama.cpp would compute another model "
                          "than this checkpoint, so no GGUF is written")


def check_expressible(arch: Architecture, spec: ModelSpec) -> list[str]:
    """Refuse what llama.cpp's reading of ``arch`` computes otherwise at every length; return notes
    on what it computes otherwise past a length (a sliding window it does not apply, as for the
    GGUFs llama.cpp's own converter writes of these models)."""
    notes = []
    windows = [w for w in spec.windows if w is not None]
    sliding = [w is not None for w in spec.windows]
    if arch.name != "gemma2" and windows and spec.max_seq_len is not None and min(windows) < spec.max_seq_len:
        notes.append(f"config.json: sliding_window={min(windows)}: llama.cpp's {arch.name} attends to the whole "
                     f"context, so the GGUF computes this model only on sequences of up to {min(windows)} tokens")
    for name in ("attention_bias", "mlp_bias"):
        if spec.config.get(name) and not (name == "attention_bias" and arch.biases):
            _refuse(name, True, f"llama.cpp's {arch.name} reads no such biases here")
    if arch.name == "gemma2":
        n = spec.num_layers
        expected = [i % 2 == 0 for i in range(n)]
        if any(sliding) and sliding != expected:
            _refuse("layer_types", ["sliding_attention" if s else "full_attention" for s in sliding],
                    "llama.cpp's gemma2 alternates sliding (even) and global layers")
        caps = {"attn_logit_softcapping": spec.attn_softcap, "final_logit_softcapping": spec.final_softcap}
        for name, cap in caps.items():
            if cap is None:
                _refuse(name, None, "llama.cpp's gemma2 always soft-caps")
        llama_cpp_scalar = spec.dim // spec.num_heads if n == 46 else spec.head_dim
        if spec.query_pre_attn_scalar != llama_cpp_scalar:
            _refuse("query_pre_attn_scalar", spec.query_pre_attn_scalar,
                    f"llama.cpp's gemma2 scales queries by 1/sqrt({llama_cpp_scalar}) at this size")
    return notes


def _add_number(writer, key: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise GGUFExportError(f"config.json: {key} must be a number, not {value!r}")
    if isinstance(value, int):
        writer.add_uint32(key, value)
    else:
        writer.add_float32(key, value)


def write_model_metadata(writer, arch: Architecture, spec: ModelSpec) -> dict[str, np.ndarray]:
    """The ``{arch}.*`` metadata; returns the RoPE tensors llama.cpp keeps as tensors instead.
    The fields `COMMON_FIELDS` and the architecture's table name are copied as config.json states
    them; the rest is the spec's."""
    key = lambda name: f"{arch.name}.{name}"  # noqa: E731
    rope = spec.rope
    values = {**spec.config, "rope_theta": rope.theta}
    for hf_key, (gguf_key, default) in {**COMMON_FIELDS, **arch.fields}.items():
        if values.get(hf_key) is not None:
            _add_number(writer, key(gguf_key), values[hf_key])
        elif default is REQUIRED:
            raise GGUFExportError(f"config.json lacks {hf_key}, which a {arch.name} GGUF states")
    writer.add_uint32(key("attention.head_count_kv"), spec.num_kv_heads)
    writer.add_uint32(key("attention.key_length"), spec.head_dim)
    writer.add_uint32(key("attention.value_length"), spec.head_dim)
    writer.add_uint32(key("vocab_size"), spec.vocab_size)
    writer.add_uint32(key("rope.dimension_count"), rope.rotary_dim)
    if arch.name == "phi3":  # llama.cpp writes 0 for "no window" (Phi-4)
        writer.add_uint32(key("attention.sliding_window"), int(spec.config.get("sliding_window") or 0))
    tensors: dict[str, np.ndarray] = {}
    scaling = rope.scaling
    if isinstance(scaling, LinearScaling):
        writer.add_string(key("rope.scaling.type"), "linear")
        writer.add_float32(key("rope.scaling.factor"), scaling.factor)
    elif isinstance(scaling, Llama3Scaling):
        tensors["rope_freqs.weight"] = _llama_cpp_rope_freqs(
            scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor, float(scaling.original_max_seq_len),
            rope.theta, rope.rotary_dim)
    elif isinstance(scaling, LongRoPEScaling):
        if "original_max_position_embeddings" not in spec.config:
            writer.add_uint32(key("rope.scaling.original_context_length"), scaling.original_max_seq_len)
        writer.add_float32(key("rope.scaling.attn_factor"), scaling.attention_factor)
        for which in ("long", "short"):
            tensors[f"rope_factors_{which}.weight"] = np.asarray(getattr(scaling, f"{which}_factor"), np.float32)
    elif scaling is not None:
        raise GGUFExportError(f"config.json: rope_scaling type {scaling.kind!r} has no GGUF form here")
    return tensors


# ---------------------------------------------------------------------------------------------
# tokenizer.json -> tokenizer.* metadata
# ---------------------------------------------------------------------------------------------

def _byte_level_pre(pre: dict | None) -> tuple[str, bool] | None:
    """``(tokenizer.ggml.pre, add_prefix_space)`` of a byte-level pre-tokenizer, or None if it is
    not byte-level. A byte-level one llama.cpp has no name for is refused: it would split text
    differently."""
    if not pre:
        return None
    steps = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
    if len(byte_level) != 1:
        return None
    prefix = bool(byte_level[0].get("add_prefix_space", False))
    shapes = [s.get("type") for s in steps]
    if shapes == ["ByteLevel"] and byte_level[0].get("use_regex", True):
        return "gpt-2", prefix
    if shapes == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm", prefix
    if shapes == ["Split", "ByteLevel"] and not byte_level[0].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        for name, split in PRE_TOKENIZERS.items():
            if split is not None and split != _DIGITS and split == regex:
                return name, prefix
    raise GGUFExportError("tokenizer.json: its byte-level pre-tokenizer is none that llama.cpp names here "
                          f"({', '.join(sorted(k for k in PRE_TOKENIZERS if k))}); llama.cpp would split text "
                          "differently. Pass --no-tokenizer to write the weights only")


def _sentencepiece_prefix(tok: dict) -> bool | None:
    """Whether a SentencePiece-style tokenizer.json prefixes text with "▁"; None if it is not one."""
    model, pre, norm = tok["model"], tok.get("pre_tokenizer") or {}, tok.get("normalizer") or {}
    if not model.get("byte_fallback"):
        return None
    if pre.get("type") == "Metaspace":
        return pre.get("prepend_scheme", "always") != "never"
    steps = norm["normalizers"] if norm.get("type") == "Sequence" else [norm]
    if any(s.get("type") == "Replace" and s.get("content") == "\u2581" for s in steps):
        return any(s.get("type") == "Prepend" and s.get("prepend") == "\u2581" for s in steps)
    return None


def _merge_pairs(model: dict) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def _special_id(name: str, c: dict, side: dict, ids: dict[str, int]) -> int | None:
    value = c.get(f"{name}_token_id")
    if isinstance(value, list):
        value = value[0] if value else None
    if value is None:
        token = side.get(f"{name}_token")
        token = token.get("content") if isinstance(token, dict) else token
        value = ids.get(token)
    return value


def _template_tokens(post: dict | None) -> set[str] | None:
    """The special tokens tokenizer.json's TemplateProcessing puts around a single text; None when
    it has no template (then tokenizer_config.json's add_*_token flags say)."""
    if not post:
        return None
    steps = post["processors"] if post.get("type") == "Sequence" else [post]
    templates = [s for s in steps if s.get("type") == "TemplateProcessing"]
    if not templates:
        return None
    return {piece["SpecialToken"]["id"] for piece in templates[0]["single"] if "SpecialToken" in piece}


def write_tokenizer_metadata(writer, arch: Architecture, hf_dir: Path, spec: ModelSpec) -> None:
    """``tokenizer.*`` from tokenizer.json and tokenizer_config.json, as llama.cpp reads it."""
    path = hf_dir / "tokenizer.json"
    if not path.is_file():
        raise GGUFExportError(f"{hf_dir} has no tokenizer.json; llama.cpp needs the vocabulary (pass "
                              "--no-tokenizer to write the weights only)")
    tok = json.loads(path.read_text(encoding="utf-8"))
    side_path = hf_dir / "tokenizer_config.json"
    side = json.loads(side_path.read_text(encoding="utf-8")) if side_path.is_file() else {}
    model = tok.get("model") or {}
    if model.get("type") != "BPE":
        raise GGUFExportError(f"{path}: model type {model.get('type')!r}; llama.cpp's vocabularies here are "
                              "BPE (byte-level or SentencePiece-style)")
    vocab_size = spec.vocab_size
    ids = dict(model["vocab"])
    added = {t["content"]: t for t in tok.get("added_tokens", [])}
    ids.update({content: t["id"] for content, t in added.items()})
    if max(ids.values()) >= vocab_size:
        raise GGUFExportError(f"{path}: token id {max(ids.values())} is past the embedding's {vocab_size} rows")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [_TOKEN_UNUSED] * vocab_size
    for token, i in ids.items():
        tokens[i] = token
        types[i] = (_TOKEN_NORMAL if token not in added else
                    _TOKEN_CONTROL if added[token].get("special") else _TOKEN_USER)
    byte_level = _byte_level_pre(tok.get("pre_tokenizer"))
    merges = _merge_pairs(model)
    if byte_level is not None:
        pre, prefix = byte_level
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        if prefix:
            writer.add_add_space_prefix(True)
    else:
        prefix = _sentencepiece_prefix(tok)
        if prefix is None:
            raise GGUFExportError(f"{path}: neither a byte-level BPE nor a SentencePiece-style BPE (byte "
                                  "fallback with '▁' for spaces) tokenizer; pass --no-tokenizer to write the "
                                  "weights only")
        unk = model.get("unk_token")
        for i, token in enumerate(tokens):
            if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                types[i] = _TOKEN_BYTE
            elif token == unk:
                types[i] = _TOKEN_UNKNOWN
        # llama.cpp's SentencePiece tokenizer merges the pair whose result scores highest: the
        # tokenizer.json merge order as scores (first merge best), unmerged tokens last.
        scores = [-1e9] * vocab_size
        for rank, merge in enumerate(merges):
            i = ids.get(merge.replace(" ", ""))
            if i is not None and scores[i] == -1e9:
                scores[i] = -float(rank)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_add_space_prefix(prefix)
        if unk in ids:
            writer.add_unk_token_id(ids[unk])
    template_tokens = _template_tokens(tok.get("post_processor"))
    for name, add_id, add_flag in (("bos", writer.add_bos_token_id, writer.add_add_bos_token),
                                   ("eos", writer.add_eos_token_id, writer.add_add_eos_token),
                                   ("pad", writer.add_pad_token_id, None)):
        value = _special_id(name, spec.config, side, ids)
        if value is None:
            continue
        add_id(int(value))
        if add_flag is not None:  # added to every text: what tokenizer.json's template does, else the flag
            on = (tokens[int(value)] in template_tokens if template_tokens is not None
                  else side.get(f"add_{name}_token", False))
            add_flag(bool(on))
    template = side.get("chat_template")
    if isinstance(template, list):  # named templates: llama.cpp's key takes the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if (hf_dir / "chat_template.jinja").is_file():
        template = (hf_dir / "chat_template.jinja").read_text(encoding="utf-8")
    if template:
        writer.add_chat_template(template)


# ---------------------------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------------------------

def gguf_tensor_name(arch: Architecture, hf_name: str) -> str | None:
    """The GGUF name of an HF tensor; None for a tied head, which llama.cpp does not store."""
    module, _, suffix = hf_name.rpartition(".")
    for gguf_leaf, hf_module in arch.global_tensors.items():
        if module == hf_module:
            return None if gguf_leaf == "output" and arch.tied_only else f"{gguf_leaf}.{suffix}"
    parts = module.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"]:
        for gguf_leaf, hf_leaf in arch.layer.items():
            if parts[3] == hf_leaf and (suffix == "weight" or gguf_leaf in arch.biases):
                return f"blk.{parts[2]}.{gguf_leaf}.{suffix}"
    raise GGUFExportError(f"tensor {hf_name} has no place in a {arch.name} GGUF")


def _llama_cpp_permute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's half-split RoPE rows -> GGML's interleaved ones (convert_hf_to_gguf ``LlamaModel.permute``)."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def gguf_values(arch: Architecture, spec: ModelSpec, hf_name: str, weight: torch.Tensor) -> np.ndarray:
    """An HF tensor's float32 values as llama.cpp stores them (before quantization)."""
    value = weight.float()
    if arch.permute_qk and hf_name.endswith("q_proj.weight"):
        value = _llama_cpp_permute(value, spec.num_heads)
    elif arch.permute_qk and hf_name.endswith("k_proj.weight"):
        value = _llama_cpp_permute(value, spec.num_kv_heads)
    if arch.norm_offset and hf_name.endswith("norm.weight"):
        value = value + arch.norm_offset
    return value.contiguous().numpy()


def storage_type(out_type: str, shape: tuple[int, ...]) -> str:
    """GGML type of a tensor: 1-D ones F32, 2-D ones ``out_type``; Q8_0 blocks are 32 wide, so a
    row of another length falls back to F16, as llama.cpp's converter does."""
    if len(shape) == 1:
        return "F32"
    kind = OUT_TYPES[out_type][0]
    return "F16" if shape[-1] % BLOCK_LAYOUT[kind][0] else kind


def _stored_bytes(kind: str, shape: tuple[int, ...]) -> int:
    elements, nbytes = BLOCK_LAYOUT[kind]  # per block, as the reader dequantizes them
    return math.prod(shape) // elements * nbytes


def _encode(values: np.ndarray, kind: str) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    if kind == "F32":
        return values
    if kind == "F16":
        return values.astype(np.float16)
    return quantize(values, GGMLQuantizationType[kind])


def convert_hf_to_gguf(hf_dir: str | Path, out_path: str | Path, *, out_type: str = "f16", tokenizer: bool = True,
                       progress: Progress | None = None) -> Path:
    """Write the HF checkpoint ``hf_dir`` (one of `to_hf`'s architectures, or Mistral) as the GGUF
    file ``out_path`` with 2-D weights in ``out_type`` (`OUT_TYPES`). Everything is checked before
    writing; the file appears whole under its name or not at all."""
    from gguf import GGMLQuantizationType, GGUFWriter

    hf_dir, out_path = Path(hf_dir), Path(out_path)
    say = progress or (lambda line: None)
    if out_type not in OUT_TYPES:
        raise GGUFExportError(f"GGUF type {out_type!r} is not one of {', '.join(OUT_TYPES)}")
    check_not_over_inputs(out_path, {"the checkpoint": hf_dir}, "the GGUF file")
    spec = read_model_spec(hf_dir)
    arch = ARCHITECTURES[spec.family.GGUF_ARCH]
    notes = check_expressible(arch, spec)
    files = weight_files(hf_dir)
    plan = []  # (hf name, gguf name, shape, GGML type)
    for hf_name, path in sorted(files.items()):
        if hf_name == "lm_head.weight" and spec.tied:
            continue  # a copy of the embedding some checkpoints carry; llama.cpp ties it itself
        name = gguf_tensor_name(arch, hf_name)
        if name is None:
            continue
        with open_safetensors(path) as f:
            shape = tuple(f.get_slice(hf_name).get_shape())
        plan.append((hf_name, name, shape, storage_type(out_type, shape)))

    metadata = _Metadata()
    metadata.add_name(hf_dir.name)
    metadata.add_file_type(OUT_TYPES[out_type][1])
    metadata.add_quantization_version(2)  # GGML_QNT_VERSION: Q8_0's layout
    rope_tensors = write_model_metadata(metadata, arch, spec)
    if tokenizer:
        write_tokenizer_metadata(metadata, arch, hf_dir, spec)
    else:
        metadata.add_tokenizer_model("none")  # llama.cpp's "no vocabulary": it runs token ids only

    def write(tmp: str) -> None:
        writer = GGUFWriter(tmp, arch.name)
        metadata.write_to(writer)
        for _, name, shape, kind in plan:
            writer.add_tensor_info(name, shape, np.dtype(np.float32), _stored_bytes(kind, shape),
                                   raw_dtype=GGMLQuantizationType[kind])
        for name, values in rope_tensors.items():
            writer.add_tensor_info(name, values.shape, values.dtype, values.nbytes, raw_dtype=GGMLQuantizationType.F32)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for i, (hf_name, name, shape, kind) in enumerate(plan, 1):
            with open_safetensors(files[hf_name]) as f:
                writer.write_tensor_data(_encode(gguf_values(arch, spec, hf_name, f.get_tensor(hf_name)), kind))
            if i % 32 == 0 or i == len(plan):
                say(f"  tensor {i}/{len(plan)}: {hf_name} -> {name} ({kind})")
        for values in rope_tensors.values():
            writer.write_tensor_data(values)
        writer.close()

    say(f"{arch.hf_class} -> {arch.name} GGUF ({out_type}): {len(plan)} tensors")
    for note in notes:
        say(f"note: {note}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out_path, write)
    say(f"wrote {out_path} ({out_path.stat().st_size / 2**20:.1f} MiB)")
    return out_path
