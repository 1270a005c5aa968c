"""Where the planner reads a model's shape: the one place for the shapes of real models whose
checkpoints are not on this machine.

In order: ``--hf-config FILE`` (a config.json), ``model.path/config.json`` (the checkpoint the run
would train), the built-in tiny model, then `KNOWN_CONFIGS` below, looked up by the name of the
``model.path`` directory (``checkpoints/Llama-3.1-405B`` -> ``Llama-3.1-405B``). Each entry is the
model's published config.json, cut to the fields the build reads; the configs in ``configs/`` name
their checkpoint directories after them.
"""

from __future__ import annotations

import json
from pathlib import Path

from pmss_dist.config import BUILTIN_TINY
from pmss_dist.errors import ConfigError
from pmss_dist.models import model_spec
from pmss_dist.models.builtin import TINY_CONFIG
from pmss_dist.models.spec import ModelSpec

# Llama 3.1's RoPE scaling, shared by 3.1 and 3.3 (config.json's rope_scaling).
_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
_LLAMA3 = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
           "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
           "rope_scaling": _LLAMA3_ROPE, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}

KNOWN_CONFIGS: dict[str, dict] = {
    "Llama-3.1-8B": {**_LLAMA3, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8},
    "Llama-3.3-70B-Instruct": {**_LLAMA3, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                               "num_attention_heads": 64, "num_key_value_heads": 8},
    "Llama-3.1-405B": {**_LLAMA3, "hidden_size": 16384, "intermediate_size": 53248, "num_hidden_layers": 126,
                       "num_attention_heads": 128, "num_key_value_heads": 8},
}
# The same shapes under the names of their other releases.
KNOWN_CONFIGS["Llama-3.1-8B-Instruct"] = KNOWN_CONFIGS["Llama-3.1-8B"]
KNOWN_CONFIGS["Llama-3.1-70B"] = KNOWN_CONFIGS["Llama-3.3-70B-Instruct"]
KNOWN_CONFIGS["Llama-3.1-405B-Instruct"] = KNOWN_CONFIGS["Llama-3.1-405B"]


def resolve_model_spec(model_path: str, hf_config_file: str | Path | None = None) -> tuple[ModelSpec, str]:
    """``(the model's spec, where its config.json came from)`` for the model a run config names."""
    if hf_config_file is not None:
        path = Path(hf_config_file)
        if not path.is_file():
            raise ConfigError(f"--hf-config {path}: no such file (give a model's config.json)")
        return model_spec(json.loads(path.read_text()), where=str(path)), str(path)
    if model_path == BUILTIN_TINY:
        return model_spec(TINY_CONFIG), "the built-in tiny model"
    path = Path(model_path) / "config.json"
    if path.is_file():
        return model_spec(json.loads(path.read_text()), where=str(path)), str(path)
    name = Path(model_path).name
    if name in KNOWN_CONFIGS:
        return model_spec(KNOWN_CONFIGS[name]), f"the published shape of {name} (pmss_dist.plan.shapes)"
    raise ConfigError(f"model.path={model_path}: no config.json there and {name!r} is not a known model "
                      f"({', '.join(sorted(KNOWN_CONFIGS))}); pass --hf-config path/to/config.json")
