"""Qwen2 and Qwen2.5 (``Qwen2ForCausalLM``): q/k/v biases, tied or untied output, and the sliding
window of the layers from ``max_window_layers`` on when ``use_sliding_window`` is set (released
Qwen2.5 checkpoints leave it off)."""

from torchtune.models.qwen2 import qwen2

from pmss_dist.models.sliding_window import add_sliding_windows, layer_windows
from pmss_dist.models.spec import ModelSpec, check_head_dim_derived

ARCHITECTURE = "Qwen2ForCausalLM"
MODEL_TYPE = "qwen2"
GGUF_ARCH = "qwen2"
# torchtune's Qwen2 rotates halves, as HF does: no permutation.
PERMUTED_QK = False
# Beyond the common map: the q/k/v biases.
HF_KEYS = {f"layers.{{}}.attn.{p}_proj.bias": f"model.layers.{{}}.self_attn.{p}_proj.bias" for p in "qkv"}
# transformers' Qwen2Config defaults, for a config.json without the keys.
DEFAULT_SLIDING_WINDOW = 4096
DEFAULT_MAX_WINDOW_LAYERS = 28


def read_fields(c: dict, num_layers: int) -> dict:
    """Each layer's window as transformers' Qwen2Config reads config.json (Qwen3Config reads it the
    same way, with the same defaults)."""
    # transformers ignores sliding_window (Qwen2.5 ships 131072 or 32768) unless use_sliding_window.
    window = c.get("sliding_window", DEFAULT_SLIDING_WINDOW) if c.get("use_sliding_window", False) else None
    first_sliding = c.get("max_window_layers", DEFAULT_MAX_WINDOW_LAYERS)
    return {"windows": layer_windows(c, window, [i >= first_sliding for i in range(num_layers)])}


def build(spec: ModelSpec, max_seq_len: int):
    check_head_dim_derived(spec, "qwen2")
    model = qwen2(**spec.torchtune_args(max_seq_len), tie_word_embeddings=spec.tied)
    add_sliding_windows(model, spec.windows)
    return model
