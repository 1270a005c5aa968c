"""What pmss_dist cannot build exactly is refused before any work, naming the architecture or the
config.json field: unsupported architectures, RoPE scaling types we do not implement, and a
config.json that contradicts its weights. Each case starts from a tiny checkpoint transformers
wrote, with config.json edited the way a user's file would differ."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "tests" / "hf"))  # the tiny family checkpoints of the import tests
from test_load import make_hf_checkpoint  # noqa: E402

from pmss_dist.adapters.layers import AdapterSpec  # noqa: E402
from pmss_dist.build import build_model  # noqa: E402
from pmss_dist.hf.load import read_model_spec  # noqa: E402
from pmss_dist.models import FAMILIES, HFCheckpointError, model_spec  # noqa: E402


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("refusals")
    out = {}
    for family in ("llama", "qwen2", "mistral"):
        make_hf_checkpoint(root / family, family)
        out[family] = root / family
    return out


def build_with(monkeypatch, ckpt: Path, **config_changes) -> None:
    """build_model on ``ckpt`` with config.json changed (a value of None removes the key), as the
    trainer calls it; any allocation of the model (``to_empty``) counts as work begun."""
    config = {k: v for k, v in {**read_model_spec(ckpt).config, **config_changes}.items() if v is not None}

    def work_begun(*args, **kwargs):
        raise AssertionError("the model was allocated before the refusal")

    monkeypatch.setattr(torch.nn.Module, "to_empty", work_begun)
    build_model(model_spec(config), adapter=AdapterSpec("pmss", size=4, alpha=4.0), mesh=None,
                device=torch.device("cpu"), dtype=torch.float32, weights=ckpt)


@pytest.mark.parametrize("arch", ["MixtralForCausalLM", "Qwen3MoeForCausalLM", "LlavaForConditionalGeneration",
                                  "Qwen2VLForConditionalGeneration", "BertModel"])
def test_unsupported_architecture_is_refused(checkpoints, monkeypatch, arch):
    supported = ", ".join(repr(a) for a in sorted(FAMILIES))
    with pytest.raises(ValueError, match=rf"unsupported architecture \['{arch}'\] in config.json; "
                                         rf"supported: \[{supported}\]"):
        build_with(monkeypatch, checkpoints["llama"], architectures=[arch])


# As each format writes it: transformers < 5 at the top level (older files say "type"), 5.x nested.
@pytest.mark.parametrize("family,kind,changes", [
    ("llama", "yarn", dict(rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32))),
    ("llama", "dynamic", dict(rope_scaling=dict(type="dynamic", factor=2.0))),
    ("llama", "linear", dict(rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=10000.0))),
    ("qwen2", "longrope", dict(rope_scaling=dict(rope_type="longrope", short_factor=[1.0] * 4,
                                                 long_factor=[2.0] * 4, original_max_position_embeddings=32))),
    ("mistral", "yarn", dict(rope_scaling=dict(rope_type="yarn", factor=4.0))),
], ids=["llama-yarn", "llama-dynamic", "llama-linear", "qwen2-longrope", "mistral-yarn"])
def test_unimplemented_rope_scaling_is_refused(checkpoints, monkeypatch, family, kind, changes):
    arch = read_model_spec(checkpoints[family]).family.ARCHITECTURE
    supported = list(getattr(FAMILIES[arch], "ROPE_SCALING", ())) or "none"
    with pytest.raises(ValueError, match=rf"rope_scaling type '{kind}' is not supported for {arch} "
                                         rf"\(supported: {supported}\)".replace("[", r"\[").replace("]", r"\]")):
        build_with(monkeypatch, checkpoints[family], **changes)


def test_llama3_scaling_without_its_factors_is_refused(checkpoints, monkeypatch):
    scaling = dict(rope_type="llama3", factor=8.0, original_max_position_embeddings=32)
    with pytest.raises(ValueError, match=r"rope_scaling of type 'llama3' lacks \['low_freq_factor', 'high_freq_factor'\]"):
        build_with(monkeypatch, checkpoints["llama"], rope_scaling=scaling)


# The tiny checkpoint: hidden 32, 4 heads of 8, 2 KV heads, intermediate 45, vocabulary 97, 2 layers.
@pytest.mark.parametrize("changes,message", [
    (dict(num_key_value_heads=4), r"k_proj.weight has shape \(16, 32\), but config.json's num_key_value_heads=4, "
                                  r"head_dim=8, hidden_size=32 give \(32, 32\)"),
    (dict(num_attention_heads=8, head_dim=None), r"k_proj.weight has shape \(16, 32\), but config.json's "
                                                 r"num_key_value_heads=2, head_dim=4 \(hidden_size/num_attention_heads "
                                                 r"= 32/8\)"),
    (dict(intermediate_size=44), r"gate_proj.weight has shape \(45, 32\), but config.json's intermediate_size=44"),
    (dict(vocab_size=96), r"embed_tokens.weight has shape \(97, 32\), but config.json's vocab_size=96"),
    (dict(num_hidden_layers=3), r"num_hidden_layers=3, but the checkpoint holds layers 0..1: .*set num_hidden_layers "
                                r"to 2"),
    (dict(head_dim=16), r"head_dim=16 differs from hidden_size/num_attention_heads \(32/4\)"),
], ids=["kv-heads", "heads", "intermediate", "vocab", "layers", "head-dim"])
def test_config_contradicting_weights_names_the_field(checkpoints, monkeypatch, changes, message):
    with pytest.raises(ValueError, match=message):
        build_with(monkeypatch, checkpoints["llama"], **changes)


# The shared fields every build reads, each of a kind torch would fail on deep in the build (or
# build a model of no checkpoint): refused naming the field, with the checkpoint's own config.json.
@pytest.mark.parametrize("changes,message", [
    (dict(vocab_size=None), r"config.json has no vocab_size: set it to the model's own value"),
    (dict(num_hidden_layers=2.0), r"num_hidden_layers=2.0 is not a positive integer"),
    (dict(num_key_value_heads=0), r"num_key_value_heads=0 is not a positive integer"),
    (dict(max_position_embeddings=-64), r"max_position_embeddings=-64 is not a positive integer"),
    (dict(num_key_value_heads=3), r"num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
    (dict(num_attention_heads=3, num_key_value_heads=1, head_dim=None),
     r"hidden_size=32 is not a multiple of num_attention_heads=3, and there is no head_dim"),
    (dict(rms_norm_eps="1e-5"), r"rms_norm_eps='1e-5' is not a positive number"),
    (dict(rope_theta=-1.0), r"rope_theta=-1.0 is not a positive number"),
    (dict(rope_scaling=["llama3"]), r"rope_scaling=\['llama3'\] is not an object"),
    (dict(architectures="LlamaForCausalLM"), r"architectures is 'LlamaForCausalLM', not a list of class names"),
], ids=["missing", "float", "zero-kv-heads", "negative", "kv-groups", "heads-of-hidden", "eps", "theta",
        "scaling-list", "architectures-string"])
def test_config_field_of_the_wrong_kind_is_refused(checkpoints, monkeypatch, changes, message):
    with pytest.raises(HFCheckpointError, match=message):
        build_with(monkeypatch, checkpoints["llama"], **changes)


@pytest.mark.slow
def test_refusals_reach_the_trainer(checkpoints, tmp_path):
    """The same refusal from the command line: the trainer stops with the field named and nothing
    trained or written beyond its output directory."""
    import subprocess

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for path in checkpoints["llama"].iterdir():
        (ckpt / path.name).write_bytes(path.read_bytes())
    config = read_model_spec(ckpt).config
    (ckpt / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 4}))
    proc = subprocess.run([sys.executable, "-m", "pmss_dist.cli.train", "--config", str(REPO / "configs" / "tiny.yaml"),
                           f"model.path={ckpt}", f"output_dir={tmp_path / 'run'}", "model.dtype=float32"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode != 0
    assert "config.json's num_key_value_heads=4" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "summary.json").exists()
