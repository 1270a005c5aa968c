"""HF checkpoints in: tiny models written by transformers itself, imported by build_decoder +
load_hf_weights, must give transformers' logits; on 2 processes every rank's FSDP2 shards must
equal the slices of torchtune's own conversion; broken checkpoints fail naming the file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torchtune.training import set_default_dtype

from conftest import free_port
from pmss_dist.hf.load import load_hf_weights, read_model_spec, weight_files
from pmss_dist.models import build_decoder, init_rope_caches

# Odd vocabulary and intermediate sizes: shards of 2 ranks differ in length.
TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=45, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
FAMILIES = {
    # rope_theta != 10000: transformers 5 nests it in rope_parameters, which the import must read.
    "llama": ("LlamaConfig", dict(rope_theta=500000.0)),
    "llama-tied": ("LlamaConfig", dict(tie_word_embeddings=True)),
    "mistral": ("MistralConfig", {}),
    "qwen2": ("Qwen2Config", dict(rope_theta=1e6)),  # q/k/v biases, no q/k permutation
    "gemma": ("GemmaConfig", dict(head_dim=8)),  # tied, explicit head_dim
    # Llama 3.1-3.3's RoPE scaling. head_dim 8 has wavelengths 2pi x (1, 10, 100, 1000) at theta 1e4:
    # with original length 64, low/high factors 1/8 the first is kept, the second smoothed, the last
    # two divided by the factor; the sequence (max_position_embeddings) runs past the original length.
    "llama3.1": ("LlamaConfig", dict(max_position_embeddings=128, rope_parameters=dict(
        rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=8.0,
        original_max_position_embeddings=64))),
    "llama3.2-tied": ("LlamaConfig", dict(tie_word_embeddings=True, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))),
    "qwen2.5-tied": ("Qwen2Config", dict(rope_theta=1e6, tie_word_embeddings=True, use_sliding_window=False)),
    # Sliding windows of 4 tokens: every Mistral layer; Qwen2's layers from max_window_layers on.
    "mistral-window": ("MistralConfig", dict(sliding_window=4)),
    "qwen2-window": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    # Qwen3: RMSNorm on each q/k head before RoPE; head_dim 16, not hidden/heads = 8; no biases.
    "qwen3": ("Qwen3Config", dict(head_dim=16, rope_theta=1e6)),
    # Gemma 2: a 4-token window on layer 0 (sliding and global layers alternate), soft-caps near the
    # attention scores' and logits' own scale so that both bend them, query_pre_attn_scalar != head_dim.
    "gemma2": ("Gemma2Config", dict(head_dim=16, sliding_window=4, attn_logit_softcapping=5.0,
                                    final_logit_softcapping=10.0, query_pre_attn_scalar=12)),
    # Phi-3/Phi-4: fused qkv_proj and gate_up_proj; Phi-3-mini-4k's window on every layer (4 here);
    # in-vocabulary special tokens (Phi3Config's defaults are 32000).
    "phi3": ("Phi3Config", dict(sliding_window=4, rope_theta=250000.0, pad_token_id=None, eos_token_id=2)),
    # Phi-4-mini: tied, RoPE on 3/4 of each head (6 of 8 dims: 3 frequencies), LongRoPE whose
    # original length 16 the long sequences pass (long factors, attention factor sqrt(1 + ln 4 / ln 16)).
    "phi4-mini": ("Phi3Config", dict(tie_word_embeddings=True, partial_rotary_factor=0.75,
                                     original_max_position_embeddings=16, pad_token_id=None, eos_token_id=2,
                                     rope_scaling=dict(type="longrope", short_factor=[1.0, 1.3, 2.1],
                                                       long_factor=[1.5, 3.0, 7.0]))),
}


def make_hf_checkpoint(out_dir: Path, family: str = "llama", *, seed: int = 0, dtype=torch.float32,
                       max_shard_size: str | None = None, **overrides):
    """Save a seeded random model with transformers' own ``save_pretrained``; returns it (fp32)."""
    transformers = pytest.importorskip("transformers", reason="needs transformers (pip install -e .[test])")
    config_cls, extra = FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**TINY, **extra, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Large enough that a wrong row order or a missing tensor shows up in the logits.
            p.copy_(torch.randn_like(p) * 0.3 if p.dim() == 2 else 1 + 0.2 * torch.randn_like(p))
    model.to(dtype).save_pretrained(out_dir, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return model.eval()


def hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits.float()


def our_model(ckpt_dir: Path, dtype=torch.float32):
    spec = read_model_spec(ckpt_dir)
    with torch.device("meta"), set_default_dtype(dtype):
        model = build_decoder(spec)
    model.to_empty(device="cpu")
    init_rope_caches(model, torch.device("cpu"))
    load_hf_weights(model, ckpt_dir, spec)
    return model.eval()


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_import_matches_transformers(tmp_path, family):
    hf_model = make_hf_checkpoint(tmp_path, family)
    ours = our_model(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens()), hf_logits(hf_model, tokens()), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    path = tmp_path_factory.mktemp("sharded")
    model = make_hf_checkpoint(path, "llama", max_shard_size="20KB")
    return path, model


def test_sharded_import_matches_transformers(sharded):
    path, hf_model = sharded
    assert len(set(weight_files(path).values())) > 2 and (path / "model.safetensors.index.json").is_file()
    ours = our_model(path)
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens()), hf_logits(hf_model, tokens()), rtol=1e-5, atol=1e-5)


