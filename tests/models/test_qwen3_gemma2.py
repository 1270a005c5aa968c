"""Qwen3 and Gemma 2 beyond the per-family checks of test_families.py: that the tiny configs
really exercise what sets these families apart (q/k norms before RoPE; sliding windows,
soft-capping, query_pre_attn_scalar, the extra norms), the layer pattern of config.json files with
and without ``layer_types``, Qwen3's optional window and tied output, KV-cache decoding past the
window, the refusals, full fine-tuning exported and loaded by transformers, and the shipped
configs' k against LoRA r=8 on the real shapes."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torchtune.modules import MultiHeadAttention
from torchtune.modules.common_utils import local_kv_cache

from conftest import FAST, REPO, run_job

sys.path.insert(0, str(REPO / "tests" / "hf"))  # the tiny family checkpoints of the import tests
from test_export import assert_close_to_scale, transformers_logits  # noqa: E402
from test_load import TINY, make_hf_checkpoint, our_model  # noqa: E402

from pmss_dist.hf.load import read_model_spec, weight_files  # noqa: E402
from pmss_dist.models import build_decoder, model_spec  # noqa: E402
from pmss_dist.models.builtin import BYTE_TOKENIZER_FILE  # noqa: E402

transformers = pytest.importorskip("transformers", reason="the family tests need transformers (pip install -e .[test])")

# Longer than the tiny Gemma 2's 4-token window, as test_families.py's sequences are.
TOKENS = torch.randint(0, TINY["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(3))
# Far above the ~1e-6 of the logits' scale that separates two correct implementations in fp32.
VISIBLE = 1e-2


def logits(model, toks=TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return model(toks).float()


def hf_logits(hf_model, toks=TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(toks).logits.float()


def relative_gap(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3")
    return path, make_hf_checkpoint(path, "qwen3")


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory):
    path = tmp_path_factory.mktemp("gemma2")
    return path, make_hf_checkpoint(path, "gemma2")


def test_qwen3_norms_before_rope_are_what_matches(qwen3):
    path, hf_model = qwen3
    model = our_model(path)
    expected = hf_logits(hf_model)
    assert_close_to_scale(logits(model), expected, 1e-5)
    # torchtune's own MultiHeadAttention runs the same modules with the norms after RoPE: on this
    # config (norm weights differ between rotated feature pairs) that is visibly another model.
    for layer in model.layers:
        layer.attn.__class__ = MultiHeadAttention
    assert relative_gap(logits(model), expected) > VISIBLE


def test_qwen3_tied_output(tmp_path):
    hf_model = make_hf_checkpoint(tmp_path, "qwen3", tie_word_embeddings=True)
    model = our_model(tmp_path)
    assert "lm_head.weight" not in weight_files(tmp_path)
    assert_close_to_scale(logits(model), hf_logits(hf_model), 1e-5)


def test_qwen3_sliding_window_as_transformers_reads_it(tmp_path):
    """Released Qwen3 has no window; a config.json with use_sliding_window slides from
    max_window_layers on, as for Qwen2, and the 4-token window visibly changes the logits."""
    hf_model = make_hf_checkpoint(tmp_path, "qwen3", use_sliding_window=True, sliding_window=4, max_window_layers=1)
    assert read_model_spec(tmp_path).config["layer_types"] == ["full_attention", "sliding_attention"]
    model = our_model(tmp_path)
    expected = hf_logits(hf_model)
    assert_close_to_scale(logits(model), expected, 1e-5)
    _without_window(model)
    assert relative_gap(logits(model), expected) > VISIBLE


def _without_window(model):
    for layer in model.layers:
        layer.attn._forward_pre_hooks.clear()


def _without_attention_cap(model):
    for layer in model.layers:
        layer.attn.softcapping = None


def _without_final_cap(model):
    model.output = model.output.output


def _torchtune_norm_order(model):
    # torchtune's gemma2 weight map loads pre_feedforward_layernorm into the post-MLP norm and back.
    for layer in model.layers:
        layer.mlp_norm, layer.mlp_scale = layer.mlp_scale, layer.mlp_norm


def _head_dim_scaling(model):
    for layer in model.layers:
        layer.attn.scaling = layer.attn.head_dim ** -0.5


@pytest.mark.parametrize("drop", [_without_window, _without_attention_cap, _without_final_cap, _torchtune_norm_order,
                                  _head_dim_scaling], ids=lambda f: f.__name__.strip("_"))
def test_gemma2_each_feature_is_exercised(gemma2, drop):
    """Our model equals transformers' only with every Gemma 2 feature in place: without any one of
    them the tiny config's logits move far beyond the tolerance, so the import test checks each."""
    path, hf_model = gemma2
    model = our_model(path)
    expected = hf_logits(hf_model)
    assert_close_to_scale(logits(model), expected, 1e-5)
    drop(model)
    assert relative_gap(logits(model), expected) > VISIBLE


@pytest.mark.parametrize("layer_types", [None, ["full_attention", "sliding_attention", "sliding_attention"]],
                         ids=["no-layer_types", "explicit-layer_types"])
def test_gemma2_layer_pattern_follows_the_file(tmp_path, layer_types):
    """Files written before transformers 5 have no ``layer_types``: every even layer slides, as
    transformers assumes. A file that lists them is followed layer by layer."""
    extra = {"num_hidden_layers": 3} if layer_types else {}
    hf_model = make_hf_checkpoint(tmp_path, "gemma2", **extra, **({"layer_types": layer_types} if layer_types else {}))
    config = read_model_spec(tmp_path).config
    if layer_types is None:
        assert config.pop("layer_types")[:2] == ["sliding_attention", "full_attention"]
        (tmp_path / "config.json").write_text(json.dumps(config))
    else:
        assert config["layer_types"] == layer_types
    assert_close_to_scale(logits(our_model(tmp_path)), hf_logits(hf_model), 1e-5)


