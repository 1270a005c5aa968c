"""GGUF (llama.cpp) file -> Hugging Face Llama checkpoint directory.

Writes ``config.json``, ``model.safetensors`` (float32), ``tokenizer.json`` and
``tokenizer_config.json`` so the result loads with ``transformers`` and with this library's
``hf_checkpoint`` reader. Only the Llama family (``general.architecture == "llama"``) with a
byte-level BPE ("gpt2") tokenizer is handled; anything else fails with a clear error rather than
producing a checkpoint that loads but computes something else.

Two things llama.cpp changes on the way in are undone here:

* q/k projection rows are permuted from HF's half-split RoPE layout to GGML's interleaved one
  (``convert_hf_to_gguf.py``'s ``LlamaModel.permute``); ``unpermute_qk`` inverts it.
* weights are block-quantised; ``dequantize`` expands F32/F16/BF16/Q8_0/Q4_0/Q4_1 in numpy.

The ``gguf`` package (gguf-py) is only used to parse the container; dequantisation is our own.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

SUPPORTED_ARCHITECTURES = ("llama",)
SUPPORTED_TOKENIZER_MODELS = ("gpt2",)

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

# Per-layer GGUF leaf name -> HF module path inside ``model.layers.{i}``.
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.weight$")

# Pre-tokenizer split regexes by llama.cpp's ``tokenizer.ggml.pre``. ``None`` = GPT-2's own regex
# (what ByteLevel(use_regex=True) applies). The Llama-3 pattern is the one in Meta's tokenizer.json.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DIGITS = "<individual digits, then GPT-2 regex>"
_PRE_TOKENIZERS = {
    None: None,
    "default": None,
    "gpt2": None,
    # SmolLM splits every digit on its own, then applies GPT-2's regex (as its original
    # tokenizer.json does: Digits(individual_digits) + ByteLevel).
    "smollm": _DIGITS,
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
}

# llama.cpp token types (llama_token_type): which vocabulary entries are added tokens.
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4

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
                         f"cannot dequantise (supported: {', '.join(SUPPORTED_TENSOR_TYPES)})")
    block_elems, block_bytes = BLOCK_LAYOUT[type_name]
    data = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    if n_elements % block_elems or data.size != n_elements // block_elems * block_bytes:
        raise ValueError(f"tensor {tensor_name!r}: {data.size} bytes do not hold {n_elements} "
                         f"{type_name} values")

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
    number of query heads for q and of key/value heads for k.
    """
    rows = weight.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"cannot unpermute {rows} rows into {n_head} heads of even size")
    w = weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:])
    return w.swapaxes(1, 2).reshape(weight.shape)


# ---------------------------------------------------------------------------------------------
# Metadata -> config.json
# ---------------------------------------------------------------------------------------------

def read_metadata(reader) -> dict:
    """All key/value fields of a ``gguf.GGUFReader`` as plain Python values."""
    return {name: field.contents() for name, field in reader.fields.items()
            if not name.startswith("GGUF.")}


@dataclass(frozen=True)
class LlamaShape:
    n_layer: int
    dim: int
    n_head: int
    n_head_kv: int
    head_dim: int


def _require(meta: dict, key: str):
    if key not in meta:
        raise ValueError(f"GGUF metadata lacks {key!r}; is this a complete llama.cpp model file?")
    return meta[key]


def check_architecture(meta: dict) -> str:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; this converter handles "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)} (the Llama family) only")
    if meta.get(f"{arch}.expert_count", 0):
        raise ValueError(f"this {arch} GGUF is a mixture-of-experts model "
                         f"({meta[f'{arch}.expert_count']} experts); only dense Llama is supported")
    return arch


