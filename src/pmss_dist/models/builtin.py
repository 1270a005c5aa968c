"""The built-in default: a tiny seeded Llama checkpoint and a byte tokenizer the repo makes itself,
so the main job and the tests run on a fresh machine with no download."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torchtune.models.convert_weights import tune_to_hf

from pmss_dist.files import atomic_write
from pmss_dist.models import build_decoder, model_spec

BYTE_TOKENIZER_FILE = "byte_tokenizer.json"

# A Llama-shaped model small enough to train in a minute on two CPU cores.
TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 320,  # 256 bytes + BOS/EOS/PAD, rounded up to a multiple of 64
    "hidden_size": 128,
    "intermediate_size": 344,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 256,
    "eos_token_id": 257,
    "pad_token_id": 258,
    "torch_dtype": "float32",
}


def write_tiny_checkpoint(out_dir: str | Path, seed: int = 0, **overrides) -> Path:
    """Write a seeded, randomly initialised HF Llama checkpoint (config.json, model.safetensors,
    byte tokenizer) to ``out_dir``. The same seed and overrides give the same bytes."""
    out_dir = Path(out_dir)
    config = {**TINY_CONFIG, **overrides}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_decoder(model_spec(config))
        # Small normal init (as Llama pretraining) instead of torchtune's uniform defaults, and
        # norm scales with some spread, so skeleton selection sees a realistic, non-flat matrix.
        for name, p in model.named_parameters():
            if p.dim() == 2:
                torch.nn.init.normal_(p, std=0.02 * (1 + torch.rand(()).item()))
            else:
                torch.nn.init.uniform_(p, 0.8, 1.2)
    state = tune_to_hf({k: v.contiguous() for k, v in model.state_dict().items()},
                       num_heads=config["num_attention_heads"], num_kv_heads=config["num_key_value_heads"],
                       dim=config["hidden_size"])
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "model.safetensors", lambda p: save_file(state, p, metadata={"format": "pt"}))
    atomic_write(out_dir / "config.json", lambda p: Path(p).write_text(json.dumps(config, indent=2)))
    tok = {"type": "bytes", "bos_id": config["bos_token_id"], "eos_id": config["eos_token_id"],
           "pad_id": config["pad_token_id"]}
    atomic_write(out_dir / BYTE_TOKENIZER_FILE, lambda p: Path(p).write_text(json.dumps(tok)))
    return out_dir