@pytest.mark.parametrize("family", ["qwen3", "gemma2"])
def test_kv_cache_decoding_matches_transformers(request, family):
    """Decoding through our KV cache (Qwen3's own attention forward; Gemma 2's window drawn from
    the cache slots), a 5-token prefill then one token per step, gives at every position the
    logits transformers computes on the whole sequence, far past the 4-token window."""
    path, hf_model = request.getfixturevalue(family)
    model, toks = our_model(path), TOKENS[:1]
    total = toks.shape[1]
    mask = torch.ones(total, total, dtype=torch.bool).tril()[None]
    positions = torch.arange(total)[None]
    steps = [(0, 5), *((t, t + 1) for t in range(5, total))]
    with torch.no_grad(), local_kv_cache(model, batch_size=1, device=torch.device("cpu"), dtype=torch.float32,
                                         decoder_max_seq_len=total):
        cached = torch.cat([model(toks[:, a:b], mask=mask[:, a:b], input_pos=positions[:, a:b]) for a, b in steps], 1)
    assert_close_to_scale(cached, hf_logits(hf_model, toks), 1e-5)


@pytest.mark.parametrize("arch,changes,message", [
    ("Qwen3ForCausalLM", dict(attention_bias=True), "attention_bias: true"),
    ("Qwen3ForCausalLM", dict(hidden_act="gelu"), "hidden_act: 'gelu'"),
    ("Gemma2ForCausalLM", dict(tie_word_embeddings=False), "tie_word_embeddings: false"),
    ("Gemma2ForCausalLM", dict(layer_types=["full_attention"]), r"layer_types must name .* each of the 2 layers"),
    ("Gemma2ForCausalLM", dict(hidden_activation="gelu"), "hidden_activation: 'gelu'"),
    ("Gemma2ForCausalLM", dict(attention_bias=True), "attention_bias: true"),
], ids=["qwen3-bias", "qwen3-act", "gemma2-untied", "gemma2-layer_types", "gemma2-act", "gemma2-bias"])
def test_what_is_not_modelled_is_refused(arch, changes, message):
    config = {**TINY, "architectures": [arch], "head_dim": 16, **changes}
    with pytest.raises(ValueError, match=f"config.json.*{message}"):
        with torch.device("meta"):
            build_decoder(model_spec(config))


# The shipped configs' models, as their config.json files give them.
REAL = {
    "qwen3_8b": ("Qwen3Config", dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                                     num_attention_heads=32, num_key_value_heads=8, head_dim=128)),
    "qwen3_32b": ("Qwen3Config", dict(hidden_size=5120, intermediate_size=25600, num_hidden_layers=64,
                                      num_attention_heads=64, num_key_value_heads=8, head_dim=128)),
    "gemma2_9b": ("Gemma2Config", dict(hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                                       num_attention_heads=16, num_key_value_heads=8, head_dim=256)),
}


@pytest.mark.parametrize("name", list(REAL))
def test_config_k_is_lora_r8_budget(name):
    """The config's PMSS k trains as many parameters as LoRA r=8 on the same targets of the real
    model (built on the meta device), to the nearest whole k."""
    from pmss_dist.adapters.layers import AdapterSpec, apply_adapters
    from pmss_dist.config import load_config

    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    config_cls, shapes = REAL[name]
    spec = model_spec({**getattr(transformers, config_cls)(**shapes).to_dict(),
                       "architectures": [config_cls.replace("Config", "ForCausalLM")]})

    def trainable(kind: str, size: int) -> int:
        with torch.device("meta"):
            model = build_decoder(spec)
        return apply_adapters(model, AdapterSpec(kind, targets=tuple(cfg.adapter.targets), size=size,
                                                 alpha=float(size)))["trainable"]

    k, lora = cfg.adapter.rank, trainable("lora", 8)
    gaps = {size: abs(trainable("pmss", size) - lora) for size in (k - 1, k, k + 1)}
    assert min(gaps, key=gaps.get) == k and gaps[k] < 0.005 * lora, (gaps, lora)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3", "gemma2"])
def test_full_finetune_export_is_the_trained_model(tmp_path, family):
    """2 processes of full fine-tuning: every tensor trains (the q/k norms, Gemma 2's four norms per
    layer), and transformers on the exported checkpoint equals our model on the final DCP step."""
    base, run = tmp_path / "base", tmp_path / "run"
    make_hf_checkpoint(base, family, vocab_size=320)  # room for the byte tokenizer of the built-in task
    (base / BYTE_TOKENIZER_FILE).write_text(json.dumps({"type": "bytes", "bos_id": 256, "eos_id": 257, "pad_id": 258}))
    run_job(2, [*FAST, "max_steps=3", "adapter.kind=full", "optim.lr=1e-3", f"model.path={base}",
                f"output_dir={run}", "checkpoint.every_steps=0"])

    model = build_decoder(read_model_spec(base))
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    dcp.load(state, checkpoint_id=run / "checkpoints" / "step_000003", no_dist=True)
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
    toks = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    merged = transformers_logits(run / "merged", toks)
    assert_close_to_scale(merged, logits(model.eval(), toks), 1e-5)

    before, after = load_file(str(base / "model.safetensors")), load_file(str(run / "merged" / "model.safetensors"))
    assert set(after) == set(before)
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, f"{family}: {unchanged} did not train"