def _broken_copy(src: Path, dst: Path) -> tuple[Path, dict]:
    shutil.copytree(src, dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    return dst, index


def test_truncated_shard_is_named(sharded, tmp_path):
    path, index = _broken_copy(sharded[0], tmp_path / "c")
    shard = path / index["weight_map"]["model.layers.1.mlp.down_proj.weight"]
    shard.write_bytes(shard.read_bytes()[:-64])
    with pytest.raises(ValueError, match=f"{shard.name}.*truncated"):
        our_model(path)


def test_missing_shard_is_named(sharded, tmp_path):
    path, index = _broken_copy(sharded[0], tmp_path / "c")
    shard = path / index["weight_map"]["model.norm.weight"]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"{shard.name} is listed in model.safetensors.index.json"):
        our_model(path)


def test_unsupported_architecture_is_named(sharded, tmp_path):
    path, _ = _broken_copy(sharded[0], tmp_path / "c")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "architectures": ["FalconForCausalLM"]}))
    with pytest.raises(ValueError, match="unsupported architecture.*FalconForCausalLM"):
        our_model(path)


def test_tensors_without_a_place_are_refused(tmp_path):
    # A Llama with attention biases: torchtune's llama3 has none, so they must not vanish quietly.
    make_hf_checkpoint(tmp_path, "llama", attention_bias=True)
    with pytest.raises(ValueError, match=r"model.safetensors: tensor\(s\) \['model.layers.0.self_attn.k_proj.bias"):
        our_model(tmp_path)


def test_shape_mismatch_names_tensor(tmp_path):
    make_hf_checkpoint(tmp_path, "llama")
    config = json.loads((tmp_path / "config.json").read_text())
    # 96 rows split over 2 ranks would slice fine: the full shape is what must be checked.
    (tmp_path / "config.json").write_text(json.dumps({**config, "vocab_size": 96}))
    with pytest.raises(ValueError, match=r"model.embed_tokens.weight has shape \(97, 32\).*\(96, 32\)"):
        our_model(tmp_path)


# ---- two processes: FSDP2 shards read straight from the files -------------------------------

