"""`ModelSpec` against transformers: for every row of the tiny family table (tests/hf/test_load.py),
the spec read from the config.json transformers writes has the sizes, head_dim, RoPE, windows,
soft caps and tying transformers' own model of that config has; its q/k permutations are
torchtune's conversion; the GGUF table names every tensor the family's checkpoints hold. A
config.json that is not what it must be is refused by the spec's reader, before any build; what
a builder lacks (a RoPE scaling type, a head_dim it derives) by the build."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "tests" / "hf"))
from test_load import FAMILIES, TINY  # noqa: E402

from pmss_dist.gguf.to_hf import ARCHITECTURES  # noqa: E402
from pmss_dist.hf.keys import hf_rows, tune_shapes  # noqa: E402
from pmss_dist.models import FAMILIES as FAMILY_TABLE  # noqa: E402
from pmss_dist.models import HFCheckpointError, build_decoder, model_spec  # noqa: E402
from pmss_dist.models.spec import Llama3Scaling, LongRoPEScaling  # noqa: E402

transformers = pytest.importorskip("transformers", reason="needs transformers (pip install -e .[test])")


def written(row: str):
    """(the config.json transformers writes for the row, transformers' model of it)."""
    config_cls, extra = FAMILIES[row]
    config = getattr(transformers, config_cls)(**{**TINY, **extra})
    config.architectures = [config_cls.replace("Config", "ForCausalLM")]
    torch.manual_seed(0)
    return config.to_dict(), transformers.AutoModelForCausalLM.from_config(config)


def transformers_windows(config: dict, hf_model) -> tuple:
    """Each layer's window as transformers applies it: its attention's own (Qwen2, Qwen3, Gemma 2),
    else the config's on every layer (Mistral, Phi-3), else none (Llama, Gemma)."""
    attention = [layer.self_attn for layer in hf_model.model.layers]
    if hasattr(attention[0], "sliding_window"):
        return tuple(a.sliding_window for a in attention)
    return (config.get("sliding_window"),) * len(attention)


@pytest.mark.parametrize("row", list(FAMILIES))
def test_spec_is_what_transformers_builds(row):
    config, hf_model = written(row)
    spec = model_spec(config)
    attn = hf_model.model.layers[0].self_attn
    assert spec.family is FAMILY_TABLE[config["architectures"][0]]
    assert (spec.vocab_size, spec.dim, spec.hidden_dim, spec.num_layers, spec.max_seq_len) == (
        hf_model.model.embed_tokens.num_embeddings, hf_model.model.embed_tokens.embedding_dim,
        hf_model.model.layers[0].mlp.down_proj.in_features, len(hf_model.model.layers),
        config["max_position_embeddings"])
    assert spec.num_heads * spec.head_dim == attn.o_proj.in_features and spec.head_dim == attn.head_dim
    assert spec.num_kv_heads == hf_model.config.num_key_value_heads
    assert spec.head_dim_derived == ("head_dim" not in config)
    assert spec.tied == (hf_model.lm_head.weight is hf_model.model.embed_tokens.weight)
    assert spec.windows == transformers_windows(config, hf_model)
    assert spec.norm_eps == config["rms_norm_eps"]
    # RoPE: the base, the features that rotate, and the scaling's parameters as transformers reads them.
    rotary = hf_model.model.rotary_emb
    assert spec.rope.theta == config["rope_parameters"]["rope_theta"]
    assert spec.rope.rotary_dim == 2 * rotary.inv_freq.numel()
    scaling, stated = spec.rope.scaling, config["rope_parameters"]
    if stated.get("rope_type", "default") == "default":
        assert scaling is None
        plain = 1.0 / spec.rope.theta ** (torch.arange(0, spec.rope.rotary_dim, 2).float() / spec.rope.rotary_dim)
        torch.testing.assert_close(rotary.inv_freq, plain)
    elif isinstance(scaling, Llama3Scaling):
        assert (scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor, scaling.original_max_seq_len) == (
            stated["factor"], stated["low_freq_factor"], stated["high_freq_factor"],
            stated["original_max_position_embeddings"])
    else:
        assert isinstance(scaling, LongRoPEScaling)
        assert (list(scaling.short_factor), list(scaling.long_factor)) == (stated["short_factor"],
                                                                            stated["long_factor"])
        assert math.isclose(scaling.attention_factor, rotary.attention_scaling, rel_tol=1e-12)
    # Attention scores scaled by query_pre_attn_scalar^-1/2 (Gemma 2) or head_dim^-1/2, soft caps where set.
    assert math.isclose(attn.scaling, (spec.query_pre_attn_scalar or spec.head_dim) ** -0.5, rel_tol=1e-12)
    assert (spec.attn_softcap, spec.final_softcap) == (config.get("attn_logit_softcapping"),
                                                       config.get("final_logit_softcapping"))


@pytest.mark.parametrize("row", list(FAMILIES))
def test_qk_permutations_are_torchtunes_conversion(row):
    from torchtune.models.convert_weights import hf_to_tune

    spec = model_spec(written(row)[0])
    if not spec.family.PERMUTED_QK:
        assert spec.qk_permutations == {}
        return
    weights = {f"model.layers.0.self_attn.{p}_proj.weight": torch.randn(n * spec.head_dim, spec.dim)
               for p, n in (("q", spec.num_heads), ("k", spec.num_kv_heads))}
    tune = hf_to_tune(weights, num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads, dim=spec.dim,
                      head_dim=spec.head_dim)
    for p, perm in spec.qk_permutations.items():
        assert torch.equal(weights[f"model.layers.0.self_attn.{p}.weight"][perm], tune[f"layers.0.attn.{p}.weight"])


@pytest.mark.parametrize("row", list(FAMILIES))
def test_gguf_table_names_every_tensor_of_the_family(row):
    """The GGUF tensor names of the family's architecture (read off the family table) cover the
    tensors of its HF checkpoints, and nothing else but a head llama.cpp ties."""
    spec = model_spec(written(row)[0])
    arch = ARCHITECTURES[spec.family.GGUF_ARCH]
    hf = {rows.key for rows in hf_rows(tune_shapes(spec), spec.family).values()}
    gguf = {f"{module}.weight" for module in arch.global_tensors.values()}
    for i in range(spec.num_layers):
        gguf |= {f"model.layers.{i}.{module}.weight" for module in arch.layer.values()}
        gguf |= {f"model.layers.{i}.{arch.layer[leaf]}.bias" for leaf in arch.biases}
    assert hf <= gguf and gguf - hf <= {"lm_head.weight"}, (hf ^ gguf)


LLAMA = {"architectures": ["LlamaForCausalLM"], **TINY}


@pytest.mark.parametrize("config,message", [
    ([LLAMA], r"config.json holds a JSON array, not an object"),
    ({**LLAMA, "architectures": ["MixtralForCausalLM"]}, r"unsupported architecture \['MixtralForCausalLM'\]"),
    ({k: v for k, v in LLAMA.items() if k != "vocab_size"}, "config.json has no vocab_size"),
    ({**LLAMA, "num_key_value_heads": 3}, "num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
    ({**LLAMA, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
     r"rope_scaling of type 'llama3' lacks \['low_freq_factor', 'high_freq_factor'\]"),
    ({**LLAMA, "architectures": ["Phi3ForCausalLM"], "rope_scaling": {"type": "su", "short_factor": [1.0] * 4}},
     r"rope_scaling of type 'su' lacks \['long_factor'\]"),
    ({**LLAMA, "architectures": ["MistralForCausalLM"], "sliding_window": 0}, "sliding_window 0 must be a positive"),
    ({**LLAMA, "architectures": ["Qwen2ForCausalLM"], "layer_types": ["full_attention"]},
     "layer_types must name sliding_attention or full_attention for each of the 2 layers"),
    ({**LLAMA, "architectures": ["Qwen3ForCausalLM"], "attention_bias": True}, "config.json sets attention_bias: true"),
    ({**LLAMA, "architectures": ["Gemma2ForCausalLM"], "tie_word_embeddings": False},
     "config.json sets tie_word_embeddings: false"),
], ids=["array", "architecture", "missing", "kv-groups", "llama3-factors", "su-factors", "window", "layer-types",
        "qwen3-bias", "gemma2-untied"])
def test_the_reader_refuses_what_config_json_must_not_be(config, message):
    with pytest.raises(HFCheckpointError, match=message):
        model_spec(config)


@pytest.mark.parametrize("changes,message", [
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
     r"rope_scaling type 'linear' is not supported for LlamaForCausalLM \(supported: \['llama3'\]\)"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, r"rope_scaling type 'yarn' is not supported"),
    ({"head_dim": 16}, r"head_dim=16 differs from hidden_size/num_attention_heads \(32/4\), which torchtune's "
                       r"llama3 builder assumes"),
], ids=["linear", "yarn", "head-dim"])
def test_what_a_builder_lacks_is_a_valid_spec_the_build_refuses(changes, message):
    """GGUF conversion carries these models through; the build does not make them."""
    spec = model_spec({**LLAMA, **changes})
    with pytest.raises(HFCheckpointError, match=message), torch.device("meta"):
        build_decoder(spec)
