"""Mistral (``MistralForCausalLM``), with its sliding window when config.json sets one."""

from torchtune.models.mistral import mistral

from pmss_dist.models.sliding_window import add_sliding_windows, layer_windows
from pmss_dist.models.spec import ModelSpec, check_head_dim_derived

ARCHITECTURE = "MistralForCausalLM"
MODEL_TYPE = "mistral"
GGUF_ARCH = "llama"  # llama.cpp's converter writes Mistral as llama (a llama GGUF reads back as Llama)
PERMUTED_QK = True
# transformers' MistralConfig default, for a config.json without the key (null: no window).
DEFAULT_SLIDING_WINDOW = 4096


def read_fields(c: dict, num_layers: int) -> dict:
    return {"windows": layer_windows(c, c.get("sliding_window", DEFAULT_SLIDING_WINDOW), [True] * num_layers)}


def build(spec: ModelSpec, max_seq_len: int):
    check_head_dim_derived(spec, "mistral")
    model = mistral(**spec.torchtune_args(max_seq_len))
    add_sliding_windows(model, spec.windows)
    return model