def _two_rank_worker(rank: int, port: int, cases: list[tuple[str, str, str]]) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torchtune.models.convert_weights import hf_to_tune

    from pmss_dist.adapters.layers import AdapterSpec, adapter_layers, apply_adapters, reset_adapters
    from pmss_dist.hf.load import base_parameters
    from pmss_dist.models import init_rope_caches
    from pmss_dist.parallel.parallelize import parallelize

    torch.set_num_threads(1)  # a forked child must not reuse the parent's OpenMP pool
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        for ckpt_dir, dcp_dir, expected_file in cases:
            spec = read_model_spec(ckpt_dir)
            # Independent reference: torchtune's own converter on the whole consolidated state dict.
            full = {}
            for path in sorted(set(weight_files(ckpt_dir).values())):
                full.update(load_file(str(path)))
            reference = hf_to_tune(full, num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads, dim=spec.dim)

            def sharded_model():
                with torch.device("meta"):
                    model = build_decoder(spec)
                apply_adapters(model, AdapterSpec("pmss", size=4, alpha=4.0))
                parallelize(model, mesh, param_dtype=torch.float32, compile=False,
                            activation_checkpointing="none", reshard_after_forward=True)
                model.to_empty(device="cpu")
                init_rope_caches(model, torch.device("cpu"))
                return model

            def assert_shards_equal_slices(model, source):
                params = base_parameters(model)
                assert set(params) == set(reference), (source, set(params) ^ set(reference))
                for name, p in params.items():
                    assert isinstance(p, DTensor), name
                    chunks = torch.chunk(reference[name], 2)
                    want = chunks[rank] if rank < len(chunks) else reference[name][:0]
                    assert torch.equal(p.to_local(), want), f"{source}: rank {rank} {name}"

            model = sharded_model()
            load_hf_weights(model, ckpt_dir, spec)
            assert_shards_equal_slices(model, ckpt_dir)
            # An identity adapter (zero cores) on every projection: logits are the base model's.
            reset_adapters(model, seed=0)
            with torch.no_grad():
                for layer in adapter_layers(model).values():
                    layer.row_idx.copy_(torch.arange(4))
                    layer.col_idx.copy_(torch.arange(4))
                expected = load_file(expected_file)
                torch.testing.assert_close(model(expected["tokens"]), expected["logits"], rtol=1e-5, atol=1e-5)

            # The DCP directory written by pmss-hf-to-dcp loads into the same shards.
            fresh = sharded_model()
            dcp.load({n: p for n, p in base_parameters(fresh).items()}, checkpoint_id=dcp_dir)
            assert_shards_equal_slices(fresh, dcp_dir)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_tool(name: str, args: list[str]) -> int:
    """The exit status of the command-line tool ``pmss_dist.cli.<name>``, run in this process."""
    import importlib

    return importlib.import_module(f"pmss_dist.cli.{name}").main(args)


def test_two_ranks_read_their_own_slices(sharded, tmp_path):
    single_dir = tmp_path / "single"
    single_model = make_hf_checkpoint(single_dir, "llama", seed=3)
    cases = []
    for ckpt_dir, hf_model in ((single_dir, single_model), sharded):
        dcp_dir = tmp_path / f"dcp-{ckpt_dir.name}"
        assert run_tool("hf_to_dcp", ["--hf", str(ckpt_dir), "--out", str(dcp_dir)]) == 0
        assert (dcp_dir / ".metadata").is_file() and (dcp_dir / "config.json").is_file()
        expected = tmp_path / f"expected-{ckpt_dir.name}.safetensors"
        save_file({"tokens": tokens(), "logits": hf_logits(hf_model, tokens()).contiguous()}, str(expected))
        cases.append((str(ckpt_dir), str(dcp_dir), str(expected)))
    # fork: the workers inherit this process's imports (seconds each on a loaded CI machine).
    mp.start_processes(_two_rank_worker, args=(free_port(), cases), nprocs=2, join=True, start_method="fork")


def test_hf_to_dcp_help_and_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_tool("hf_to_dcp", ["--help"])
    assert exit_info.value.code == 0 and "--hf" in capsys.readouterr().out
    assert run_tool("hf_to_dcp", ["--hf", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 1
    assert "nowhere/config.json not found" in capsys.readouterr().err