def llama_shape(meta: dict) -> LlamaShape:
    dim = int(_require(meta, "llama.embedding_length"))
    n_head = int(_require(meta, "llama.attention.head_count"))
    n_head_kv = int(meta.get("llama.attention.head_count_kv", n_head))
    head_dim = int(meta.get("llama.attention.key_length", dim // n_head))
    rope_dims = int(meta.get("llama.rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        # HF Llama rotates the whole head; partial rotary would silently change the model.
        raise ValueError(f"rope.dimension_count {rope_dims} != head dim {head_dim}: partial rotary "
                         "embeddings are not supported")
    return LlamaShape(int(_require(meta, "llama.block_count")), dim, n_head, n_head_kv, head_dim)


def _rope_scaling(meta: dict) -> dict | None:
    kind = meta.get("llama.rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(meta["llama.rope.scaling.factor"])}
    raise ValueError(f"rope scaling type {kind!r} is not supported (only none and linear)")


def build_hf_config(meta: dict, tensor_shapes: dict[str, tuple[int, ...]]) -> dict:
    """``config.json`` for LlamaForCausalLM. ``tensor_shapes`` holds numpy-order shapes by GGUF
    name; vocab size and tying come from the tensors themselves, which cannot disagree with them."""
    shape = llama_shape(meta)
    vocab_size = tensor_shapes["token_embd.weight"][0]
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.dim,
        "intermediate_size": int(_require(meta, "llama.feed_forward_length")),
        "num_hidden_layers": shape.n_layer,
        "num_attention_heads": shape.n_head,
        "num_key_value_heads": shape.n_head_kv,
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(meta.get("llama.rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(meta),
        "max_position_embeddings": int(meta.get("llama.context_length", 2048)),
        "vocab_size": int(vocab_size),
        # llama.cpp writes no output.weight when the head shares the embedding matrix.
        "tie_word_embeddings": "output.weight" not in tensor_shapes,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    for key in ("bos", "eos", "padding"):
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None:
            config["pad_token_id" if key == "padding" else f"{key}_token_id"] = int(token_id)
    return config


# ---------------------------------------------------------------------------------------------
# Tensor names and values
# ---------------------------------------------------------------------------------------------

def hf_tensor_name(gguf_name: str, n_layer: int) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_RE.match(gguf_name)
    if match and match.group(2) in _LAYER_NAMES and int(match.group(1)) < n_layer:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}.weight"
    if gguf_name == "rope_freqs.weight":
        raise ValueError("this GGUF carries rope_freqs.weight (Llama-3.1-style rope scaling), "
                         "which is not supported")
    raise ValueError(f"unexpected tensor {gguf_name!r} for a dense Llama model (biases, experts "
                     "and extra heads are not supported)")


def _numpy_shape(tensor) -> tuple[int, ...]:
    # GGUF lists dimensions fastest-varying first; numpy/PyTorch list them slowest first.
    return tuple(int(n) for n in reversed(tensor.shape.tolist()))


def tensor_to_hf(tensor, shape: LlamaShape) -> np.ndarray:
    """One ``gguf.ReaderTensor`` -> its HF float32 array (dequantised, q/k rows unpermuted)."""
    values = dequantize(tensor.data, tensor.tensor_type.name, int(tensor.n_elements), tensor.name)
    values = values.reshape(_numpy_shape(tensor))
    if ".attn_q." in tensor.name:
        values = unpermute_qk(values, shape.n_head)
    elif ".attn_k." in tensor.name:
        values = unpermute_qk(values, shape.n_head_kv)
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


def _pre_tokenizer(pre: str | None, add_prefix_space: bool):
    from tokenizers import Regex, pre_tokenizers

    if pre not in _PRE_TOKENIZERS:
        supported = ", ".join(repr(k) for k in _PRE_TOKENIZERS if k)
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported (supported: {supported}); "
                         "a wrong split regex would tokenise text differently from llama.cpp")
    split = _PRE_TOKENIZERS[pre]
    if split is None or split == _DIGITS:
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=True)
        if split is None:
            return byte_level
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=False)])


def build_tokenizer(meta: dict):
    """(``tokenizers.Tokenizer``, tokenizer_config dict) from a GGUF's ``tokenizer.*`` metadata.

    Mirrors what ``transformers`` does for a GGUF byte-level BPE vocabulary, so the directory
    encodes text as ``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` does. One deliberate
    difference: for ``pre == "smollm"`` digits are split one by one first, as llama.cpp and
    SmolLM's own tokenizer.json do (transformers skips it; identical ids on SmolLM2's vocabulary,
    which has no multi-digit tokens).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    model = meta.get("tokenizer.ggml.model")
    if model not in SUPPORTED_TOKENIZER_MODELS:
        raise ValueError(f"GGUF tokenizer model {model!r} is not supported (supported: "
                         f"{', '.join(SUPPORTED_TOKENIZER_MODELS)}, byte-level BPE); "
                         "pass tokenizer=False / --no-tokenizer to convert the weights only")
    tokens = list(_require(meta, "tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ")) for m in _require(meta, "tokenizer.ggml.merges")]
    if any(len(m) != 2 for m in merges):
        raise ValueError("GGUF BPE merges must be 'left right' pairs")
    token_types = list(meta.get("tokenizer.ggml.token_type") or [])

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
    tokenizer.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre"),
                                             bool(meta.get("tokenizer.ggml.add_space_prefix", False)))
    tokenizer.decoder = decoders.ByteLevel()

    # Control tokens (<|im_start|>, ...) must match whole, never be split by BPE.
    special = [AddedToken(t, normalized=False, special=True)
               for t, kind in zip(tokens, token_types)
               if kind == _TOKEN_TYPE_CONTROL and set(t) <= alphabet]
    user = [AddedToken(t, normalized=False, special=False)
            for t, kind in zip(tokens, token_types)
            if kind == _TOKEN_TYPE_USER_DEFINED and t in vocab]
    if special:
        tokenizer.add_special_tokens(special)
    if user:
        tokenizer.add_tokens(user)

    def token(key: str) -> str | None:
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[token_id] if token_id is not None and token_id < len(tokens) else None

    bos, eos = token("bos"), token("eos")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
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
        "model_max_length": int(meta.get("llama.context_length", 2048)),
    }
    if meta.get("tokenizer.chat_template"):
        config["chat_template"] = meta["tokenizer.chat_template"]
    return tokenizer, {k: v for k, v in config.items() if v is not None}


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------

def convert_gguf_to_hf(gguf_path: str | Path, out_dir: str | Path, *, tokenizer: bool = True,
                       progress: Progress | None = None) -> Path:
    """Convert a Llama GGUF file into an HF checkpoint directory; returns ``out_dir``.

    Everything is validated (architecture, tensor names, tensor types, tokenizer) before any
    file is written, so a failure leaves no half-written checkpoint behind.
    """
    from gguf import GGUFReader  # test/tool dependency; not needed by the training library

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    say = progress or (lambda message: None)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")

    say(f"reading {gguf_path}")
    reader = GGUFReader(gguf_path)
    if getattr(getattr(reader, "endianess", None), "name", "LITTLE") != "LITTLE":
        # Our dequantisers read little-endian scales; big-endian GGUFs are vanishingly rare.
        raise ValueError(f"{gguf_path} is a big-endian GGUF, which is not supported")
    meta = read_metadata(reader)
    check_architecture(meta)
    shape = llama_shape(meta)

    specs, sources = [], []
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name, shape.n_layer)
        if tensor.tensor_type.name not in BLOCK_LAYOUT:
            raise ValueError(f"tensor {tensor.name!r} has GGML type {tensor.tensor_type.name}, which "
                             f"this converter cannot dequantise (supported: "
                             f"{', '.join(SUPPORTED_TENSOR_TYPES)})")
        specs.append((name, _numpy_shape(tensor)))
        sources.append(tensor)
    tensor_shapes = {t.name: s for t, (_, s) in zip(sources, specs)}
    config = build_hf_config(meta, tensor_shapes)
    tok = build_tokenizer(meta) if tokenizer else None
    if tok is not None and tok[0].get_vocab_size(with_added_tokens=True) > config["vocab_size"]:
        raise ValueError(f"tokenizer has {tok[0].get_vocab_size()} tokens but the embedding only "
                         f"{config['vocab_size']} rows")

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if tok is not None:
        tok[0].save(str(out_dir / "tokenizer.json"))
        (out_dir / "tokenizer_config.json").write_text(json.dumps(tok[1], indent=2) + "\n")
        say(f"wrote tokenizer ({len(meta['tokenizer.ggml.tokens'])} tokens)")

    types = sorted({t.tensor_type.name for t in sources})
    say(f"dequantising {len(specs)} tensors ({', '.join(types)}) to float32")
    step = max(1, len(specs) // 10)

    def produce(i: int) -> np.ndarray:
        if i % step == 0 or i == len(specs) - 1:
            say(f"  tensor {i + 1}/{len(specs)}: {sources[i].name} -> {specs[i][0]}")
        return tensor_to_hf(sources[i], shape)

    write_safetensors_streaming(out_dir / "model.safetensors", specs, produce)
    n_params = sum(int(np.prod(s)) for _, s in specs)
    say(f"wrote {out_dir / 'model.safetensors'} ({n_params / 1e6:.1f}M parameters)")
    return out_dir
